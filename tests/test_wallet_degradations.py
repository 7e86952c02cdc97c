"""The wallet home's degradations: a rate-limited GetBalance answered from a cache, and
ListTransactions falling back to a cached first page, in the use case on a real LMDB
ledger with injected clocks and against a real gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway import errors
from gateway.client import Client
from gateway.config import Settings
from gateway.domain.keys import payment_id_for
from gateway.domain.model import Payment, PaymentKind, PaymentStatus
from gateway.errors import reason_of
from gateway.ledger import LmdbLedger
from gateway.qos import pressure as qos
from gateway.qos.controller import USER_LEVELS, priority_of, salt_of
from gateway.qos.pressure import Pressure
from gateway.qos.tiers import Tier
from gateway.usecases.wallet import LruCache, TokenBucket, WalletReads
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.conftest import Stack, run
from tests.test_gateway import balance, grab, send, top_up

# Far below any clock's resolution: every read comes back past it.
TINY_BUDGET_MS = 1e-9


class Clock:
    """A monotonic clock and a wall clock (ms) that move only when told to."""

    def __init__(self) -> None:
        self.now_s = 100.0
        self.wall_ms = 1_700_000_000_000

    def monotonic(self) -> float:
        return self.now_s

    def wall(self) -> int:
        return self.wall_ms

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
        self.wall_ms += int(seconds * 1000)


@pytest.fixture
def ledger(tmp_path):
    led = LmdbLedger(tmp_path, max_batch=256)
    yield led
    led.close()


def reads(ledger, clock: Clock, pressure: Pressure | None = None, **settings) -> WalletReads:
    return WalletReads(ledger, Settings(**settings).validate(), pressure or Pressure(),
                       clock=clock.monotonic, wall_clock_ms=clock.wall)


async def fund(ledger, user: str, amount: int, rid: str) -> None:
    p = Payment(payment_id_for(user, PaymentKind.TOP_UP, rid), user, PaymentKind.TOP_UP,
                "icbc-1", "icbc", amount, PaymentStatus.PENDING)
    begun, _created = await ledger.begin_payment(p, b"f" * 16, 60_000)
    await ledger.finish_payment(begun.payment_id, PaymentStatus.SUCCEEDED)


@contextlib.contextmanager
def shed(tier: Tier = Tier.P2):
    """Inside: the call as the admission interceptor passes on a degradable call it refused."""
    token = qos.refused.set(tier)
    try:
        yield
    finally:
        qos.refused.reset(token)


# -- the building blocks ----------------------------------------------------------------


def test_token_bucket_admits_its_burst_then_its_rate():
    """A full bucket admits `burst` calls at once, then one per 1/rate seconds; rate 0 all."""
    clock = Clock()
    bucket = TokenBucket(4, 4, clock.monotonic)
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]
    clock.advance(0.125)  # half a token (times exact in binary, so no rounding decides)
    assert not bucket.take()
    clock.advance(0.125)
    assert bucket.take() and not bucket.take()
    clock.advance(60)
    assert sum(bucket.take() for _ in range(10)) == 4
    unlimited = TokenBucket(0, 1, clock.monotonic)
    assert all(unlimited.take() for _ in range(10_000))


def test_lru_cache_keeps_its_bound_and_the_later_read():
    """The cache holds `size` entries, drops the least recently used, keeps the later read."""
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1.0, 1)
    cache.put("b", 1.0, 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 1.0, 3)
    assert len(cache) == 2 and cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    cache.put("a", 0.5, 99)  # a read that started before the cached one
    assert cache.get("a") == 1
    cache.put("a", 2.0, 4)
    assert cache.get("a") == 4
    off: LruCache[str, int] = LruCache(0)
    off.put("a", 1.0, 1)
    assert len(off) == 0 and off.get("a") is None


# -- GetBalance ---------------------------------------------------------------------------


def test_balance_past_the_rate_answers_the_cached_value_with_its_as_of(ledger):
    """Past the rate the last read balance comes back stale with as_of of its read, until
    the bucket refills; then a fresh read shows the new figure."""
    async def go():
        clock, pressure = Clock(), Pressure()
        wallet = reads(ledger, clock, pressure, balance_rate_per_s=1)
        await fund(ledger, "amy", 500, "t1")
        first = await wallet.balance("amy")
        assert (first.balance_fen, first.stale, first.as_of_ms) == (500, False, clock.wall_ms)
        read_at_ms = clock.wall_ms
        await fund(ledger, "amy", 300, "t2")
        clock.advance(0.5)
        again = await wallet.balance("amy")
        assert (again.balance_fen, again.stale, again.as_of_ms) == (500, True, read_at_ms)
        assert pressure.served[qos.BALANCE_CACHE] == 1
        clock.advance(0.5)
        fresh = await wallet.balance("amy")
        assert (fresh.balance_fen, fresh.stale, fresh.as_of_ms) == (800, False, clock.wall_ms)
    run(go())


def test_balance_past_the_rate_with_nothing_cached_is_read_fresh(ledger):
    """The rate limit degrades, never refuses: a user with no cached value gets a fresh read,
    which then fills the cache."""
    async def go():
        clock = Clock()
        wallet = reads(ledger, clock, balance_rate_per_s=1)
        await fund(ledger, "bo", 700, "t1")
        await wallet.balance("amy")  # takes the only token
        b = await wallet.balance("bo")
        assert (b.balance_fen, b.stale) == (700, False)
        b = await wallet.balance("bo")
        assert (b.balance_fen, b.stale) == (700, True)
    run(go())


def test_balance_cache_is_bounded_lru(ledger):
    """With room for two users, a third read drops the least recently used one."""
    async def go():
        wallet = reads(ledger, Clock(), balance_rate_per_s=0, balance_cache_size=2)
        await wallet.balance("u1")
        await wallet.balance("u2")
        with shed():
            assert (await wallet.balance("u1")).stale  # u1 is now the most recent
        await wallet.balance("u3")
        with shed():
            assert (await wallet.balance("u1")).stale
            assert (await wallet.balance("u3")).stale
            with pytest.raises(errors.ResourceExhausted):
                await wallet.balance("u2")
    run(go())


def test_balance_shed_answers_the_cache_or_refuses_with_shed(ledger):
    """Shed by the admission level: the cached balance (stale, without a read), or with
    nothing cached RESOURCE_EXHAUSTED SHED naming tier P2, the level and a pushback."""
    async def go():
        clock, pressure = Clock(), Pressure(pushback_ms=750)
        pressure.update(200)
        wallet = reads(ledger, clock, pressure, balance_rate_per_s=0)
        await fund(ledger, "amy", 500, "t1")
        await wallet.balance("amy")
        read_at_ms = clock.wall_ms
        await fund(ledger, "amy", 100, "t2")
        clock.advance(10)
        with shed():
            b = await wallet.balance("amy")
            assert (b.balance_fen, b.stale, b.as_of_ms) == (500, True, read_at_ms)
            with pytest.raises(errors.ResourceExhausted) as refused:
                await wallet.balance("nobody-cached")
        err = refused.value
        assert err.reason == "SHED" and err.retry_after_ms == 750
        assert err.metadata == {"tier": "P2", "level": "200"}
        assert pressure.served[qos.BALANCE_CACHE] == 1
        assert (await wallet.balance("amy")).balance_fen == 600  # admitted again: fresh
    run(go())


def test_balance_without_a_cache_reads_fresh_past_the_rate_and_refuses_when_shed(ledger):
    """balance_cache_size 0: past the rate every answer is fresh; shed, every call is SHED."""
    async def go():
        wallet = reads(ledger, Clock(), balance_rate_per_s=1, balance_cache_size=0)
        await fund(ledger, "amy", 500, "t1")
        answers = [await wallet.balance("amy") for _ in range(3)]
        assert [(b.balance_fen, b.stale) for b in answers] == [(500, False)] * 3
        with shed(), pytest.raises(errors.ResourceExhausted):
            await wallet.balance("amy")
    run(go())


# -- ListTransactions ---------------------------------------------------------------------


def test_list_over_budget_answers_the_cached_first_page(ledger):
    """Over the budget with nothing cached the call waits for its read; once a first page is
    cached, an over-budget read answers it stale and its late result refreshes the cache."""
    async def go():
        clock, pressure = Clock(), Pressure()
        wallet = reads(ledger, clock, pressure, list_budget_ms=TINY_BUDGET_MS)
        await fund(ledger, "amy", 500, "t1")
        first = await wallet.list_transactions("amy", 10, "")
        assert (len(first.entries), first.stale, first.as_of_ms) == (1, False, clock.wall_ms)
        read_at_ms = clock.wall_ms
        await fund(ledger, "amy", 300, "t2")
        clock.advance(1)
        late = await wallet.list_transactions("amy", 10, "")
        assert (late.entries, late.stale, late.as_of_ms) == (first.entries, True, read_at_ms)
        refreshed = await wallet.list_transactions("amy", 10, "")
        assert refreshed.stale and [e.amount_fen for e in refreshed.entries] == [300, 500]
        assert pressure.served[qos.LIST_CACHE] == 2
    run(go())


def test_list_within_budget_is_fresh(ledger):
    """A read inside its budget answers fresh even with a page cached."""
    async def go():
        wallet = reads(ledger, Clock(), list_budget_ms=10_000)
        await fund(ledger, "amy", 500, "t1")
        await wallet.list_transactions("amy", 10, "")
        await fund(ledger, "amy", 300, "t2")
        page = await wallet.list_transactions("amy", 10, "")
        assert not page.stale and len(page.entries) == 2
    run(go())


def test_list_caches_first_pages_only_at_their_page_size(ledger):
    """Only a first page is cached, for its page size: another size or a page token misses,
    and a shed miss is refused with SHED; a deeper page over budget waits for its read."""
    async def go():
        wallet = reads(ledger, Clock(), list_budget_ms=TINY_BUDGET_MS)
        for i in range(5):
            await fund(ledger, "amy", 100 + i, f"t{i}")
        first = await wallet.list_transactions("amy", 2, "")
        second = await wallet.list_transactions("amy", 2, first.next_page_token)
        again = await wallet.list_transactions("amy", 2, first.next_page_token)
        assert not second.stale and not again.stale and again.entries == second.entries
        with shed():
            assert (await wallet.list_transactions("amy", 2, "")).stale
            for size, token in ((3, ""), (2, first.next_page_token)):
                with pytest.raises(errors.ResourceExhausted) as refused:
                    await wallet.list_transactions("amy", size, token)
                assert refused.value.reason == "SHED" and refused.value.metadata["tier"] == "P2"
    run(go())


def test_list_shed_bad_input_is_still_refused_precisely(ledger):
    """A malformed request is INVALID_ARGUMENT with its reason, shed or not, cached or not."""
    async def go():
        wallet = reads(ledger, Clock())
        await wallet.list_transactions("amy", 10, "")
        with shed():
            for size, token, reason in ((101, "", "BAD_PAGE_SIZE"), (-1, "", "BAD_PAGE_SIZE"),
                                        (10, "x1", "BAD_PAGE_TOKEN"),
                                        (10, "9" * 21, "BAD_PAGE_TOKEN")):
                with pytest.raises(errors.InvalidArgument) as bad:
                    await wallet.list_transactions("amy", size, token)
                assert bad.value.reason == reason
    run(go())


def test_list_without_a_cache_waits_and_refuses_when_shed(ledger):
    """list_cache_size 0: over budget every answer is a fresh read; shed, every call is SHED."""
    async def go():
        pressure = Pressure()
        wallet = reads(ledger, Clock(), pressure, list_budget_ms=TINY_BUDGET_MS,
                       list_cache_size=0)
        await fund(ledger, "amy", 500, "t1")
        for _ in range(3):
            page = await wallet.list_transactions("amy", 10, "")
            assert not page.stale and len(page.entries) == 1
        with shed(), pytest.raises(errors.ResourceExhausted):
            await wallet.list_transactions("amy", 10, "")
        assert pressure.served[qos.LIST_CACHE] == 0
    run(go())


def test_list_cache_is_bounded_lru(ledger):
    """With room for one user's first page, a second user's read drops the first user's."""
    async def go():
        wallet = reads(ledger, Clock(), list_cache_size=1)
        await wallet.list_transactions("u1", 10, "")
        await wallet.list_transactions("u2", 10, "")
        with shed():
            assert (await wallet.list_transactions("u2", 10, "")).stale
            with pytest.raises(errors.ResourceExhausted):
                await wallet.list_transactions("u1", 10, "")
    run(go())


