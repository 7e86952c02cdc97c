"""The bank simulator as a real process: real LMDB, real gRPC over loopback, port 0."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from banksim.v1 import bank_pb2 as pb
from banksim.v1 import bank_pb2_grpc
from tests.banksim_helpers import reason_of, running_banksim, start_banksim, stop_banksim

SETTLED = pb.ORDER_STATUS_SETTLED
DECLINED = pb.ORDER_STATUS_DECLINED
VOIDED = pb.ORDER_STATUS_VOIDED
REFUNDED = pb.ORDER_STATUS_REFUNDED
NOT_FOUND = pb.ORDER_STATUS_NOT_FOUND
OPENING_FEN = 10_000
# One bank per fault test, so their settings and counters never meet.
BANKS = "icbc,ccb,abc,boc,lost,late,tmo,dec,slow,cap,crash"
CALL_TIMEOUT_S = 5.0

_ids = itertools.count()


def oid(prefix: str = "o") -> str:
    return f"{prefix}-{next(_ids)}-{time.monotonic_ns()}"


def card(bank: str = "icbc") -> str:
    return f"{bank}-{next(_ids):06d}"


class Bank:
    """Sync stubs for one simulator process, with short names for the calls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.svc = bank_pb2_grpc.BankServiceStub(self.channel)
        self.admin = bank_pb2_grpc.BankAdminServiceStub(self.channel)

    def debit(self, order_id: str, card_id: str, amount_fen: int, timeout: float = CALL_TIMEOUT_S):
        req = pb.DebitRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen)
        return self.svc.Debit(req, timeout=timeout)

    def credit(self, order_id: str, card_id: str, amount_fen: int,
               timeout: float = CALL_TIMEOUT_S):
        req = pb.CreditRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen)
        return self.svc.Credit(req, timeout=timeout)

    def query(self, order_id: str, timeout: float = CALL_TIMEOUT_S):
        return self.svc.QueryOrder(pb.QueryOrderRequest(order_id=order_id), timeout=timeout)

    def void(self, order_id: str):
        return self.svc.VoidOrder(pb.VoidOrderRequest(order_id=order_id), timeout=CALL_TIMEOUT_S)

    def refund(self, order_id: str):
        return self.svc.Refund(pb.RefundRequest(order_id=order_id), timeout=CALL_TIMEOUT_S)

    def balance(self, card_id: str) -> int:
        return self.admin.GetCard(pb.GetCardRequest(card_id=card_id),
                                  timeout=CALL_TIMEOUT_S).balance_fen

    def stats(self) -> pb.GetStatsResponse:
        return self.admin.GetStats(pb.GetStatsRequest(), timeout=CALL_TIMEOUT_S)

    def bank_stats(self, bank_id: str) -> pb.BankStats:
        return next(b for b in self.stats().banks if b.bank_id == bank_id)

    def set_faults(self, bank_id: str, **faults: float) -> pb.SetFaultsResponse:
        req = pb.SetFaultsRequest(bank_id=bank_id, faults=pb.FaultConfig(**faults))
        return self.admin.SetFaults(req, timeout=CALL_TIMEOUT_S)


