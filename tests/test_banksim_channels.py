"""The bank simulator's two channels per bank (direct, clearing house): a real process, port 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from banksim.v1 import bank_pb2 as pb
from tests.banksim_helpers import reason_of, running_banksim, start_banksim
from tests.test_banksim import CALL_TIMEOUT_S, Bank, card, failure, oid, wait_for

DIRECT = pb.CHANNEL_DIRECT
CLEARING = pb.CHANNEL_CLEARING
SETTLED = pb.ORDER_STATUS_SETTLED
OPENING_FEN = 10_000
# One bank per test that sets faults, so their settings and counters never meet.
BANKS = "icbc,ccb,same,wrong,down,dec,stat,crash,late"


class Channels(Bank):
    """The test client, with a channel on every call."""

    def debit_on(self, channel: int, order_id: str, card_id: str, amount_fen: int,
                 timeout: float = CALL_TIMEOUT_S) -> pb.DebitResponse:
        req = pb.DebitRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen,
                              channel=channel)
        return self.svc.Debit(req, timeout=timeout)

    def credit_on(self, channel: int, order_id: str, card_id: str,
                  amount_fen: int) -> pb.CreditResponse:
        req = pb.CreditRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen,
                               channel=channel)
        return self.svc.Credit(req, timeout=CALL_TIMEOUT_S)

    def query_on(self, channel: int, order_id: str) -> pb.QueryOrderResponse:
        req = pb.QueryOrderRequest(order_id=order_id, channel=channel)
        return self.svc.QueryOrder(req, timeout=CALL_TIMEOUT_S)

    def void_on(self, channel: int, order_id: str) -> pb.VoidOrderResponse:
        req = pb.VoidOrderRequest(order_id=order_id, channel=channel)
        return self.svc.VoidOrder(req, timeout=CALL_TIMEOUT_S)

    def refund_on(self, channel: int, order_id: str) -> pb.RefundResponse:
        req = pb.RefundRequest(order_id=order_id, channel=channel)
        return self.svc.Refund(req, timeout=CALL_TIMEOUT_S)

    def set_channel_faults(self, bank_id: str, channel: int, down: bool = False,
                           **faults: float) -> pb.SetFaultsResponse:
        req = pb.SetFaultsRequest(bank_id=bank_id, channel=channel, down=down,
                                  faults=pb.FaultConfig(**faults))
        return self.admin.SetFaults(req, timeout=CALL_TIMEOUT_S)

    def channel_stats(self, bank_id: str) -> dict[int, pb.ChannelStats]:
        return {c.channel: c for c in self.bank_stats(bank_id).channels}


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Iterator[Channels]:
    """One simulator with both channels (the default) for the semantic and fault tests."""
    root = tmp_path_factory.mktemp("banksim-channels")
    with running_banksim(root, "--banks", BANKS, "--card-balance-fen", str(OPENING_FEN),
                         "--seed", "11") as (_, port):
        b = Channels(port)
        try:
            yield b
        finally:
            b.channel.close()


def _wrong_channel(err: grpc.RpcError, owner: str) -> None:
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.FAILED_PRECONDITION, "WRONG_CHANNEL")
    assert f"belongs to the {owner} channel" in (err.details() or "")


def test_a_debit_through_clearing_debits_the_same_card(bank):
    """Debits through either channel take from the one card and the one merchant balance."""
    c, o1, o2 = card("same"), oid(), oid()
    before = bank.stats()
    assert bank.debit_on(DIRECT, o1, c, 300).status == SETTLED
    r = bank.debit_on(CLEARING, o2, c, 200)
    assert (r.status, r.bank_id) == (SETTLED, "same")
    assert bank.balance(c) == OPENING_FEN - 500
    q = bank.query_on(CLEARING, o2)
    assert (q.status, q.card_id, q.amount_fen, q.channel) == (SETTLED, c, 200, CLEARING)
    assert bank.query(o1).channel == DIRECT, "an old caller's query is the direct channel's"
    assert bank.credit_on(CLEARING, oid(), c, 50).status == SETTLED
    after = bank.stats()
    assert after.merchant_balance_fen - before.merchant_balance_fen == 450
    assert after.books_balance
    assert bank.refund_on(CLEARING, o2).status == pb.ORDER_STATUS_REFUNDED
    assert bank.balance(c) == OPENING_FEN - 250


def test_an_order_id_of_one_channel_is_refused_through_the_other(bank):
    """The same order id through the other channel is WRONG_CHANNEL and moves nothing."""
    c, o = card("wrong"), oid()
    assert bank.debit(o, c, 300).status == SETTLED  # no channel: direct
    before = bank.stats()
    for call in (lambda: bank.debit_on(CLEARING, o, c, 300),
                 lambda: bank.credit_on(CLEARING, o, c, 300),
                 lambda: bank.query_on(CLEARING, o),
                 lambda: bank.void_on(CLEARING, o),
                 lambda: bank.refund_on(CLEARING, o)):
        _wrong_channel(failure(call), "direct")
    after = bank.stats()
    assert bank.balance(c) == OPENING_FEN - 300
    assert (after.orders, after.total_debited_fen, after.total_refunded_fen) == (
        before.orders, before.total_debited_fen, before.total_refunded_fen)
    assert bank.query_on(DIRECT, o).status == SETTLED

    on_clearing = oid()
    assert bank.debit_on(CLEARING, on_clearing, c, 100).status == SETTLED
    _wrong_channel(failure(bank.debit, on_clearing, c, 100), "clearing")
    _wrong_channel(failure(bank.refund, on_clearing), "clearing")
    assert bank.balance(c) == OPENING_FEN - 400


def test_a_voided_unknown_id_belongs_to_the_channel_that_voided_it(bank):
    """VoidOrder locks an unknown id on its channel; a Debit through the other is WRONG_CHANNEL."""
    c, o = card("wrong"), oid()
    assert bank.void_on(CLEARING, o).status == pb.ORDER_STATUS_VOIDED
    _wrong_channel(failure(bank.debit, o, c, 100), "clearing")
    r = bank.debit_on(CLEARING, o, c, 100)
    assert (r.status, r.decline_reason) == (pb.ORDER_STATUS_DECLINED,
                                            pb.DECLINE_REASON_ORDER_VOIDED)
    assert bank.balance(c) == OPENING_FEN


def test_direct_down_leaves_clearing_serving(bank):
    """A direct channel taken down answers UNAVAILABLE CHANNEL_DOWN at once; clearing serves."""
    c = card("down")
    settled = oid()
    assert bank.debit_on(DIRECT, settled, c, 10).status == SETTLED
    bank.set_channel_faults("down", DIRECT, down=True)
    o = oid()
    start = time.monotonic()
    err = failure(bank.debit, o, c, 100)
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "CHANNEL_DOWN")
    assert time.monotonic() - start < 1.0
    assert failure(bank.query, settled).code() == grpc.StatusCode.UNAVAILABLE
    assert bank.query_on(CLEARING, o).status == pb.ORDER_STATUS_NOT_FOUND, "nothing recorded"
    assert bank.debit_on(CLEARING, o, c, 100).status == SETTLED
    assert bank.balance(c) == OPENING_FEN - 110
    stats = bank.channel_stats("down")
    assert (stats[DIRECT].down, stats[CLEARING].down) == (True, False)
    assert (stats[DIRECT].refused_while_down, stats[CLEARING].refused_while_down) == (2, 0)
    bank.set_channel_faults("down", DIRECT)
    assert bank.query(settled).status == SETTLED


def test_faults_set_on_direct_only_leave_clearing_healthy(bank):
    """SetFaults naming the direct channel changes direct alone; naming none changes both."""
    bank.set_channel_faults("dec", DIRECT, decline_rate=1.0, latency_ms=1)
    c = card("dec")
    assert bank.debit(oid(), c, 100).decline_reason == pb.DECLINE_REASON_DECLINED
    assert bank.debit_on(CLEARING, oid(), c, 100).status == SETTLED
    stats = bank.channel_stats("dec")
    assert (stats[DIRECT].faults.decline_rate, stats[CLEARING].faults.decline_rate) == (1, 0)
    assert (stats[DIRECT].declines_injected, stats[CLEARING].declines_injected) == (1, 0)
    bank.set_faults("dec", latency_ms=3)  # an old caller: no channel
    stats = bank.channel_stats("dec")
    assert {ch: (s.faults.latency_ms, s.faults.decline_rate) for ch, s in stats.items()} == {
        DIRECT: (3, 0), CLEARING: (3, 0)}
    bank.set_faults("dec")


def test_stats_report_each_channel_and_their_totals(bank):
    """GetStats lists both channels per bank; the bank's counters are their sums."""
    c = card("stat")
    for _ in range(3):
        assert bank.debit(oid(), c, 1).status == SETTLED
    for _ in range(2):
        assert bank.credit_on(CLEARING, oid(), c, 1).status == SETTLED
    total = bank.bank_stats("stat")
    per = {s.channel: s for s in total.channels}
    assert list(per) == [DIRECT, CLEARING]
    assert (per[DIRECT].requests, per[DIRECT].debits_settled, per[DIRECT].credits_settled) == (
        3, 3, 0)
    assert (per[CLEARING].requests, per[CLEARING].debits_settled,
            per[CLEARING].credits_settled) == (2, 0, 2)
    assert (total.requests, total.debits_settled, total.credits_settled) == (5, 3, 2)
    assert total.peak_tps >= max(per[DIRECT].peak_tps, per[CLEARING].peak_tps)
    assert not total.collapsed


