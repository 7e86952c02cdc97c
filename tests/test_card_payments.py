"""Card payments against the real bank simulator, one fault type at a time.

Each test switches one fault on in the running simulator (SetFaults), makes a
card payment through the gateway, waits for the resolver where the answer was
unclear, and checks the payment's final state, the wallet, the card at the
bank, the user's notifications, and (in the fixture) that the books balance
and agree with the bank.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.errors import reason_of
from gateway.payments.bank import BankClient
from hongbao.v1 import envelope_pb2, notification_pb2, wallet_pb2
from tests.conftest import Stack, run
from tests.test_gateway import balance, grab, send, top_up
from tests.test_notifications import _take

CARD = "icbc-6222000011112222"
CARD_OPENING_FEN = 1_000_000
PS = wallet_pb2
NK = notification_pb2


async def set_faults(stack: Stack, **faults) -> None:
    bank = BankClient(stack.bank.target, timeout_s=5)
    try:
        await bank.set_faults("", faults)
    finally:
        await bank.close()


async def bank_stats(stack: Stack):
    bank = BankClient(stack.bank.target, timeout_s=5)
    try:
        return await bank.stats()
    finally:
        await bank.close()


async def card_balance(stack: Stack, card: str = CARD) -> int:
    bank = BankClient(stack.bank.target, timeout_s=5)
    try:
        return await bank.card_balance(card)
    finally:
        await bank.close()


async def wait_status(c: Client, meta, rid: str, amount: int, want: set[int],
                      call: str = "TopUp", timeout_s: float = 15.0):
    """Retries the same request until the payment reaches one of ``want``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    req_cls = PS.TopUpRequest if call == "TopUp" else PS.WithdrawRequest
    while True:
        r = await getattr(c.wallet, call)(req_cls(request_id=rid, card_id=CARD,
                                                  amount_fen=amount), metadata=meta, timeout=5)
        if r.status in want:
            return r
        assert asyncio.get_running_loop().time() < deadline, f"stuck in {r.status}"
        await asyncio.sleep(0.1)


async def kinds(c: Client, meta, n: int) -> list[int]:
    return [e.kind for e in await _take(c, meta, 0, n)]


def test_card_envelope_and_balance_first(bank_stack):
    """CARD pays by card; AUTO pays from the balance when it covers the amount, sparing the bank."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("ann")
            by_card = await send(c, u, 3_000, 3, rid="card", card_id=CARD,
                                 pay_method=envelope_pb2.PAY_METHOD_CARD)
            assert by_card.status == envelope_pb2.ENVELOPE_STATUS_ACTIVE
            assert by_card.paid_via == envelope_pb2.PAY_METHOD_CARD and by_card.payment_id
            assert (await grab(c, bank_stack.meta("bo"), by_card.envelope_id)).amount_fen > 0
            assert await card_balance(bank_stack) == CARD_OPENING_FEN - 3_000
            auto_short = await send(c, u, 1_000, 1, rid="auto1", card_id=CARD)
            assert auto_short.paid_via == envelope_pb2.PAY_METHOD_CARD
            await top_up(c, u, 10_000, card=CARD)
            before = (await bank_stats(bank_stack)).orders
            auto = await send(c, u, 2_000, 2, rid="auto2", card_id=CARD)
            after = (await bank_stats(bank_stack)).orders
            assert auto.paid_via == envelope_pb2.PAY_METHOD_BALANCE
            assert after == before, "balance first: the bank saw no call"
            again = await send(c, u, 3_000, 3, rid="card", card_id=CARD,
                               pay_method=envelope_pb2.PAY_METHOD_CARD)
            assert again.envelope_id == by_card.envelope_id
            assert (await balance(c, u)).balance_fen == 8_000
    run(scenario())


def test_decline_and_insufficient_card_funds(bank_stack):
    """A declined card fails at once with its reason, moves nothing, and retries say the same."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("cy")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await top_up(c, u, CARD_OPENING_FEN + 1, rid="big", card=CARD)
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(exc.value) == "CARD_INSUFFICIENT_FUNDS"
            await set_faults(bank_stack, decline_rate=1.0)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await top_up(c, u, 500, rid="declined", card=CARD)
                assert reason_of(exc.value) == "CARD_DECLINED"
            assert (await balance(c, u)).balance_fen == 0
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
    run(scenario())