def failure(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def wait_for(predicate, timeout_s: float = 5.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Iterator[Bank]:
    """One simulator for the semantic and per-bank fault tests."""
    root = tmp_path_factory.mktemp("banksim")
    with running_banksim(root, "--banks", BANKS, "--card-balance-fen", str(OPENING_FEN),
                         "--seed", "7") as (_, port):
        b = Bank(port)
        try:
            yield b
        finally:
            b.channel.close()


# -- Debit / Credit / QueryOrder ---------------------------------------------------------------


def test_debit_settles_and_moves_money(bank):
    """A Debit within the balance settles, names its bank and moves card money to the merchant."""
    c, o = card(), oid()
    r = bank.debit(o, c, 300)
    assert (r.order_id, r.status, r.bank_id) == (o, SETTLED, "icbc")
    assert bank.balance(c) == OPENING_FEN - 300
    q = bank.query(o)
    assert (q.status, q.kind, q.card_id, q.amount_fen, q.bank_id) == (
        SETTLED, pb.ORDER_KIND_DEBIT, c, 300, "icbc")


def test_debit_repeat_answers_recorded_result_once(bank):
    """Repeating a Debit with the same payload answers SETTLED again and moves no more money."""
    c, o = card(), oid()
    assert bank.debit(o, c, 500).status == SETTLED
    for _ in range(3):
        assert bank.debit(o, c, 500).status == SETTLED
    assert bank.balance(c) == OPENING_FEN - 500


def test_order_id_reused_with_another_payload_changes_nothing(bank):
    """The same order id with another amount, card or kind is DECLINED ORDER_ID_REUSED."""
    c, o = card(), oid()
    assert bank.debit(o, c, 100).status == SETTLED
    for r in (bank.debit(o, c, 101), bank.debit(o, card(), 100), bank.credit(o, c, 100)):
        assert (r.status, r.decline_reason) == (DECLINED, pb.DECLINE_REASON_ORDER_ID_REUSED)
    assert bank.balance(c) == OPENING_FEN - 100
    assert bank.query(o).amount_fen == 100


def test_insufficient_funds_is_recorded_and_repeats(bank):
    """A Debit over the balance is DECLINED INSUFFICIENT_FUNDS, and stays so after a top-up."""
    c, o = card("ccb"), oid()
    r = bank.debit(o, c, OPENING_FEN + 1)
    assert (r.status, r.decline_reason) == (DECLINED, pb.DECLINE_REASON_INSUFFICIENT_FUNDS)
    assert bank.credit(oid(), c, 5).status == SETTLED
    r = bank.debit(o, c, OPENING_FEN + 1)
    assert (r.status, r.decline_reason) == (DECLINED, pb.DECLINE_REASON_INSUFFICIENT_FUNDS)
    assert bank.query(o).status == DECLINED
    assert bank.balance(c) == OPENING_FEN + 5


def test_credit_pays_the_card_from_the_merchant(bank):
    """A Credit settles, adds to the card, and a repeat adds nothing."""
    c, o = card("abc"), oid()
    before = bank.stats()
    assert bank.credit(o, c, 777).status == SETTLED
    assert bank.credit(o, c, 777).status == SETTLED
    assert bank.balance(c) == OPENING_FEN + 777
    after = bank.stats()
    assert after.total_credited_fen - before.total_credited_fen == 777
    assert bank.query(o).kind == pb.ORDER_KIND_CREDIT


def test_query_unknown_order_is_not_found(bank):
    """QueryOrder of an id the bank never saw answers status NOT_FOUND."""
    q = bank.query(oid("never"))
    assert q.status == NOT_FOUND and not q.card_id


@pytest.mark.parametrize(("order_id", "card_id", "amount_fen", "reason"), [
    ("ok-1", "zzz-1", 1, "UNKNOWN_BANK"),
    ("ok-1", "icbc1", 1, "INVALID_CARD_ID"),
    ("ok-1", "icbc-", 1, "INVALID_CARD_ID"),
    ("ok-1", "icbc-" + "1" * 33, 1, "INVALID_CARD_ID"),
    ("ok-1", "ICBC-1", 1, "INVALID_CARD_ID"),
    ("", "icbc-1", 1, "INVALID_ORDER_ID"),
    ("x" * 65, "icbc-1", 1, "INVALID_ORDER_ID"),
    ("bad id", "icbc-1", 1, "INVALID_ORDER_ID"),
    ("ok-1", "icbc-1", 0, "INVALID_AMOUNT"),
    ("ok-1", "icbc-1", -5, "INVALID_AMOUNT"),
    ("ok-1", "icbc-1", 10**12 + 1, "INVALID_AMOUNT"),
])
def test_bad_input_is_invalid_argument(bank, order_id, card_id, amount_fen, reason):
    """Malformed ids, unknown banks and amounts outside 1..10^12 fail INVALID_ARGUMENT."""
    for call in (bank.debit, bank.credit):
        err = failure(call, order_id, card_id, amount_fen)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err) == reason


def test_largest_amount_is_accepted(bank):
    """amount_fen == 10^12 is valid input (and declined only for funds)."""
    r = bank.debit(oid(), card(), 10**12)
    assert r.decline_reason == pb.DECLINE_REASON_INSUFFICIENT_FUNDS


def test_bad_order_id_in_query_void_refund(bank):
    """QueryOrder, VoidOrder and Refund refuse a malformed order id with INVALID_ARGUMENT."""
    for call in (bank.query, bank.void, bank.refund):
        err = failure(call, "no spaces")
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                "INVALID_ORDER_ID")


# -- VoidOrder / Refund ------------------------------------------------------------------------


