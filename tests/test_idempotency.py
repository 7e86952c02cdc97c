"""Every money-moving RPC is idempotent by request id, one at a time and 20 at once.

For SendEnvelope (by balance and by card), TopUp, Withdraw and UnlockPhoto, through the
real server and bank simulator: a retry with the same payload answers the first result
and moves nothing more; the same id with another payload is INVALID_ARGUMENT
REQUEST_ID_REUSED and moves nothing; 20 concurrent calls with one id move the money
once, and when they carry two payloads one payload wins and the other is refused. The
bank sees one order per card payment (reconcile's bank cross-check, run by the fixture,
agrees). BatchGrab items replay like GrabEnvelope.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.errors import reason_of
from hongbao.v1 import envelope_pb2, moments_pb2, wallet_pb2
from tests.test_gateway import top_up

LUCKY = envelope_pb2.ENVELOPE_KIND_LUCKY
# A duplicate that arrives while the first call is still at the bank answers the payment's
# state of the moment: PENDING, with the same payment id.
SETTLED_OR_IN_FLIGHT = (wallet_pb2.PAYMENT_STATUS_SUCCEEDED, wallet_pb2.PAYMENT_STATUS_PENDING)
# A card-paid send debits the card, not the wallet: no wallet entry to count (the bank
# cross-check of the fixture's reconcile counts its orders).
WALLET_ENTRIES = {"send by balance": 1, "send by card": 0, "top-up": 1, "withdrawal": 1,
                  "photo unlock": 1}


def _calls(c: Client):
    """name -> (call(request_id, amount) -> the id it answers with)."""
    async def send_balance(meta, rid, amount):
        r = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id=rid, total_fen=amount, count=2, kind=LUCKY,
            pay_method=envelope_pb2.PAY_METHOD_BALANCE), metadata=meta, timeout=10)
        return r.envelope_id

    async def send_card(meta, rid, amount):
        r = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id=rid, total_fen=amount, count=2, kind=LUCKY,
            pay_method=envelope_pb2.PAY_METHOD_CARD, card_id="ccb-42"), metadata=meta,
            timeout=10)
        return r.envelope_id + "/" + r.payment_id

    async def top(meta, rid, amount):
        r = await c.wallet.TopUp(wallet_pb2.TopUpRequest(
            request_id=rid, card_id="icbc-42", amount_fen=amount), metadata=meta, timeout=10)
        assert r.status in SETTLED_OR_IN_FLIGHT
        return r.payment_id

    async def withdraw(meta, rid, amount):
        r = await c.wallet.Withdraw(wallet_pb2.WithdrawRequest(
            request_id=rid, card_id="icbc-42", amount_fen=amount), metadata=meta, timeout=10)
        assert r.status in SETTLED_OR_IN_FLIGHT
        return r.payment_id

    async def unlock(meta, rid, amount):
        # The price is the server's; the payload that differs is the photo.
        r = await c.moments.UnlockPhoto(moments_pb2.UnlockPhotoRequest(
            request_id=rid, photo_id=f"photo-{amount}", owner_id="idem-owner"), metadata=meta,
            timeout=10)
        return r.payment_id

    return {"send by balance": send_balance, "send by card": send_card, "top-up": top,
            "withdrawal": withdraw, "photo unlock": unlock}


NAMES = ["send by balance", "send by card", "top-up", "withdrawal", "photo unlock"]


async def _money(c: Client, meta) -> tuple[int, int]:
    b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta, timeout=10)
    tx = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(page_size=100),
                                         metadata=meta, timeout=10)
    return b.balance_fen, len(tx.transactions)


async def _entries_reach(c: Client, meta, want: int) -> int:
    """The wallet's entry count once it reaches ``want`` (a payment may still be settling),
    or what it is after 10 s."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        count = (await _money(c, meta))[1]
        if count >= want or asyncio.get_running_loop().time() > deadline:
            return count
        await asyncio.sleep(0.05)


async def _reused(call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(exc.value) == "REQUEST_ID_REUSED"


@pytest.mark.parametrize("name", NAMES)
def test_retry_replays_and_another_payload_is_refused(stack, name):
    async def scenario():
        async with Client(stack.target) as c:
            meta = stack.meta(f"idem-{name.replace(' ', '-')}")
            await top_up(c, meta, 50_000, rid="fund")
            call = _calls(c)[name]
            first = await call(meta, "once", 1_000)
            after = await _money(c, meta)
            assert await call(meta, "once", 1_000) == first
            await _reused(call(meta, "once", 1_200))
            assert await _money(c, meta) == after
    asyncio.run(scenario())


@pytest.mark.parametrize("name", NAMES)
def test_twenty_concurrent_duplicates_move_money_once(stack, name):
    async def scenario():
        async with Client(stack.target) as c:
            meta = stack.meta(f"dup-{name.replace(' ', '-')}")
            await top_up(c, meta, 50_000, rid="fund")
            call = _calls(c)[name]
            before = await _money(c, meta)
            same = await asyncio.gather(*(call(meta, "twenty", 1_000) for _ in range(20)))
            assert len(set(same)) == 1
            entries = WALLET_ENTRIES[name]
            once = await _entries_reach(c, meta, before[1] + entries)
            await asyncio.sleep(0.2)                   # time for a second entry, if any
            assert (await _money(c, meta))[1] == once == before[1] + entries
            # Two payloads racing for one id: one wins, the other is refused, once.
            mixed = await asyncio.gather(*(call(meta, "mixed", 1_000 + 200 * (i % 2))
                                           for i in range(20)), return_exceptions=True)
            won = {r for r in mixed if isinstance(r, str)}
            lost = [r for r in mixed if isinstance(r, BaseException)]
            assert len(won) == 1 and len(lost) == 10
            assert all(isinstance(e, grpc.aio.AioRpcError) and
                       reason_of(e) == "REQUEST_ID_REUSED" for e in lost)
            assert await _entries_reach(c, meta, once + entries) == once + entries
            await asyncio.sleep(0.2)
            assert (await _money(c, meta))[1] == once + entries
    asyncio.run(scenario())


def test_batch_grab_items_replay_like_grabs(stack):
    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("batch-owner")
            await top_up(c, owner, 10_000, rid="fund")
            env = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id="b-env", total_fen=1_000, count=10, kind=LUCKY,
                pay_method=envelope_pb2.PAY_METHOD_BALANCE), metadata=owner, timeout=10)
            item = envelope_pb2.BatchGrabItem(user_id="bu1", envelope_id=env.envelope_id,
                                              request_id="r1")
            other_id = envelope_pb2.BatchGrabItem(user_id="bu1", envelope_id=env.envelope_id,
                                                  request_id="r2")
            batches = [envelope_pb2.BatchGrabRequest(batch_id=1, items=[item, item, other_id]),
                       envelope_pb2.BatchGrabRequest(batch_id=2, items=[item])]
            got = [r async for r in c.envelopes.BatchGrab(
                iter(batches), metadata=stack.meta("upstream", scopes=("batch",)), timeout=10)]
            results = [x for r in got for x in r.results]
            outcomes = [x.outcome for x in results]
            grabbed = envelope_pb2.GRAB_OUTCOME_GRABBED
            assert outcomes == [grabbed, grabbed, envelope_pb2.GRAB_OUTCOME_ALREADY_GRABBED,
                                grabbed]
            amounts = {x.amount_fen for x in results if x.outcome == grabbed}
            assert len(amounts) == 1              # every replay answers the one share
    asyncio.run(scenario())