def test_timeout_is_resolved_by_locking_the_order(bank_stack):
    """A timed-out debit goes UNKNOWN, then the resolver voids it: FAILED, nothing charged."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("di")
            await set_faults(bank_stack, timeout_rate=1.0)
            first = await top_up(c, u, 700, rid="t", card=CARD)
            assert first.status == PS.PAYMENT_STATUS_UNKNOWN
            await set_faults(bank_stack)
            done = await wait_status(c, u, "t", 700, {PS.PAYMENT_STATUS_FAILED})
            assert done.payment_id == first.payment_id
            assert (await balance(c, u)).balance_fen == 0
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
            assert await kinds(c, u, 2) == [NK.NOTIFICATION_KIND_UNKNOWN,
                                             NK.NOTIFICATION_KIND_LOCKED]
    run(scenario())


def test_lost_response_is_refunded(bank_stack):
    """The bank debited but the answer was lost: the resolver refunds, the card is whole again."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("ed")
            await set_faults(bank_stack, lost_response_rate=1.0)
            first = await top_up(c, u, 900, rid="l", card=CARD)
            assert first.status == PS.PAYMENT_STATUS_UNKNOWN
            assert await card_balance(bank_stack) == CARD_OPENING_FEN - 900
            await set_faults(bank_stack)
            await wait_status(c, u, "l", 900, {PS.PAYMENT_STATUS_REFUNDED})
            assert (await balance(c, u)).balance_fen == 0
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
            assert await kinds(c, u, 2) == [NK.NOTIFICATION_KIND_UNKNOWN,
                                             NK.NOTIFICATION_KIND_REFUNDED]
    run(scenario())


def test_late_debit_is_refunded(bank_stack):
    """A debit that lands after the caller gave up is found by the resolver and refunded."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("flo")
            await set_faults(bank_stack, late_debit_rate=1.0, late_debit_delay_ms=100)
            first = await top_up(c, u, 1_100, rid="late", card=CARD)
            assert first.status == PS.PAYMENT_STATUS_UNKNOWN
            await wait_status(c, u, "late", 1_100, {PS.PAYMENT_STATUS_REFUNDED})
            await set_faults(bank_stack)
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
    run(scenario())


def test_late_debit_after_the_void_never_lands(bank_stack):
    """Voided before the late debit arrives, the order is locked and the card is never charged."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("gil")
            await set_faults(bank_stack, late_debit_rate=1.0, late_debit_delay_ms=4000)
            first = await top_up(c, u, 1_300, rid="late", card=CARD)
            assert first.status == PS.PAYMENT_STATUS_UNKNOWN
            await wait_status(c, u, "late", 1_300, {PS.PAYMENT_STATUS_FAILED})
            await asyncio.sleep(6.5)  # past the late debit's moment
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
            assert (await balance(c, u)).balance_fen == 0
            await set_faults(bank_stack)
    run(scenario())


