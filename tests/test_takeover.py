"""The payment butler's takeover, against the real bank simulator and a real gateway.

A bank is reached through two channels (direct, clearing). When the direct channel goes
down or stops answering, new payments move to the clearing channel, payments whose result
was unclear are resolved through the channel they went through, and nothing is lost or
taken twice. When a whole bank goes down, PAY_METHOD_AUTO completes on the user's next
bound card, and PAY_METHOD_CARD names the cards that would work. Every test ends with the
reconcile against the bank, per channel (the ``bank_stack`` fixture).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from banksim.v1 import bank_pb2
from gateway.client import Client
from gateway.errors import metadata_of, reason_of
from gateway.payments.bank import BankClient
from hongbao.v1 import admin_pb2, envelope_pb2, notification_pb2, wallet_pb2
from tests.conftest import Stack, run
from tests.test_card_payments import CARD_OPENING_FEN, bank_stats, card_balance
from tests.test_gateway import send
from tests.test_notifications import _take

ICBC = "icbc-6222000011112222"
CCB = "ccb-6217000033334444"
PS = wallet_pb2
CHANNEL = {bank_pb2.CHANNEL_DIRECT: "direct", bank_pb2.CHANNEL_CLEARING: "clearing"}


async def faults(stack: Stack, bank_id: str, channel: str = "", down: bool = False,
                 **config: float) -> None:
    bank = BankClient(stack.bank.target, timeout_s=5)
    try:
        await bank.set_faults(bank_id, config, channel=channel, down=down)
    finally:
        await bank.close()


async def channel_stats(stack: Stack, bank_id: str) -> dict[str, bank_pb2.ChannelStats]:
    stats = await bank_stats(stack)
    bank = next(b for b in stats.banks if b.bank_id == bank_id)
    return {CHANNEL[ch.channel]: ch for ch in bank.channels}


async def qos_rows(c: Client, stack: Stack, bank_id: str) -> dict[str, admin_pb2.BankHealth]:
    q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                   metadata=stack.meta("ops", ("admin",)), timeout=5)
    return {h.channel: h for h in q.banks if h.bank_id == bank_id}


async def top_ups(c: Client, stack: Stack, n_users: int, ks: range) -> list:
    """Top-ups of 100 + k fen (request ids ``t<user>-<k>``) for each k of ``ks``, the
    ``n_users`` users paying at once; every answer."""
    answers: list = []

    async def user(i: int) -> None:
        meta = stack.meta(f"u{i}")
        for k in ks:
            answers.append(await c.wallet.TopUp(PS.TopUpRequest(
                request_id=f"t{i}-{k}", card_id=ICBC, amount_fen=100 + k),
                metadata=meta, timeout=10))

    await asyncio.gather(*(user(i) for i in range(n_users)))
    return answers


def test_direct_channel_down_mid_run_moves_payments_to_clearing(bank_stack):
    """Card top-ups run; the direct channel goes down part way. Every top-up completes
    (the refused ones went through clearing with the same order id), the direct breaker
    opens and new payments go to clearing at once, and the bank took each exactly once."""
    n_users, per_user = 4, 15

    async def scenario():
        async with Client(bank_stack.target) as c:
            answers = await top_ups(c, bank_stack, n_users, range(5))
            await faults(bank_stack, "icbc", channel="direct", down=True)
            answers += await top_ups(c, bank_stack, n_users, range(5, per_user))
            rows = await qos_rows(c, bank_stack, "icbc")
            chans = await channel_stats(bank_stack, "icbc")
            card = await card_balance(bank_stack, ICBC)
            await faults(bank_stack, "icbc", channel="direct", down=False)
            return answers, rows, chans, card

    answers, rows, chans, card = run(scenario())
    assert len(answers) == n_users * per_user
    assert Counter(a.status for a in answers) == {PS.PAYMENT_STATUS_SUCCEEDED: len(answers)}
    total = sum(100 + k for _ in range(n_users) for k in range(per_user))
    assert card == CARD_OPENING_FEN - total, "each top-up taken exactly once"
    assert chans["direct"].debits_settled > 0 and chans["clearing"].debits_settled > 0
    assert chans["direct"].debits_settled + chans["clearing"].debits_settled == len(answers)
    assert chans["direct"].refused_while_down > 0
    assert (chans["direct"].debited_fen + chans["clearing"].debited_fen) == total
    # The butler saw it: direct opened, clearing took the traffic, some of it moved there.
    assert rows["direct"].breaker_state == "open"
    assert rows["clearing"].breaker_state == "closed"
    assert rows["clearing"].rerouted_in > 0 and rows["clearing"].traffic_share > 0
    shown = bank_stack.reconcile().stdout
    assert "via clearing" in shown and "via direct" in shown


def test_direct_channel_stops_answering_unclear_ones_resolve_through_it(bank_stack):
    """The direct channel applies debits but loses every answer: those payments are
    UNKNOWN, never moved (the bank may hold them there), and the resolver refunds each
    through direct; meanwhile the breaker opens and new payments go through clearing and
    succeed. No fen is taken without being booked or given back."""
    n_users = 3
    asked = ([(i, k) for i in range(n_users) for k in range(3)] + [(0, k) for k in range(3, 12)]
             + [(i, k) for i in range(n_users) for k in range(12, 15)])

    async def scenario():
        async with Client(bank_stack.target) as c:
            await top_ups(c, bank_stack, n_users, range(3))
            await faults(bank_stack, "icbc", channel="direct", lost_response_rate=1.0)
            # One at a time: five unclear results in a row open the direct breaker.
            await top_ups(c, bank_stack, 1, range(3, 12))
            await top_ups(c, bank_stack, n_users, range(12, 15))
            rows = await qos_rows(c, bank_stack, "icbc")
            await faults(bank_stack, "icbc", channel="direct")
            final = await settle_all(c)
            return rows, final, await channel_stats(bank_stack, "icbc"), await card_balance(
                bank_stack, ICBC)

    async def settle_all(c: Client) -> list:
        """Asks again with the same request ids until no top-up is open."""
        deadline = asyncio.get_running_loop().time() + 25
        while True:
            again = []
            for i, k in asked:
                again.append((await c.wallet.TopUp(PS.TopUpRequest(
                    request_id=f"t{i}-{k}", card_id=ICBC, amount_fen=100 + k),
                    metadata=bank_stack.meta(f"u{i}"), timeout=10), 100 + k))
            if all(r.status not in (PS.PAYMENT_STATUS_PENDING, PS.PAYMENT_STATUS_UNKNOWN)
                   for r, _ in again):
                return again
            assert asyncio.get_running_loop().time() < deadline, "payments still open"
            await asyncio.sleep(0.3)

    rows, final, chans, card = run(scenario())
    statuses = Counter(r.status for r, _ in final)
    assert set(statuses) <= {PS.PAYMENT_STATUS_SUCCEEDED, PS.PAYMENT_STATUS_REFUNDED}
    assert statuses[PS.PAYMENT_STATUS_REFUNDED] >= 5, statuses  # the breaker needs 5
    assert statuses[PS.PAYMENT_STATUS_SUCCEEDED] > 0
    kept = sum(fen for r, fen in final if r.status == PS.PAYMENT_STATUS_SUCCEEDED)
    assert card == CARD_OPENING_FEN - kept
    # The refunds were made where the debits were: through direct.
    assert chans["direct"].refunds == statuses[PS.PAYMENT_STATUS_REFUNDED]
    assert chans["clearing"].refunds == 0 and chans["clearing"].debits_settled > 0
    assert rows["direct"].breaker_state in ("open", "half_open")
    # Named at the intent: once direct was open, payments started on clearing.
    assert rows["clearing"].calls > 0


async def bind(c: Client, meta, card: str) -> None:
    await c.wallet.BindCard(PS.BindCardRequest(request_id=f"bind-{card}", card_id=card),
                            metadata=meta, timeout=5)


def test_whole_bank_down_auto_completes_on_the_second_card(bank_stack):
    """A user with two bound cards (icbc preferred) and no balance sends envelopes AUTO
    while icbc is down on every channel: each completes on the ccb card; the early ones
    tried icbc first and say so (CARD_SWITCHED); once both icbc breakers are open icbc is
    passed over without a payment. CARD with the icbc card is then refused at once,
    BANK_CIRCUIT_OPEN naming the ccb card, and nothing is saved. A retry of an AUTO send
    answers the same envelope. icbc's card is never charged."""
    n_sends, total = 10, 600

    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("amy")
            await bind(c, u, ICBC)
            await bind(c, u, CCB)  # added last: icbc stays the preferred card
            await faults(bank_stack, "icbc", down=True)
            sent = [await send(c, u, total, 3, rid=f"auto{i}") for i in range(n_sends)]
            again = await send(c, u, total, 3, rid="auto0")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await send(c, u, total, 3, rid="by-icbc", card_id=ICBC,
                           pay_method=envelope_pb2.PAY_METHOD_CARD)
            # Another user whose only card is icbc's: AUTO says the bank, not the balance.
            solo = bank_stack.meta("solo")
            await bind(c, solo, ICBC)
            with pytest.raises(grpc.aio.AioRpcError) as no_card:
                await send(c, solo, total, 3, rid="solo")
            feed = await _take(c, u, 0, n_sends + 1, timeout_s=3)
            cards = (await card_balance(bank_stack, ICBC), await card_balance(bank_stack, CCB))
            rows = await qos_rows(c, bank_stack, "icbc")
            await faults(bank_stack, "icbc")
            return sent, again, refused.value, feed, cards, rows, no_card.value

    sent, again, refused, feed, (icbc, ccb), rows, no_card = run(scenario())
    assert reason_of(no_card) == "BANK_CIRCUIT_OPEN", reason_of(no_card)
    assert all(s.paid_via == envelope_pb2.PAY_METHOD_CARD
               and s.status == envelope_pb2.ENVELOPE_STATUS_ACTIVE for s in sent)
    assert again.envelope_id == sent[0].envelope_id
    assert icbc == CARD_OPENING_FEN and ccb == CARD_OPENING_FEN - n_sends * total
    switched = [n for n in feed if n.kind == notification_pb2.NOTIFICATION_KIND_CARD_SWITCHED]
    assert 1 <= len(switched) < n_sends, "the first sends tried icbc; later ones passed it"
    assert all(ICBC in n.message and CCB in n.message for n in switched)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(refused) == "BANK_CIRCUIT_OPEN"
    assert metadata_of(refused)["other_cards"] == CCB
    assert {h.breaker_state for h in rows.values()} == {"open"}