def test_void_unknown_id_locks_it_forever(bank):
    """Voiding an unseen id records it VOIDED; a later Debit with it is DECLINED ORDER_VOIDED."""
    c, o = card(), oid()
    assert bank.void(o).status == VOIDED
    r = bank.debit(o, c, 100)
    assert (r.status, r.decline_reason) == (DECLINED, pb.DECLINE_REASON_ORDER_VOIDED)
    assert bank.query(o).status == VOIDED
    assert bank.void(o).status == VOIDED
    assert bank.balance(c) == OPENING_FEN


def test_void_declined_becomes_voided(bank):
    """A DECLINED order becomes VOIDED, and its repeat Debit answers ORDER_VOIDED."""
    c, o = card(), oid()
    assert bank.debit(o, c, OPENING_FEN * 2).status == DECLINED
    assert bank.void(o).status == VOIDED
    assert bank.query(o).status == VOIDED
    assert bank.debit(o, c, OPENING_FEN * 2).decline_reason == pb.DECLINE_REASON_ORDER_VOIDED


def test_void_settled_or_refunded_changes_nothing(bank):
    """Voiding a settled order answers SETTLED (REFUNDED after a refund) and moves nothing."""
    c, o = card(), oid()
    assert bank.debit(o, c, 250).status == SETTLED
    assert bank.void(o).status == SETTLED
    assert bank.query(o).status == SETTLED
    assert bank.refund(o).status == REFUNDED
    assert bank.void(o).status == REFUNDED
    assert bank.balance(c) == OPENING_FEN


def test_refund_returns_a_settled_debit_once(bank):
    """Refund gives a settled debit back to its card; a repeat answers REFUNDED, moving nothing."""
    c, o = card(), oid()
    before = bank.stats()
    assert bank.debit(o, c, 400).status == SETTLED
    assert bank.refund(o).status == REFUNDED
    assert bank.refund(o).status == REFUNDED
    assert bank.balance(c) == OPENING_FEN
    assert bank.query(o).status == REFUNDED
    assert bank.debit(o, c, 400).status == REFUNDED
    after = bank.stats()
    assert after.total_refunded_fen - before.total_refunded_fen == 400
    assert after.merchant_balance_fen == before.merchant_balance_fen


def test_refund_of_anything_else_is_not_refundable(bank):
    """Refund of an unknown id, a credit, a declined or a voided order is NOT_REFUNDABLE."""
    c = card()
    credit, declined, voided = oid(), oid(), oid()
    bank.credit(credit, c, 10)
    bank.debit(declined, c, OPENING_FEN * 5)
    bank.void(voided)
    for o in (oid("never"), credit, declined, voided):
        err = failure(bank.refund, o)
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                "NOT_REFUNDABLE")
    assert bank.balance(c) == OPENING_FEN + 10


def test_card_ids_of_unknown_banks_are_refused_by_get_card(bank):
    """GetCard reports an unopened card's opening balance and refuses an unknown bank."""
    got = bank.admin.GetCard(pb.GetCardRequest(card_id="boc-424242"), timeout=CALL_TIMEOUT_S)
    assert (got.bank_id, got.opened, got.balance_fen) == ("boc", False, OPENING_FEN)
    err = failure(bank.balance, "nope-1")
    assert reason_of(err) == "UNKNOWN_BANK"


# -- faults ------------------------------------------------------------------------------------


def test_lost_response_applies_the_money_and_fails_the_call(bank):
    """A lost response fails UNAVAILABLE, yet the debit (or credit) settled durably."""
    bank.set_faults("lost", lost_response_rate=1.0)
    c, o = card("lost"), oid()
    err = failure(bank.debit, o, c, 300)
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "BANK_UNAVAILABLE")
    assert bank.query(o).status == SETTLED
    assert bank.balance(c) == OPENING_FEN - 300
    assert bank.debit(o, c, 300).status == SETTLED, "a repeat rolls no money fault"
    credit = oid()
    assert failure(bank.credit, credit, c, 50).code() == grpc.StatusCode.UNAVAILABLE
    assert bank.query(credit).status == SETTLED
    assert bank.balance(c) == OPENING_FEN - 250
    stats = bank.bank_stats("lost")
    assert stats.lost_responses == 2 and stats.debits_settled == 1
    bank.set_faults("lost")


