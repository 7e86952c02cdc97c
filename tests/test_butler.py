"""The payment butler against a real bank simulator process over loopback (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from banksim.v1 import bank_pb2 as pb
from banksim.v1 import bank_pb2_grpc
from gateway.errors import InvalidArgument, Unavailable
from gateway.ops.procs import Proc, banksim_proc
from gateway.payments.bank import (
    BankAnswer,
    BankBusy,
    BankClient,
    BankUnclear,
    ChannelDown,
    OrderStatus,
)
from gateway.payments.butler import ButlerOptions, PaymentButler
from tests.conftest import run

CAPACITY_TPS = 50
BANK = "icbc"
# The butler's promise: in no second does the bank see more than capacity + 5%.
PEAK_ALLOWED = CAPACITY_TPS * 1.05


@pytest.fixture
def bank(tmp_path) -> Proc:
    """One simulated bank, icbc, taking 50 calls/s, with collapse off unless a test sets it."""
    proc = banksim_proc(tmp_path / "bank", "--banks", BANK, "--capacity-tps", str(CAPACITY_TPS),
                        "--collapse-after-s", "0", log_path=tmp_path / "banksim.log")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


class Link:
    """A BankClient for the butler and an admin stub for the test, on one simulator."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self.client = BankClient(target, timeout_s=timeout_s)
        self._channel = grpc.aio.insecure_channel(target)
        self._admin = bank_pb2_grpc.BankAdminServiceStub(self._channel)

    async def stats(self) -> pb.BankStats:
        return (await self.client.stats()).banks[0]

    async def set_faults(self, **faults: float) -> None:
        config = pb.FaultConfig(capacity_tps=CAPACITY_TPS, **faults)
        await self._admin.SetFaults(pb.SetFaultsRequest(bank_id=BANK, faults=config), timeout=5)

    async def close(self) -> None:
        await self.client.close()
        await self._channel.close()


@contextlib.asynccontextmanager
async def butler_on(proc: Proc, capacity_tps: float = CAPACITY_TPS, *, timeout_s: float = 3.0,
                    enabled: bool = True, **options) -> AsyncIterator[tuple[PaymentButler, Link]]:
    link = Link(proc.target, timeout_s)
    butler = PaymentButler(link.client, {BANK: capacity_tps},
                           ButlerOptions(call_timeout_s=timeout_s, **options), enabled=enabled)
    try:
        yield butler, link
    finally:
        await butler.close()
        await link.close()


async def attempt(call: Callable[[], Awaitable[object]]) -> tuple[str, float, object]:
    """What one call came to: ANSWER, BANK_BUSY, BANK_CIRCUIT_OPEN, OVER_CAPACITY or UNCLEAR."""
    t0 = time.monotonic()
    try:
        result = await call()
        kind = "ANSWER"
    except Unavailable as err:
        assert err.metadata == {"bank_id": BANK, "channel": "direct"}
        kind, result = err.reason, err
    except BankBusy as err:
        kind, result = "OVER_CAPACITY", err
    except BankUnclear as err:
        kind, result = "UNCLEAR", err
    return kind, time.monotonic() - t0, result


async def offer(debit: Callable[[str, str, int], Awaitable[object]], rate_per_s: float,
                duration_s: float, prefix: str) -> list[tuple[str, float, object]]:
    """Open-loop load: Debits started at ``rate_per_s`` for ``duration_s``, each its own task."""
    tasks = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < duration_s:
        while len(tasks) < int(elapsed * rate_per_s) + 1:
            i = len(tasks)
            tasks.append(asyncio.ensure_future(
                attempt(lambda i=i: debit(f"{prefix}-{i}", f"{BANK}-{i % 97:04d}", 1))))
        await asyncio.sleep(0.005)
    return await asyncio.gather(*tasks)