# -- against a real gateway ---------------------------------------------------------------


@pytest.fixture
def configured(tmp_path):
    """Starts the bank simulator and a gateway with a TOML config; books balance at the end."""
    started: list[Stack] = []

    def start(config_text: str) -> Stack:
        config = tmp_path / "gateway.toml"
        config.write_text(config_text)
        s = Stack(tmp_path)
        started.append(s)
        s.bank.start()
        s.start_gateway("--config", str(config))
        return s

    try:
        yield start
        for s in started:
            s.assert_balanced()
    finally:
        for s in started:
            s.stop()


def test_real_gateway_balance_past_the_rate_is_stale_until_the_bucket_refills(configured):
    """At 0.5 GetBalance/s: the first read is fresh, the next ones answer its figure and
    as_of through a top-up and a grab, a user with nothing cached reads fresh, and once the
    bucket has refilled the answer is fresh again."""
    # 0.5/s rather than 1/s: two seconds for the stale part, so a slow machine cannot
    # refill the bucket in the middle of it.
    stack = configured("balance_rate_per_s = 0.5\n")

    async def scenario():
        async with Client(stack.target) as c:
            alice, bob = stack.meta("alice"), stack.meta("bob")
            await top_up(c, alice, 10_000)
            a1 = await balance(c, alice)
            took_token = time.monotonic()
            assert (a1.balance_fen, a1.stale) == (10_000, False)
            b1 = await balance(c, bob)  # the bucket is empty, but nothing is cached for bob
            assert (b1.balance_fen, b1.pending_credit_fen, b1.stale) == (0, 0, False)
            await top_up(c, alice, 5_000, rid="t2")
            sent = await send(c, alice, 1000, 1, kind=envelope_pb2.ENVELOPE_KIND_NORMAL)
            got = await grab(c, bob, sent.envelope_id)
            assert got.amount_fen == 1000
            for _ in range(3):
                a = await balance(c, alice)
                assert (a.balance_fen, a.stale, a.as_of) == (10_000, True, a1.as_of)
            b = await balance(c, bob)
            assert (b.balance_fen + b.pending_credit_fen, b.stale, b.as_of) == (0, True, b1.as_of)
            await asyncio.sleep(max(0.0, took_token + 2.2 - time.monotonic()))
            a = await balance(c, alice)
            assert (a.balance_fen, a.stale) == (14_000, False)
            assert a.as_of.ToMilliseconds() > a1.as_of.ToMilliseconds()
            b = await balance(c, bob)  # the refill went to alice's read
            assert (b.stale, b.as_of) == (True, b1.as_of)
    run(scenario())


