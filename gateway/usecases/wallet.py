"""The wallet home: balance, transaction pages and the notification feed (reads only).

The wallet home degrades rather than fails (SPEC "Graceful degradation"):

- **GetBalance** is rate-limited per worker process by a token bucket
  (``balance_rate_per_s``; 0 = no limit), one second of rate deep (at least
  one call), so a burst after a quiet second is served fresh. Past the rate,
  or when the admission level sheds the call (:data:`pressure.refused` set),
  the answer is the user's last balance from a bounded LRU cache
  (``balance_cache_size``; 0 = no cache) with ``stale = true`` and ``as_of``
  the wall-clock time that value was read. Past the rate with nothing cached,
  the balance is read fresh: the rate limit degrades, it never refuses. Shed
  with nothing cached, the call is refused with SHED.
- **ListTransactions** reads within a latency budget (``list_budget_ms``;
  0 = no budget). Over the budget, or shed by the admission level, the answer
  is the user's last cached first page (bounded LRU, ``list_cache_size``; 0 =
  no cache) with ``stale = true``. Over the budget with nothing cached, the
  call waits for its read (a slow answer beats an error); shed with nothing
  cached, it is refused with SHED. Only first pages (no ``page_token``) are
  cached, one per user, with the page size they were read at: the first page
  is what the wallet home shows; a deeper page is a user scrolling, asked for
  rarely and under many tokens, so it would spend the cache on entries that
  are seldom asked for twice.

Every fresh read refreshes the cache. An entry is replaced only by a read
that started later than the one it holds, so a slow read finishing late never
overwrites a newer figure.

The budget is a timeout on the read: a read past it is left to finish in the
background (reads write nothing, so nothing is left half-done) and refreshes
the cache when it does. The embedded ledgers answer a read in one short,
synchronous LMDB transaction on the event loop, which no timeout can cut
short; there the budget catches a read whose answer reaches the call after it
(the loop lagging behind), and the late answer still refreshes the cache.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway import errors
from gateway.config import Settings
from gateway.domain.model import Notice, WalletEntry
from gateway.ledger import Ledger
from gateway.qos import pressure as qos
from gateway.qos.pressure import Pressure

_DEFAULT_PAGE_SIZE = 20
_MAX_PAGE_SIZE = 100
# Reads left running past their budget, at most; beyond it a call with a cached
# page answers the cache at once rather than start one more read.
_MAX_LATE_READS = 256

K = TypeVar("K")
V = TypeVar("V")


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class BalanceView:
    """GetBalance's answer: the figures, when they were read, and whether from the cache."""

    balance_fen: int
    pending_credit_fen: int
    as_of_ms: int  # wall clock, just before the read
    stale: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TransactionPage:
    """ListTransactions' answer: entries newest first, the next token ("" at the end)."""

    entries: tuple[WalletEntry, ...]
    next_page_token: str
    as_of_ms: int  # wall clock, just before the read
    stale: bool = False