def test_late_debit_settles_after_the_caller_gave_up(bank):
    """A late debit fails DEADLINE_EXCEEDED now and settles a little later."""
    bank.set_faults("late", late_debit_rate=1.0, late_debit_delay_ms=200)
    c, o = card("late"), oid()
    err = failure(bank.debit, o, c, 600)
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.DEADLINE_EXCEEDED, "BANK_TIMEOUT")
    assert bank.query(o).status == NOT_FOUND
    assert wait_for(lambda: bank.query(o).status == SETTLED, timeout_s=3.0)
    assert bank.balance(c) == OPENING_FEN - 600
    stats = bank.bank_stats("late")
    assert (stats.late_debits_applied, stats.late_debits_pending) == (1, 0)
    bank.set_faults("late")


def test_late_debit_never_settles_once_voided(bank):
    """Voiding an order whose late debit is waiting locks it: the debit never applies."""
    bank.set_faults("late", late_debit_rate=1.0, late_debit_delay_ms=300)
    c, o = card("late"), oid()
    assert failure(bank.debit, o, c, 600).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert bank.void(o).status == VOIDED
    time.sleep(0.6)
    q = bank.query(o)
    assert (q.status, q.kind, q.card_id, q.amount_fen) == (VOIDED, pb.ORDER_KIND_DEBIT, c, 600)
    assert bank.balance(c) == OPENING_FEN
    assert bank.debit(o, c, 600).decline_reason == pb.DECLINE_REASON_ORDER_VOIDED
    assert bank.bank_stats("late").late_debits_dropped >= 1
    bank.set_faults("late")


def test_timeout_holds_until_the_deadline_and_moves_nothing(bank):
    """A timeout answers nothing until the caller's deadline; no order, no money."""
    bank.set_faults("tmo", timeout_rate=1.0)
    c, o = card("tmo"), oid()
    start = time.monotonic()
    err = failure(bank.debit, o, c, 100, timeout=0.4)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start >= 0.35
    assert bank.query(o).status == NOT_FOUND
    assert bank.balance(c) == OPENING_FEN
    assert bank.bank_stats("tmo").timeouts_injected == 1
    bank.set_faults("tmo")
    assert bank.debit(o, c, 100).status == SETTLED


def test_injected_decline_is_recorded_without_moving_money(bank):
    """An injected decline answers DECLINED (reason DECLINED) and repeats so after faults clear."""
    bank.set_faults("dec", decline_rate=1.0)
    c, o = card("dec"), oid()
    r = bank.debit(o, c, 100)
    assert (r.status, r.decline_reason) == (DECLINED, pb.DECLINE_REASON_DECLINED)
    bank.set_faults("dec")
    assert bank.debit(o, c, 100).decline_reason == pb.DECLINE_REASON_DECLINED
    assert bank.balance(c) == OPENING_FEN
    assert bank.debit(oid(), c, 100).status == SETTLED
    assert bank.bank_stats("dec").declines_injected == 1


def test_latency_delays_the_answer(bank):
    """latency_ms delays each answer by uniform [0.5, 1.5] x the mean."""
    bank.set_faults("slow", latency_ms=200)
    start = time.monotonic()
    assert bank.debit(oid(), card("slow"), 1).status == SETTLED
    assert 0.09 <= time.monotonic() - start < 2.0
    bank.set_faults("slow")


def test_set_faults_refuses_bad_settings(bank):
    """SetFaults refuses rates outside [0, 1], rates summing over 1 and unknown banks."""
    for bank_id, faults, reason in (
        ("icbc", {"decline_rate": 1.5}, "INVALID_FAULTS"),
        ("icbc", {"timeout_rate": 0.6, "decline_rate": 0.6}, "INVALID_FAULTS"),
        ("icbc", {"latency_ms": -1}, "INVALID_FAULTS"),
        ("nope", {}, "UNKNOWN_BANK"),
    ):
        err = failure(bank.set_faults, bank_id, **faults)
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


def test_capacity_rejects_past_the_token_bucket(bank):
    """Past capacity_tps the bank answers RESOURCE_EXHAUSTED BANK_OVER_CAPACITY, then recovers."""
    bank.set_faults("cap", capacity_tps=5)
    c = card("cap")
    futures = [bank.svc.Debit.future(pb.DebitRequest(order_id=oid(), card_id=c, amount_fen=1),
                                     timeout=CALL_TIMEOUT_S) for _ in range(30)]
    ok = rejected = 0
    for f in futures:
        try:
            f.result()
            ok += 1
        except grpc.RpcError as err:
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                    "BANK_OVER_CAPACITY")
            rejected += 1
    assert 5 <= ok <= 8 and ok + rejected == 30
    assert bank.balance(c) == OPENING_FEN - ok
    stats = bank.bank_stats("cap")
    assert stats.rejected_over_capacity == rejected and stats.peak_tps >= 15
    assert not stats.collapsed
    time.sleep(0.5)
    assert bank.debit(oid(), c, 1).status == SETTLED
    bank.set_faults("cap")