def test_real_gateway_list_over_budget_answers_the_cached_page(configured):
    """With a budget no read meets: the first ListTransactions waits for its read (nothing is
    cached), the next answers that page stale, and the one after shows the late read's page."""
    stack = configured(f"list_budget_ms = {TINY_BUDGET_MS}\n")

    async def scenario():
        async with Client(stack.target) as c:
            alice = stack.meta("alice")
            await top_up(c, alice, 10_000)

            async def page():
                return await c.wallet.ListTransactions(
                    wallet_pb2.ListTransactionsRequest(page_size=10), metadata=alice, timeout=10)

            first = await page()
            assert (len(first.transactions), first.stale) == (1, False)
            await top_up(c, alice, 5_000, rid="t2")
            second = await page()
            assert second.stale and list(second.transactions) == list(first.transactions)
            third = await page()
            assert third.stale and [t.amount_fen for t in third.transactions] == [5_000, 10_000]
            # Another page size misses the cache (it keeps one first page per user) and
            # waits for its read, and so does a page with a token (never cached).
            top = await c.wallet.ListTransactions(
                wallet_pb2.ListTransactionsRequest(page_size=1), metadata=alice, timeout=10)
            deeper = await c.wallet.ListTransactions(
                wallet_pb2.ListTransactionsRequest(page_size=1, page_token=top.next_page_token),
                metadata=alice, timeout=10)
            assert [([t.amount_fen for t in r.transactions], r.stale) for r in (top, deeper)
                    ] == [([5_000], False), ([10_000], False)]
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await c.wallet.ListTransactions(
                    wallet_pb2.ListTransactionsRequest(page_size=101), metadata=alice)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(bad.value) == "BAD_PAGE_SIZE"
    run(scenario())



