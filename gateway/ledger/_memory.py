"""The in-memory backend: the same contract and money rules, kept in process memory.

Nothing is durable: it is for tests, seeded simulations and anything that
needs the ledger's behaviour without a disk. Tables are dicts with a sorted
key list beside them. Writes are group-committed on the event loop: requests
submitted in one turn of the loop share one transaction, run in one callback
(so no read ever sees half of one), and a transaction that hits a bug is
rolled back from its undo log.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog

from gateway import errors
from gateway.domain import keys
from gateway.domain.store import Books
from gateway.ledger._contract import BooksLedger
from gateway.ledger._writer import batch_failed, run_batch

log = structlog.get_logger(__name__)

T = TypeVar("T")
_ABSENT = object()


class _Table:
    __slots__ = ("order", "rows")

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}
        self.order: list[bytes] = []  # the keys of `rows`, sorted


class MemoryTx:
    """The storage protocol over the in-memory tables; writes keep an undo log."""

    __slots__ = ("_tables", "_undo", "_writable")

    def __init__(self, tables: dict[str, _Table], writable: bool) -> None:
        self._tables = tables
        self._writable = writable
        self._undo: list[tuple[str, bytes, object]] = []

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._tables[table].rows.get(key)

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True,
            append: bool = False) -> bool:
        assert self._writable, "put in a read transaction"
        assert isinstance(key, bytes) and isinstance(value, bytes) and key, (key, value)
        t = self._tables[table]
        old = t.rows.get(key, _ABSENT)
        if old is not _ABSENT and not overwrite:
            return False
        if old is _ABSENT:
            if append and (not t.order or t.order[-1] < key):
                t.order.append(key)
            else:
                bisect.insort(t.order, key)
        t.rows[key] = value
        self._undo.append((table, key, old))
        return True

    def delete(self, table: str, key: bytes) -> bool:
        assert self._writable, "delete in a read transaction"
        t = self._tables[table]
        old = t.rows.pop(key, _ABSENT)
        if old is _ABSENT:
            return False
        del t.order[bisect.bisect_left(t.order, key)]
        self._undo.append((table, key, old))
        return True

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        t = self._tables[table]
        i = bisect.bisect_left(t.order, start)
        while i < len(t.order):
            key = t.order[i]
            yield key, t.rows[key]
            i += 1

    def scan_back(self, table: str, before: bytes | None = None
                  ) -> Iterator[tuple[bytes, bytes]]:
        t = self._tables[table]
        i = len(t.order) if before is None else bisect.bisect_left(t.order, before)
        while i > 0:
            i -= 1
            key = t.order[i]
            yield key, t.rows[key]

    def count(self, table: str) -> int:
        return len(self._tables[table].rows)

    def rollback(self) -> None:
        """Undoes every write of this transaction, newest first."""
        for table, key, old in reversed(self._undo):
            t = self._tables[table]
            present = key in t.rows
            if old is _ABSENT:
                if present:
                    del t.rows[key]
                    del t.order[bisect.bisect_left(t.order, key)]
            else:
                if not present:
                    bisect.insort(t.order, key)
                t.rows[key] = old  # type: ignore[assignment]
        self._undo.clear()


class _Request:
    __slots__ = ("args", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future) -> None:
        self.fn = fn
        self.args = args
        self.future = future


class MemoryLedger(BooksLedger):
    """The ledger in memory; ``clock_ms`` (default: wall time) is the rules' notion of now."""

    def __init__(self, *, max_batch: int = 2048, queue_limit: int = 100_000,
                 clock_ms: Callable[[], int] | None = None) -> None:
        assert max_batch >= 1 and queue_limit >= max_batch
        self._tables = {name: _Table() for name in keys.TABLES}
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._max_batch = max_batch
        self._queue_limit = queue_limit
        self._queue: list[_Request] = []
        self._scheduled = False
        self._closed = False
        self.batches = 0
        self.requests = 0
        self.batch_size_max = 0
        self.apply_s_total = 0.0

    async def write(self, rule: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise errors.Unavailable("SHUTTING_DOWN", "the gateway is shutting down")
        if len(self._queue) >= self._queue_limit:
            raise errors.ResourceExhausted("WRITER_QUEUE_FULL", "too many writes waiting",
                                           retry_after_ms=50)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append(_Request(rule, args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain)
        return await fut

    def read(self, query: Callable[..., T], *args: Any) -> T:
        return query(MemoryTx(self._tables, writable=False), *args)

    def _drain(self) -> None:
        self._scheduled = False
        while self._queue:
            batch = self._queue[:self._max_batch]
            del self._queue[:self._max_batch]
            self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        tx = MemoryTx(self._tables, writable=True)
        books = Books(tx, self._clock_ms(), self._away)
        try:
            results = run_batch(books, batch)
        except Exception as exc:  # a bug: undo the whole batch, fail it loudly
            tx.rollback()
            results = batch_failed(exc, len(batch))
        self.apply_s_total += time.perf_counter() - t0
        self.batches += 1
        self.requests += len(batch)
        self.batch_size_max = max(self.batch_size_max, len(batch))
        for req, value in zip(batch, results, strict=True):
            if req.future.cancelled():
                continue
            if isinstance(value, BaseException):
                req.future.set_exception(value)
            else:
                req.future.set_result(value)

    def _now_ms(self) -> int:
        return self._clock_ms()

    def _writer_stats(self) -> tuple[int, int, int, int, float, float, float, float]:
        # Writes apply on the caller's loop turn: no queue thread waits or spends CPU.
        return (len(self._queue), self.batches, self.requests, self.batch_size_max,
                self.apply_s_total, 0.0, 0.0, 0.0)

    def discard_queued(self) -> int:
        """Drops the writes not yet committed, as a crash of the writing process would;
        their callers never get an answer. Returns how many were dropped (simulations)."""
        dropped = len(self._queue)
        self._queue.clear()
        return dropped

    def close(self) -> None:
        self._closed = True
        if self._queue:
            self._drain()