def test_overload_collapse_answers_nothing_then_recovers(bank):
    """Driven past capacity longer than collapse_after_s, a bank answers nothing, then recovers."""
    bank.set_faults("crash", capacity_tps=10, collapse_after_s=0.8, collapse_for_s=1.5)
    c = card("crash")
    deadline = time.monotonic() + 4.0
    while not bank.bank_stats("crash").collapsed:
        assert time.monotonic() < deadline, "the bank never collapsed"
        futures = [bank.svc.Debit.future(pb.DebitRequest(order_id=oid(), card_id=c,
                                                         amount_fen=1), timeout=0.3)
                   for _ in range(20)]
        for f in futures:
            f.exception()
        time.sleep(0.05)
    start = time.monotonic()
    err = failure(bank.debit, oid(), c, 1, timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start >= 0.25
    assert wait_for(lambda: not bank.bank_stats("crash").collapsed, timeout_s=3.0)
    assert bank.debit(oid(), c, 1).status == SETTLED
    stats = bank.bank_stats("crash")
    assert stats.collapses == 1 and stats.held_while_collapsed >= 1
    assert stats.rejected_over_capacity > 0
    bank.set_faults("crash")


# -- totals ------------------------------------------------------------------------------------


def test_stats_totals_satisfy_the_conservation_identity(bank):
    """After concurrent mixed traffic, card balances plus merchant balance equal opened money."""

    async def traffic(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            svc = bank_pb2_grpc.BankServiceStub(ch)
            orders = [oid("mix") for _ in range(60)]
            cards = [card(b) for b in ("icbc", "ccb", "abc", "boc") for _ in range(3)]
            calls = []
            for i, o in enumerate(orders):
                c = cards[i % len(cards)]
                if i % 3 == 2:
                    calls.append(svc.Credit(pb.CreditRequest(order_id=o, card_id=c,
                                                             amount_fen=i + 1)))
                else:  # every tenth one is over the balance and declined
                    amount_fen = 10**9 if i % 10 == 1 else (i + 1) * 10
                    calls.append(svc.Debit(pb.DebitRequest(order_id=o, card_id=c,
                                                           amount_fen=amount_fen)))
            await asyncio.gather(*calls)
            await asyncio.gather(*(svc.Refund(pb.RefundRequest(order_id=o))
                                   for i, o in enumerate(orders) if i % 6 == 0),
                                 *(svc.VoidOrder(pb.VoidOrderRequest(order_id=oid("void")))
                                   for _ in range(5)))

    before = bank.stats()
    asyncio.run(traffic(bank.port))
    s = bank.stats()
    assert s.books_balance
    assert s.merchant_balance_fen == (s.total_debited_fen - s.total_credited_fen
                                      - s.total_refunded_fen)
    assert s.card_balance_fen + s.merchant_balance_fen == s.opened_card_fen
    assert s.opened_card_fen == s.cards_opened * OPENING_FEN
    assert s.orders - before.orders == 65
    assert s.ledger_ops - before.ledger_ops >= 75
    assert s.ledger_commits <= s.ledger_ops


# -- process: durability, CLI, config, health, reflection, shutdown ----------------------------


def test_acknowledged_debit_survives_kill_9(tmp_path):
    """After SIGKILL and a restart on the same data dir, the settled debit and balances stand."""
    proc, port = start_banksim(tmp_path, "--card-balance-fen", str(OPENING_FEN))
    try:
        b = Bank(port)
        c, o = card(), oid()
        assert b.debit(o, c, 1234).status == SETTLED
        before = b.stats()
        b.channel.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with running_banksim(tmp_path, "--card-balance-fen", str(OPENING_FEN)) as (_, port):
        b = Bank(port)
        q = b.query(o)
        assert (q.status, q.card_id, q.amount_fen) == (SETTLED, c, 1234)
        assert b.balance(c) == OPENING_FEN - 1234
        after = b.stats()
        assert (after.total_debited_fen, after.card_balance_fen, after.orders) == (
            before.total_debited_fen, before.card_balance_fen, before.orders)
        assert after.books_balance
        assert b.debit(o, c, 1234).status == SETTLED
        assert b.balance(c) == OPENING_FEN - 1234
        b.channel.close()


def test_config_file_flags_health_reflection_and_sigterm(tmp_path):
    """Flags override the config file per bank; health and reflection serve; SIGTERM exits 0."""
    config = tmp_path / "bank.json"
    config.write_text(json.dumps({
        "card_balance_fen": 500, "latency_ms": 1, "capacity_tps": 1000,
        "banks": {"icbc": {"timeout_rate": 0.25, "decline_rate": 0.5}, "ccb": {}},
    }))
    proc, port = start_banksim(tmp_path, "--config", str(config), "--decline-rate", "0.125")
    try:
        b = Bank(port)
        faults = {s.bank_id: s.faults for s in b.stats().banks}
        assert set(faults) == {"icbc", "ccb"}
        icbc, ccb = faults["icbc"], faults["ccb"]
        assert (icbc.latency_ms, icbc.timeout_rate, icbc.decline_rate) == (1, 0.25, 0.125)
        assert (icbc.capacity_tps, icbc.collapse_after_s, icbc.collapse_for_s) == (1000, 5, 10)
        assert (ccb.timeout_rate, ccb.decline_rate) == (0, 0.125)
        assert b.balance("ccb-1") == 500
        every = b.set_faults("", latency_ms=2)
        assert {s.bank_id: s.faults.latency_ms for s in every.banks} == {"icbc": 2, "ccb": 2}

        health = health_pb2_grpc.HealthStub(b.channel)
        for service in ("", "banksim.v1.BankService", "banksim.v1.BankAdminService"):
            got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(b.channel)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert {"banksim.v1.BankService", "banksim.v1.BankAdminService",
                "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        b.channel.close()
    finally:
        code = stop_banksim(proc)
    assert code == 0
    events = [json.loads(line)["event"] for line in
              (tmp_path / "banksim.log").read_text().splitlines() if line.startswith("{")]
    assert "banksim_serving" in events and "banksim_stopped" in events


def test_shutdown_drops_waiting_late_debits_and_releases_held_calls(tmp_path):
    """On SIGTERM a held call fails UNAVAILABLE at once and a waiting late debit never applies."""
    proc, port = start_banksim(tmp_path)
    try:
        b = Bank(port)
        b.set_faults("icbc", late_debit_rate=1.0, late_debit_delay_ms=60_000)
        c, o = card(), oid()
        assert failure(b.debit, o, c, 100).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        b.set_faults("ccb", timeout_rate=1.0)
        held = b.svc.Debit.future(pb.DebitRequest(order_id=oid(), card_id="ccb-1", amount_fen=1),
                                  timeout=20)
        time.sleep(0.3)
        start = time.monotonic()
        assert stop_banksim(proc) == 0
        assert time.monotonic() - start < 1.5, "the grace period was spent on a held call"
        assert held.exception().code() == grpc.StatusCode.UNAVAILABLE
        b.channel.close()
    finally:
        stop_banksim(proc)
    with running_banksim(tmp_path) as (_, port):
        b = Bank(port)
        assert b.query(o).status == NOT_FOUND
        assert b.balance(c) == 1_000_000
        assert b.void(o).status == VOIDED
        b.channel.close()


@pytest.mark.parametrize("args", [
    ("--decline-rate", "1.5"),
    ("--timeout-rate", "0.7", "--decline-rate", "0.7"),
    ("--banks", "ICBC"),
    ("--card-balance-fen", "-1"),
])
def test_bad_settings_exit_2_before_serving(tmp_path, args):
    """Out-of-range flags stop the process with exit code 2 and a message, serving nothing."""
    done = subprocess.run([sys.executable, "-m", "banksim", "--data-dir", str(tmp_path / "d"),
                           *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "banksim:" in done.stderr


def test_ledger_map_doubles_when_full(tmp_path):
    """The ledger grows its LMDB map on MapFullError and loses no write (in-process)."""
    from banksim._ledger import Ledger, Payload
    from banksim._model import OrderKind

    async def fill() -> Ledger:
        led = Ledger(str(tmp_path / "small"), opening_fen=100, map_size=64 << 10)
        await asyncio.gather(*(
            led.move(f"grow-{i}", Payload(OrderKind.DEBIT, f"icbc-{i % 300}", 1),
                     inject_decline=False) for i in range(3000)))
        return led

    led = asyncio.run(fill())
    try:
        assert led._map_size > 64 << 10
        snap = led.snapshot()
        assert (snap.orders, snap.debited_fen, snap.cards_opened) == (3000, 3000, 300)
        assert snap.books_balance
        assert led.commits < led.ops == 3000
    finally:
        led.close()