def test_withdrawals(bank_stack):
    """Withdraw pays out; a lost answer resolves as paid; a timeout restores the wallet."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("hu")
            await top_up(c, u, 10_000, card=CARD)
            ok = await c.wallet.Withdraw(PS.WithdrawRequest(
                request_id="w1", card_id=CARD, amount_fen=1_000), metadata=u, timeout=5)
            assert ok.status == PS.PAYMENT_STATUS_SUCCEEDED
            assert await card_balance(bank_stack) == CARD_OPENING_FEN - 10_000 + 1_000
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.wallet.Withdraw(PS.WithdrawRequest(
                    request_id="w-big", card_id=CARD, amount_fen=50_000), metadata=u)
            assert reason_of(exc.value) == "INSUFFICIENT_BALANCE"
            await set_faults(bank_stack, lost_response_rate=1.0)
            lost = await c.wallet.Withdraw(PS.WithdrawRequest(
                request_id="w2", card_id=CARD, amount_fen=2_000), metadata=u, timeout=5)
            assert lost.status == PS.PAYMENT_STATUS_UNKNOWN
            await set_faults(bank_stack, timeout_rate=1.0)
            timed = await c.wallet.Withdraw(PS.WithdrawRequest(
                request_id="w3", card_id=CARD, amount_fen=3_000), metadata=u, timeout=5)
            assert timed.status == PS.PAYMENT_STATUS_UNKNOWN
            assert (await balance(c, u)).balance_fen == 10_000 - 1_000 - 2_000 - 3_000
            await set_faults(bank_stack)
            await wait_status(c, u, "w2", 2_000, {PS.PAYMENT_STATUS_SUCCEEDED}, "Withdraw")
            await wait_status(c, u, "w3", 3_000, {PS.PAYMENT_STATUS_FAILED}, "Withdraw")
            assert (await balance(c, u)).balance_fen == 10_000 - 1_000 - 2_000
            assert await card_balance(bank_stack) == CARD_OPENING_FEN - 10_000 + 3_000
    run(scenario())


def test_card_envelope_with_unclear_payment_is_cancelled(bank_stack):
    """An envelope whose card payment went unclear is never grabbable and ends REFUNDED."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("ivo")
            await set_faults(bank_stack, lost_response_rate=1.0)
            sent = await send(c, u, 2_000, 2, rid="e", card_id=CARD,
                              pay_method=envelope_pb2.PAY_METHOD_CARD)
            assert sent.status == envelope_pb2.ENVELOPE_STATUS_PAY_UNKNOWN
            await set_faults(bank_stack)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await grab(c, bank_stack.meta("jo"), sent.envelope_id)
            assert reason_of(exc.value) == "ENVELOPE_NOT_PAID"
            for _ in range(150):
                again = await send(c, u, 2_000, 2, rid="e", card_id=CARD,
                                   pay_method=envelope_pb2.PAY_METHOD_CARD)
                if again.status == envelope_pb2.ENVELOPE_STATUS_REFUNDED:
                    break
                await asyncio.sleep(0.1)
            assert again.status == envelope_pb2.ENVELOPE_STATUS_REFUNDED
            assert await card_balance(bank_stack) == CARD_OPENING_FEN
    run(scenario())


def test_bank_collapse_during_card_payments(tmp_path):
    """A bank that collapses mid-rush: every payment ends final, books and bank agree."""
    config = tmp_path / "gateway.toml"
    # With the butler off nothing shields the bank, so it collapses; the
    # resolver then has to clean up every payment the collapse left unclear.
    config.write_text("bank_timeout_s = 0.5\nresolve_delay_s = 0.3\nresolver_max_backoff_s = 1.0\n"
                      "butler_enabled = false\n")
    s = Stack(tmp_path)
    s.bank.cmd += ["--capacity-tps", "40", "--collapse-after-s", "0.5", "--collapse-for-s", "2"]
    try:
        s.bank.start()
        s.start_gateway("--config", str(config))

        async def scenario():
            async with Client(s.target) as c:
                users = [f"p{i}" for i in range(120)]
                metas = {u: s.meta(u) for u in users}

                async def pay(u, rnd):
                    try:
                        r = await c.wallet.TopUp(PS.TopUpRequest(
                            request_id=f"t{rnd}", card_id=f"icbc-{100 + users.index(u)}",
                            amount_fen=100), metadata=metas[u], timeout=5)
                        return r.status
                    except grpc.aio.AioRpcError as err:
                        return reason_of(err)

                outcomes = []
                rounds = 8
                for rnd in range(rounds):
                    outcomes += await asyncio.gather(*(pay(u, rnd) for u in users))
                stats = await bank_stats(s)
                assert {b.bank_id: b.collapses for b in stats.banks}["icbc"] >= 1
                assert any(o in (PS.PAYMENT_STATUS_UNKNOWN, "BANK_CIRCUIT_OPEN", "BANK_BUSY")
                           for o in outcomes), outcomes
                # Everything settles: no payment stays unclear.
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    pending = []
                    for u in users:
                        for rnd in range(rounds):
                            st = await pay(u, rnd)
                            if st in (PS.PAYMENT_STATUS_UNKNOWN, PS.PAYMENT_STATUS_PENDING):
                                pending.append((u, rnd))
                    if not pending:
                        break
                    assert asyncio.get_running_loop().time() < deadline, pending[:5]
                    await asyncio.sleep(0.5)

        run(scenario())
        s.assert_balanced()
    finally:
        s.stop()