def test_one_channel_collapsing_leaves_the_other_serving(bank):
    """Driven past capacity, the direct channel collapses; clearing answers all along."""
    bank.set_channel_faults("crash", DIRECT, capacity_tps=10, collapse_after_s=0.8,
                            collapse_for_s=2.0)
    c = card("crash")
    deadline = time.monotonic() + 4.0
    while not bank.channel_stats("crash")[DIRECT].collapsed:
        assert time.monotonic() < deadline, "the direct channel never collapsed"
        futures = [bank.svc.Debit.future(pb.DebitRequest(order_id=oid(), card_id=c,
                                                         amount_fen=1), timeout=0.3)
                   for _ in range(20)]
        for f in futures:
            f.exception()
        time.sleep(0.05)
    err = failure(bank.debit, oid(), c, 1, timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert bank.debit_on(CLEARING, oid(), c, 1).status == SETTLED
    stats = bank.bank_stats("crash")
    per = {s.channel: s for s in stats.channels}
    assert stats.collapsed and per[DIRECT].collapsed and not per[CLEARING].collapsed
    assert (per[DIRECT].collapses, per[CLEARING].collapses) == (1, 0)
    assert per[CLEARING].rejected_over_capacity == 0
    assert wait_for(lambda: not bank.channel_stats("crash")[DIRECT].collapsed, timeout_s=4.0)
    bank.set_faults("crash")


def test_a_late_debit_belongs_to_its_channel_before_it_lands(bank):
    """A late debit waiting on clearing: a void via direct is refused, via clearing it locks."""
    bank.set_channel_faults("late", CLEARING, late_debit_rate=1.0, late_debit_delay_ms=400)
    c, o = card("late"), oid()
    err = failure(bank.debit_on, CLEARING, o, c, 600)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wrong_channel(failure(bank.void, o), "clearing")
    _wrong_channel(failure(bank.debit, o, c, 600), "clearing")
    assert bank.void_on(CLEARING, o).status == pb.ORDER_STATUS_VOIDED
    time.sleep(0.8)
    q = bank.query_on(CLEARING, o)
    assert (q.status, q.channel, q.amount_fen) == (pb.ORDER_STATUS_VOIDED, CLEARING, 600)
    assert bank.balance(c) == OPENING_FEN
    bank.set_faults("late")


def test_an_unknown_channel_number_is_invalid_argument(bank):
    """A channel number the protocol does not define is INVALID_ARGUMENT UNKNOWN_CHANNEL."""
    err = failure(bank.debit_on, 7, oid(), card(), 1)
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_CHANNEL")


def test_channel_flags_capacity_and_the_channel_survive_a_restart(tmp_path):
    """--capacity-tps applies per channel unless --channel-capacity-tps names one; a clearing
    order's channel is durable across kill -9."""
    args = ("--capacity-tps", "100", "--channel-capacity-tps", "clearing=500")
    proc, port = start_banksim(tmp_path, *args)
    c, o = card(), oid()
    try:
        b = Channels(port)
        per = b.channel_stats("icbc")
        assert (per[DIRECT].faults.capacity_tps, per[CLEARING].faults.capacity_tps) == (100, 500)
        assert b.debit_on(CLEARING, o, c, 700).status == SETTLED
        b.channel.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with running_banksim(tmp_path, "--channels", "clearing") as (_, port):
        b = Channels(port)
        assert [s.channel for s in b.bank_stats("icbc").channels] == [CLEARING]
        assert b.query_on(CLEARING, o).channel == CLEARING
        assert b.balance(c) == 1_000_000 - 700
        err = failure(b.debit, oid(), c, 1)
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                "UNKNOWN_CHANNEL")
        b.channel.close()