def test_auto_moves_on_after_a_decline_and_never_after_an_unclear_result(bank_stack):
    """A declined first card hands over to the next one; a first card whose answer was
    lost does not (the bank may have taken the money): that send stays with icbc, is
    resolved (refunded), and ccb is not charged for it."""
    async def scenario():
        async with Client(bank_stack.target) as c:
            u = bank_stack.meta("bea")
            await bind(c, u, ICBC)
            await bind(c, u, CCB)
            await faults(bank_stack, "icbc", decline_rate=1.0)
            declined = await send(c, u, 500, 2, rid="d1")
            await faults(bank_stack, "icbc", lost_response_rate=1.0)
            unclear = await send(c, u, 700, 2, rid="l1")
            await faults(bank_stack, "icbc")
            deadline = asyncio.get_running_loop().time() + 15
            while (await send(c, u, 700, 2, rid="l1")).status != \
                    envelope_pb2.ENVELOPE_STATUS_REFUNDED:
                assert asyncio.get_running_loop().time() < deadline, "never resolved"
                await asyncio.sleep(0.2)
            return declined, unclear, (await card_balance(bank_stack, ICBC),
                                       await card_balance(bank_stack, CCB))

    declined, unclear, (icbc, ccb) = run(scenario())
    assert declined.status == envelope_pb2.ENVELOPE_STATUS_ACTIVE
    assert unclear.status == envelope_pb2.ENVELOPE_STATUS_PAY_UNKNOWN
    assert ccb == CARD_OPENING_FEN - 500, "only the declined send moved to ccb"
    assert icbc == CARD_OPENING_FEN, "the unclear one was refunded to icbc"