def users_either_side(priority: int) -> tuple[str, str]:
    """A user whose priority is <= ``priority`` and one whose is above, this hour and the
    next (so a test that crosses the hour keeps them apart)."""
    epoch = int(time.time() // 3600)
    salts = (salt_of(epoch), salt_of(epoch + 1))
    users = [f"w{i}" for i in range(10_000)]
    low = next(u for u in users if all(priority_of(u, s) <= priority for s in salts))
    high = next(u for u in users if all(priority_of(u, s) > priority for s in salts))
    return low, high


def test_real_gateway_shed_wallet_reads_with_nothing_cached_are_refused_with_shed(configured):
    """With the level pinned inside P2, an admitted user reads fresh while a shed user, who
    has nothing cached, gets RESOURCE_EXHAUSTED SHED (tier P2, the level, a pushback)."""
    level = 2 * USER_LEVELS + USER_LEVELS // 2 - 1
    stack = configured(f"qos_pin_level = {level}\nqos_retry_pushback_ms = 700\n")
    admitted, shed_user = users_either_side(USER_LEVELS // 2 - 1)

    async def scenario():
        async with Client(stack.target) as c:
            ok, refused_meta = stack.meta(admitted), stack.meta(shed_user)
            b = await balance(c, ok)
            assert not b.stale
            page = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(),
                                                   metadata=ok, timeout=10)
            assert not page.stale
            calls = (c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=refused_meta,
                                         timeout=10),
                     c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(),
                                               metadata=refused_meta, timeout=10))
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call
                err = exc.value
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert reason_of(err) == "SHED"
                status = rpc_status.from_call(err)
                assert status is not None
                info = error_details_pb2.ErrorInfo()
                status.details[0].Unpack(info)
                assert dict(info.metadata) == {"tier": "P2", "level": str(level)}
                trailers = dict(err.trailing_metadata() or ())
                assert trailers["grpc-retry-pushback-ms"] == "700"
    run(scenario())