def test_config_file_channels_section_sets_each_channel(tmp_path):
    """The config's channels object names the channels and their own settings, down included;
    a flag still overrides the file."""
    config = tmp_path / "bank.json"
    config.write_text(json.dumps({
        "banks": ["icbc"], "latency_ms": 1, "capacity_tps": 100,
        "channels": {"direct": {}, "clearing": {"capacity_tps": 300, "down": True}},
    }))
    with running_banksim(tmp_path, "--config", str(config), "--latency-ms", "2") as (_, port):
        b = Channels(port)
        per = b.channel_stats("icbc")
        assert {ch: (s.faults.capacity_tps, s.faults.latency_ms, s.down)
                for ch, s in per.items()} == {DIRECT: (100, 2, False), CLEARING: (300, 2, True)}
        err = failure(b.debit_on, CLEARING, oid(), card(), 1)
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "CHANNEL_DOWN")
        assert b.debit(oid(), card(), 1).status == SETTLED
        b.channel.close()


@pytest.mark.parametrize("args", [
    ("--channels", "direct,satellite"),
    ("--channels", "direct,direct"),
    ("--channel-capacity-tps", "clearing"),
    ("--channels", "direct", "--channel-capacity-tps", "clearing=5"),
])
def test_bad_channel_settings_exit_2_before_serving(tmp_path, args):
    """An unknown or repeated channel, or a capacity for a channel not served, exits 2."""
    done = subprocess.run([sys.executable, "-m", "banksim", "--data-dir", str(tmp_path / "d"),
                           *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "banksim:" in done.stderr


def test_two_first_calls_racing_through_both_channels_move_money_once(tmp_path):
    """In the ledger, the first write of an order id wins; the other channel's is WRONG_CHANNEL."""
    from banksim._errors import FailedPrecondition
    from banksim._ledger import Ledger, Payload
    from banksim._model import Channel, OrderKind

    async def race(led: Ledger) -> list[object]:
        return await asyncio.gather(*(
            led.move("race-1", Payload(OrderKind.DEBIT, "icbc-1", 5, ch), inject_decline=False)
            for ch in (Channel.CLEARING, Channel.DIRECT)), return_exceptions=True)

    led = Ledger(str(tmp_path / "race"), opening_fen=100, map_size=1 << 20)
    try:
        first, second = asyncio.run(race(led))
        assert not isinstance(first, BaseException) and isinstance(second, FailedPrecondition)
        assert second.reason == "WRONG_CHANNEL"
        record = led.order("race-1")
        assert record is not None and record.channel == Channel.CLEARING
        snap = led.snapshot()
        assert (snap.debited_fen, snap.orders) == (5, 1) and snap.books_balance
    finally:
        led.close()


def _money(s: pb.ChannelStats) -> tuple[int, int, int, int]:
    return s.debited_fen, s.credited_fen, s.refunded_fen, s.merchant_balance_fen


def _money_by_channel(b: Channels, banks: tuple[str, ...]) -> dict[tuple[str, int], tuple]:
    return {(bank_id, ch): _money(s) for bank_id in banks
            for ch, s in b.channel_stats(bank_id).items()}


def _check_sums(stats: pb.GetStatsResponse) -> None:
    """Over every bank and channel, the channel totals are GetStats' totals."""
    per = [s for bank in stats.banks for s in bank.channels]
    assert (sum(s.debited_fen for s in per), sum(s.credited_fen for s in per),
            sum(s.refunded_fen for s in per), sum(s.merchant_balance_fen for s in per)) == (
        stats.total_debited_fen, stats.total_credited_fen, stats.total_refunded_fen,
        stats.merchant_balance_fen)


def test_money_per_channel_is_exact_sums_to_the_totals_and_survives_kill_9(tmp_path):
    """Debits, credits and refunds count on their bank and channel (a refund on its debit's),
    declines and voids count nowhere, and the totals are the same after kill -9 and a restart."""
    args = ("--banks", "icbc,ccb", "--card-balance-fen", str(OPENING_FEN))
    proc, port = start_banksim(tmp_path, *args)
    i1, i2, c1 = card("icbc"), card("icbc"), card("ccb")
    refund_later = oid()
    try:
        b = Channels(port)
        zero = (0, 0, 0, 0)
        assert set(_money_by_channel(b, ("icbc", "ccb")).values()) == {zero}
        o_direct, o_clearing = oid(), oid()
        assert b.debit_on(DIRECT, o_direct, i1, 300).status == SETTLED
        assert b.debit(oid(), i2, 40).status == SETTLED  # no channel: direct
        assert b.debit_on(CLEARING, o_clearing, i1, 200).status == SETTLED
        assert b.debit_on(CLEARING, refund_later, c1, 700).status == SETTLED
        assert b.debit_on(DIRECT, oid(), c1, 50).status == SETTLED
        assert b.credit_on(CLEARING, oid(), i2, 120).status == SETTLED
        assert b.credit_on(DIRECT, oid(), c1, 1_000).status == SETTLED
        assert b.refund_on(CLEARING, o_clearing).status == pb.ORDER_STATUS_REFUNDED
        assert b.refund_on(CLEARING, o_clearing).status == pb.ORDER_STATUS_REFUNDED  # a repeat
        declined = b.debit_on(CLEARING, oid(), i1, OPENING_FEN)
        assert declined.decline_reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS
        assert b.void_on(CLEARING, oid()).status == pb.ORDER_STATUS_VOIDED
        expected = {("icbc", DIRECT): (340, 0, 0, 340), ("icbc", CLEARING): (200, 120, 200, -120),
                    ("ccb", DIRECT): (50, 1_000, 0, -950), ("ccb", CLEARING): (700, 0, 0, 700)}
        assert _money_by_channel(b, ("icbc", "ccb")) == expected
        stats = b.stats()
        assert (stats.total_debited_fen, stats.total_credited_fen, stats.total_refunded_fen,
                stats.merchant_balance_fen) == (1_290, 1_120, 200, -30)
        _check_sums(stats)
        assert stats.books_balance
        reply = b.set_channel_faults("ccb", CLEARING)  # SetFaults answers the money too
        assert {c.channel: _money(c) for c in reply.banks[0].channels} == {
            DIRECT: expected["ccb", DIRECT], CLEARING: expected["ccb", CLEARING]}
        b.channel.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with running_banksim(tmp_path, *args) as (_, port):
        b = Channels(port)
        assert _money_by_channel(b, ("icbc", "ccb")) == expected
        _check_sums(b.stats())
        assert b.refund_on(CLEARING, refund_later).status == pb.ORDER_STATUS_REFUNDED
        assert b.channel_stats("ccb")[CLEARING].refunded_fen == 700
        after = b.stats()
        _check_sums(after)
        assert after.total_refunded_fen == 900 and after.books_balance
        b.channel.close()


def test_a_ledger_from_before_channel_totals_opens_with_them_recounted(tmp_path):
    """A schema-1 ledger (bank-wide totals only) gets its per-channel totals from its orders at
    open: an order from before channels is direct's; a disagreeing ledger does not open."""
    from banksim import _ledger
    from banksim._ledger import ChannelTotals, Ledger, Payload
    from banksim._model import Channel, OrderKind

    async def book(led: Ledger) -> None:
        for order_id, kind, card_id, amount, ch in (
            ("d1", OrderKind.DEBIT, "icbc-1", 300, Channel.DIRECT),
            ("d2", OrderKind.DEBIT, "icbc-1", 200, Channel.CLEARING),
            ("d3", OrderKind.DEBIT, "ccb-1", 70, Channel.DIRECT),
            ("c1", OrderKind.CREDIT, "icbc-2", 90, Channel.CLEARING),
            ("no", OrderKind.DEBIT, "icbc-1", 10_000, Channel.CLEARING),  # declined
        ):
            await led.move(order_id, Payload(kind, card_id, amount, ch), inject_decline=False)
        await led.refund("d2", Channel.CLEARING)
        await led.refund("d3", Channel.DIRECT)

    def to_schema_1(led: Ledger) -> None:
        """What a ledger written before per-channel totals holds: no channel keys, schema 1."""
        with led._env.begin(write=True) as txn:
            keys = [bytes(k) for k, _ in txn.cursor(db=led._totals)
                    if bytes(k).startswith(_ledger.CHANNEL_TOTALS)]
            assert keys
            for key in keys:
                txn.delete(key, db=led._totals)
            txn.put(b"schema", b"1", db=led._meta)

    path = str(tmp_path / "old")
    led = Ledger(path, opening_fen=1_000, map_size=1 << 20)
    asyncio.run(book(led))
    before = led.snapshot()
    assert before.by_channel == {
        ("ccb", Channel.DIRECT): ChannelTotals(70, 0, 70),
        ("icbc", Channel.DIRECT): ChannelTotals(300, 0, 0),
        ("icbc", Channel.CLEARING): ChannelTotals(200, 90, 200),
    }
    assert before.channels_add_up and before.channel(Channel.DIRECT) == ChannelTotals(370, 0, 70)
    to_schema_1(led)
    assert led.snapshot().by_channel == {}
    led.close()

    led = Ledger(path, opening_fen=1_000, map_size=1 << 20)
    try:
        after = led.snapshot()
        assert after.by_channel == before.by_channel and after.channels_add_up
        with led._env.begin() as txn:
            assert txn.get(b"schema", db=led._meta) == _ledger.SCHEMA
        to_schema_1(led)
        with led._env.begin(write=True) as txn:
            led._add(txn, _ledger.DEBITED, 1)  # the bank-wide total no longer matches the orders
    finally:
        led.close()
    with pytest.raises(RuntimeError, match="debited_fen is 571 but its orders sum to 570"):
        Ledger(path, opening_fen=1_000, map_size=1 << 20)