class TokenBucket:
    """``rate_per_s`` calls a second, ``burst`` deep; a rate of 0 admits everything."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        assert rate_per_s >= 0 and burst >= 1
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        """Takes one token if there is one; False (and nothing taken) if not."""
        if self.rate_per_s == 0:
            return True
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class LruCache(Generic[K, V]):
    """At most ``size`` entries, the least recently used dropped first; size 0 keeps none.

    Each entry carries the monotonic time its read started: :meth:`put` keeps
    whichever of the old and the new entry was read later.
    """

    def __init__(self, size: int) -> None:
        assert size >= 0
        self.size = size
        self._entries: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)

    def put(self, key: K, started: float, value: V) -> None:
        if self.size == 0:
            return
        old = self._entries.get(key)
        if old is not None and old[0] > started:
            return
        self._entries[key] = (started, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _parse_page(page_size: int, page_token: str) -> tuple[int, int | None]:
    """The page size (0 means the default) and the cursor; InvalidArgument if malformed."""
    if page_size == 0:
        page_size = _DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= _MAX_PAGE_SIZE:
        raise errors.InvalidArgument("BAD_PAGE_SIZE", f"page_size must be in 0..{_MAX_PAGE_SIZE}")
    if not page_token:
        return page_size, None
    if not page_token.isdigit() or len(page_token) > 20 or int(page_token) >= 2**64:
        raise errors.InvalidArgument("BAD_PAGE_TOKEN", "page_token is malformed")
    return page_size, int(page_token)


class WalletReads:
    """The wallet home's reads, with their degradations (see the module docstring)."""

    def __init__(self, ledger: Ledger, settings: Settings, pressure: Pressure, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self._ledger = ledger
        self._pressure = pressure
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        rate = settings.balance_rate_per_s
        self._balance_bucket = TokenBucket(rate, max(1.0, rate), clock)
        self._balances: LruCache[str, BalanceView] = LruCache(settings.balance_cache_size)
        self._list_budget_s = max(0.0, settings.list_budget_ms) / 1000
        # user -> (page size, first page); a hit needs the same page size.
        self._pages: LruCache[str, tuple[int, TransactionPage]] = LruCache(
            settings.list_cache_size)
        self._late_reads: set[asyncio.Task[TransactionPage]] = set()

    # -- GetBalance --------------------------------------------------------------------

    async def balance(self, user_id: str) -> BalanceView:
        """The fresh balance, or the cached one (stale) past the rate or when shed."""
        tier = qos.refused.get()
        if tier is not None:
            cached = self._stale_balance(user_id)
            if cached is None:
                raise self._pressure.refusal(tier)
            return cached
        if not self._balance_bucket.take():
            cached = self._stale_balance(user_id)
            if cached is not None:
                return cached
        return await self._read_balance(user_id)

    async def _read_balance(self, user_id: str) -> BalanceView:
        started, as_of_ms = self._clock(), self._wall_clock_ms()
        b = await self._ledger.balance(user_id)
        view = BalanceView(b.balance_fen, b.pending_credit_fen, as_of_ms)
        self._balances.put(user_id, started, view)
        return view

    def _stale_balance(self, user_id: str) -> BalanceView | None:
        cached = self._balances.get(user_id)
        if cached is None:
            return None
        self._pressure.note(qos.BALANCE_CACHE)
        return dataclasses.replace(cached, stale=True)

    # -- ListTransactions --------------------------------------------------------------

    async def list_transactions(self, user_id: str, page_size: int, page_token: str
                                ) -> TransactionPage:
        """A page of entries newest first; the cached first page (stale) when over
        budget or shed. Bad input is refused before anything else."""
        page_size, before = _parse_page(page_size, page_token)
        cached = None if before is not None else self._cached_page(user_id, page_size)
        tier = qos.refused.get()
        if tier is not None:
            if cached is None:
                raise self._pressure.refusal(tier)
            return self._stale_page(cached)
        if cached is None or self._list_budget_s == 0:
            return await self._read_page(user_id, page_size, before)
        if len(self._late_reads) >= _MAX_LATE_READS:
            return self._stale_page(cached)
        read = asyncio.create_task(self._read_page(user_id, page_size, before))
        try:
            async with asyncio.timeout(self._list_budget_s):
                return await asyncio.shield(read)
        except TimeoutError:
            return self._stale_page(cached)
        finally:
            self._finish_late(read)  # also when the caller went away mid-read

    async def _read_page(self, user_id: str, page_size: int, before: int | None
                         ) -> TransactionPage:
        started, as_of_ms = self._clock(), self._wall_clock_ms()
        page = await self._ledger.list_transactions(user_id, page_size, before)
        token = "" if page.next_cursor is None else str(page.next_cursor)
        result = TransactionPage(tuple(page.entries), token, as_of_ms)
        if before is None:
            self._pages.put(user_id, started, (page_size, result))
        return result

    def _cached_page(self, user_id: str, page_size: int) -> TransactionPage | None:
        entry = self._pages.get(user_id)
        return entry[1] if entry is not None and entry[0] == page_size else None

    def _stale_page(self, cached: TransactionPage) -> TransactionPage:
        self._pressure.note(qos.LIST_CACHE)
        return dataclasses.replace(cached, stale=True)

    def _finish_late(self, read: asyncio.Task[TransactionPage]) -> None:
        """Keeps a read that outlived its call alive until it ends (it refreshes the
        cache then); a late read's failure is dropped, as its call has been answered."""
        if read.done():
            if not read.cancelled():
                read.exception()  # retrieved: asyncio would log it as never retrieved
            return
        self._late_reads.add(read)

        def done(task: asyncio.Task[TransactionPage]) -> None:
            self._late_reads.discard(task)
            if not task.cancelled():
                task.exception()

        read.add_done_callback(done)

    # -- WatchNotifications --------------------------------------------------------------

    async def notifications(self, user_id: str, after_event_id: int, limit: int
                            ) -> list[Notice]:
        return await self._ledger.notifications(user_id, after_event_id, limit)