async def wait_for_state(butler: PaymentButler, state: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while butler.health()[0]["breaker_state"] != state:
        assert time.monotonic() < deadline, butler.health()
        await asyncio.sleep(0.02)


def test_keeps_the_bank_within_capacity_under_five_times_the_load(bank):
    """Offered 5x its capacity, the bank sees at most capacity + 5% in any second and
    refuses nothing, while the excess fails fast with BANK_BUSY without reaching it."""

    async def scenario():
        async with butler_on(bank) as (butler, link):
            outcomes = await offer(butler.debit, 5 * CAPACITY_TPS, 2.5, "load")
            stats = await link.stats()
            kinds = Counter(kind for kind, _, _ in outcomes)
            health = butler.health()[0]
        assert set(kinds) == {"ANSWER", "BANK_BUSY"}, kinds
        assert kinds["BANK_BUSY"] > kinds["ANSWER"]
        assert stats.peak_tps <= PEAK_ALLOWED, stats
        assert stats.rejected_over_capacity == 0
        assert stats.requests == kinds["ANSWER"] == health["calls"]
        assert all(r.settled for kind, _, r in outcomes if kind == "ANSWER")
        opts = ButlerOptions()
        assert max(t for kind, t, _ in outcomes if kind == "BANK_BUSY") < opts.max_wait_s + 0.2
        assert health["rejected_fast"] == kinds["BANK_BUSY"]
        assert health["breaker_state"] == "closed" and health["limit"] == CAPACITY_TPS
        assert health["in_flight"] == 0 and health["queued"] == 0
        assert 0 < health["latency_ms_p99"] < 1000 and health["error_rate"] == 0

    run(scenario())


def test_a_burst_past_the_queue_fails_at_once_and_leaks_no_slot(bank):
    """A burst larger than the queue is refused BANK_BUSY at once; waiters that give up or are
    cancelled leave no slot or queue place behind."""

    async def scenario():
        async with butler_on(bank, queue_limit=5) as (butler, link):
            burst = [asyncio.ensure_future(attempt(lambda i=i: butler.debit(
                f"burst-{i}", f"{BANK}-0001", 1))) for i in range(100)]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert butler.health()[0]["queued"] == 5
            outcomes = await asyncio.gather(*burst)
            kinds = Counter(kind for kind, _, _ in outcomes)
            assert kinds == {"ANSWER": 6, "BANK_BUSY": 94}
            # "At once": every refusal came back before any call that reached the bank
            # (a behaviour, not a timing bound, so a busy machine cannot fail it).
            assert (max(t for kind, t, _ in outcomes if kind == "BANK_BUSY")
                    < min(t for kind, t, _ in outcomes if kind == "ANSWER"))
            assert (await link.stats()).requests == butler.health()[0]["calls"] == 6
            # Waiters cancelled by their callers give their places back.
            waiting = [asyncio.ensure_future(butler.debit(f"gone-{i}", f"{BANK}-0002", 1))
                       for i in range(5)]
            await asyncio.sleep(0.01)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await asyncio.sleep(0.1)
            health = butler.health()[0]
            assert health["in_flight"] == 0 and health["queued"] == 0, health
            kind, _, answer = await attempt(lambda: butler.debit("after", f"{BANK}-0003", 1))
            assert kind == "ANSWER" and answer.settled
            # The cancelled one that had its slot may or may not have reached the bank
            # before its cancel did; no refused or queued one reached it.
            calls, requests = butler.health()[0]["calls"], (await link.stats()).requests
            assert 7 <= requests <= calls <= 8, (requests, calls)

    run(scenario())


def test_breaker_opens_on_timeouts_and_closes_after_recovery(bank):
    """Unclear results in a row open the breaker (fail fast, nothing sent); a failed probe
    keeps it open; once the bank answers again the probes close it."""

    async def scenario():
        async with butler_on(bank, timeout_s=0.5, cool_down_s=0.4, probe_timeout_s=0.3,
                             breaker_consecutive_failures=3) as (butler, link):
            assert (await butler.debit("ok-1", f"{BANK}-0001", 5)).settled
            await link.set_faults(timeout_rate=1.0)
            outcomes = await asyncio.gather(*(attempt(lambda i=i: butler.debit(
                f"tmo-{i}", f"{BANK}-0001", 5)) for i in range(3)))
            assert [kind for kind, _, _ in outcomes] == ["UNCLEAR"] * 3
            assert butler.health()[0]["breaker_state"] == "open"
            sent = (await link.stats()).requests
            kind, took_s, _ = await attempt(lambda: butler.debit("shut", f"{BANK}-0001", 5))
            assert kind == "BANK_CIRCUIT_OPEN" and took_s < 0.05
            assert (await link.stats()).requests == sent
            # The cool-down ends, the probe query times out: open again, for longer.
            await wait_for_state(butler, "half_open", 1.0)
            await wait_for_state(butler, "open", 1.0)
            await link.set_faults()
            await wait_for_state(butler, "closed", 3.0)
            health = butler.health()[0]
            assert health["breaker_opens"] == 2 and health["probes"] >= 4
            assert health["limit"] < CAPACITY_TPS  # a recovered bank is fed gently at first
            assert (await butler.debit("ok-2", f"{BANK}-0001", 5)).settled

    run(scenario())


def test_without_a_known_order_the_next_real_calls_are_the_probes(bank):
    """A butler that never had a definite answer from the bank probes with the next real calls,
    at most probe_count at a time, the others failing fast, and closes when they succeed."""

    async def scenario():
        async with butler_on(bank, timeout_s=0.3, cool_down_s=0.3, probe_count=2,
                             breaker_consecutive_failures=2) as (butler, link):
            await link.set_faults(timeout_rate=1.0)
            outcomes = await asyncio.gather(*(attempt(lambda i=i: butler.debit(
                f"tmo-{i}", f"{BANK}-0001", 3)) for i in range(2)))
            assert [kind for kind, _, _ in outcomes] == ["UNCLEAR"] * 2
            await link.set_faults(latency_ms=100)
            await wait_for_state(butler, "half_open", 1.0)
            assert butler.health()[0]["probes"] == 0  # no query probe: nothing to query
            outcomes = await asyncio.gather(*(attempt(lambda i=i: butler.debit(
                f"probe-{i}", f"{BANK}-0001", 3)) for i in range(4)))
            assert sorted(kind for kind, _, _ in outcomes) == [
                "ANSWER", "ANSWER", "BANK_CIRCUIT_OPEN", "BANK_CIRCUIT_OPEN"]
            assert butler.health()[0]["breaker_state"] == "closed"
            assert (await butler.debit("after", f"{BANK}-0001", 3)).settled

    run(scenario())


def test_breaker_opens_when_the_bank_collapses_and_closes_after_it_recovers(bank):
    """A bank driven into collapse by other clients holds the butler's calls; the breaker opens
    and stays open until the bank answers its probes again."""

    async def scenario():
        async with butler_on(bank, timeout_s=0.4, cool_down_s=0.3, probe_timeout_s=0.3,
                             breaker_consecutive_failures=3) as (butler, link):
            assert (await butler.debit("before", f"{BANK}-0001", 7)).settled
            await link.set_faults(collapse_after_s=0.3, collapse_for_s=2.5)
            rogue = BankClient(bank.target, timeout_s=0.3)
            try:
                outcomes = await offer(rogue.debit, 10 * CAPACITY_TPS, 0.9, "rogue")
            finally:
                await rogue.close()
            assert "OVER_CAPACITY" in {kind for kind, _, _ in outcomes}
            stats = await link.stats()
            assert stats.collapsed and stats.collapses == 1
            held = await asyncio.gather(*(attempt(lambda i=i: butler.debit(
                f"held-{i}", f"{BANK}-0001", 7)) for i in range(3)))
            assert [kind for kind, _, _ in held] == ["UNCLEAR"] * 3
            kind, _, _ = await attempt(lambda: butler.debit("shut", f"{BANK}-0001", 7))
            assert kind == "BANK_CIRCUIT_OPEN"
            await wait_for_state(butler, "closed", 6.0)
            assert not (await link.stats()).collapsed
            assert (await butler.debit("after", f"{BANK}-0001", 7)).settled
            assert (await link.stats()).collapses == 1

    run(scenario())


def test_limit_shrinks_when_the_bank_refuses_and_stays_above_the_floor(bank):
    """Told 200 calls/s for a bank that takes 50, the butler passes the bank's refusals on as
    BankBusy and cuts its limit multiplicatively, never below the floor."""

    async def scenario():
        async with butler_on(bank, capacity_tps=200) as (butler, link):
            outcomes = await offer(butler.debit, 200, 3.0, "over")
            kinds = Counter(kind for kind, _, _ in outcomes)
            health = butler.health()[0]
            stats = await link.stats()
        assert kinds["OVER_CAPACITY"] > 0 and kinds["ANSWER"] > 0, kinds
        assert stats.rejected_over_capacity == kinds["OVER_CAPACITY"]
        assert 200 * 0.05 <= health["limit"] < 100, health

    run(scenario())


def test_ambiguous_and_declined_results_pass_through(bank):
    """A lost response reaches the caller as BankUnclear (the bank did debit) and a decline as
    a BankAnswer that did not settle."""

    async def scenario():
        async with butler_on(bank) as (butler, link):
            await link.set_faults(lost_response_rate=1.0)
            with pytest.raises(BankUnclear):
                await butler.debit("lost-1", f"{BANK}-0001", 9)
            await link.set_faults(decline_rate=1.0)
            answer = await butler.debit("declined-1", f"{BANK}-0001", 9)
            assert answer == BankAnswer(False, pb.ORDER_STATUS_DECLINED, "CARD_DECLINED")
            await link.set_faults()
            found = await butler.query("lost-1", f"{BANK}-0001")
            assert found == OrderStatus.SETTLED
            health = butler.health()[0]
            assert health["breaker_state"] == "closed" and health["calls"] == 3
            assert health["error_rate"] == pytest.approx(1 / 3)

    run(scenario())


def test_disabled_butler_passes_every_call_straight_through(bank):
    """With enabled=False every call reaches the bank, even three times its capacity at once."""

    async def scenario():
        async with butler_on(bank, enabled=False) as (butler, link):
            outcomes = await asyncio.gather(*(attempt(lambda i=i: butler.debit(
                f"off-{i}", f"{BANK}-0001", 1)) for i in range(3 * CAPACITY_TPS)))
            kinds = Counter(kind for kind, _, _ in outcomes)
            stats = await link.stats()
            health = butler.health()[0]
        assert set(kinds) == {"ANSWER", "OVER_CAPACITY"}, kinds
        assert stats.requests == 3 * CAPACITY_TPS == health["calls"]
        assert stats.rejected_over_capacity == kinds["OVER_CAPACITY"]
        assert health["rejected_fast"] == 0 and health["breaker_state"] == "closed"

    run(scenario())


def test_unknown_bank_is_refused_without_a_call():
    """A card of a bank the butler has no capacity for is refused UNKNOWN_BANK, nothing sent."""

    class NoBank:
        async def debit(self, *args):
            raise AssertionError("called")

        credit = query = debit

    async def scenario():
        butler = PaymentButler(NoBank(), {BANK: CAPACITY_TPS})
        with pytest.raises(InvalidArgument) as info:
            await butler.debit("o-1", "nobank-0001", 1)
        assert info.value.reason == "UNKNOWN_BANK"
        await butler.close()

    run(scenario())


def test_a_refused_call_moves_to_the_next_channel_only_with_a_switch(bank):
    """The direct channel is down: a debit with a ``switch`` hook is moved to clearing
    (the hook hears of it first) and the bank records the order there alone; without the
    hook the refusal (ChannelDown) comes back and nothing is recorded. A query goes
    through the order's own channel; through the other the bank refuses it as a bug."""
    async def scenario():
        async with butler_on(bank) as (butler, link):
            await link.client.set_faults(BANK, {"capacity_tps": CAPACITY_TPS},
                                         channel="direct", down=True)
            heard: list[str] = []

            async def switch(channel: str) -> None:
                heard.append(channel)

            moved = await butler.debit("mv-1", f"{BANK}-0001", 5, "direct", switch)
            with pytest.raises(ChannelDown):
                await butler.debit("mv-2", f"{BANK}-0001", 5, "direct")
            on_clearing = await butler.query("mv-1", f"{BANK}-0001", "clearing")
            never = await butler.query("mv-2", f"{BANK}-0001", "clearing")
            await link.client.set_faults(BANK, {"capacity_tps": CAPACITY_TPS})
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await link.client.query("mv-1", "direct")
            rows = {h["channel"]: h for h in butler.health()}
            return moved, heard, on_clearing, never, wrong.value, rows, butler.route(BANK)

    moved, heard, on_clearing, never, wrong, rows, route = run(scenario())
    assert moved.settled and heard == ["clearing"]
    assert on_clearing == OrderStatus.SETTLED and never == OrderStatus.NOT_FOUND
    assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rows["clearing"]["rerouted_in"] == 1 and rows["direct"]["calls"] == 2
    assert route == "direct", "a closed direct channel with room is preferred again"


def test_route_prefers_a_channel_with_room_and_none_when_every_breaker_is_open():
    """route(): the preferred channel while it can send at once; the other when it cannot;
    None (and usable() False) when no channel admits a call."""
    class NoBank:
        async def query(self, *args):
            raise BankUnclear("no")

    async def scenario():
        butler = PaymentButler(NoBank(), {BANK: 10.0}, ButlerOptions(burst_s=0.01))
        first = butler.route(BANK)
        direct = butler._steward(BANK, "direct")
        direct.tokens = 0  # no token now: full
        full = butler.route(BANK)
        for s in butler._channels(BANK):
            butler._open(s, "test")
        shut = butler.route(BANK), butler.usable(BANK)
        await butler.close()
        return first, full, shut

    first, full, shut = run(scenario())
    assert (first, full, shut) == ("direct", "clearing", (None, False))


def test_a_silent_channel_is_passed_over_before_its_calls_time_out(bank):
    """The direct channel stops answering (every call held to its deadline): once calls
    have been out there for ``stall_s`` with no definite answer, new calls go through
    clearing, long before the held ones time out and the breaker can count them."""
    async def scenario():
        async with butler_on(bank, timeout_s=3.0, stall_s=0.2) as (butler, link):
            await link.client.set_faults(BANK, {"capacity_tps": CAPACITY_TPS,
                                                "timeout_rate": 1.0}, channel="direct")
            heard: list[str] = []

            async def switch(channel: str) -> None:
                heard.append(channel)

            held = asyncio.ensure_future(attempt(lambda: butler.debit(
                "held-1", f"{BANK}-0001", 1, "direct", switch)))
            await asyncio.sleep(0.05)
            early = butler.route(BANK)
            await asyncio.sleep(0.3)
            late = butler.route(BANK)
            moved = await butler.debit("next-1", f"{BANK}-0002", 1, "direct", switch)
            stalled = {h["channel"]: h["stalled"] for h in butler.health()}
            kind, _, _ = await held
            await link.client.set_faults(BANK, {"capacity_tps": CAPACITY_TPS})
            return early, late, moved, heard, stalled, kind

    early, late, moved, heard, stalled, kind = run(scenario())
    assert (early, late) == ("direct", "clearing")
    assert moved.settled and heard == ["clearing"]
    assert stalled == {"direct": True, "clearing": False}
    assert kind == "UNCLEAR", "the held call stays where it was sent, and ends unclear"
