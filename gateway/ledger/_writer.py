"""The one LMDB writer of a process, with group commit.

Requests from any thread or event loop are queued; a single thread drains up
to ``max_batch`` of them into one write transaction and one commit (one fsync
when the environment is opened with ``sync=True``), then acknowledges every
request of the batch, and only then. A write transaction therefore never
crosses threads, and durability costs one fsync per batch, not per request.

An operation is a plain function ``op(batch, *args) -> result`` run on the
writer thread. It must check everything before it writes anything: a
:class:`~gateway.errors.GatewayError` raised by an operation becomes that
request's answer and must leave the batch untouched. Any other exception is a
programmer error: the whole batch is aborted and every request in it fails
with INTERNAL (nothing of it was written).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import lmdb
import structlog

from gateway import errors

log = structlog.get_logger(__name__)

_STOP = object()


class _Request:
    __slots__ = ("args", "done", "fn", "future", "loop", "queued_at")

    def __init__(self, fn, args, loop, future, done):
        self.queued_at = time.perf_counter()
        self.fn = fn
        self.args = args
        self.loop = loop
        self.future = future
        self.done = done


def run_batch(state: Any, batch: list) -> list:
    """Runs every request's ``fn(state, *args)`` of a batch, then ``state.flush()``.

    A GatewayError is that request's answer; anything else propagates and the
    caller aborts the whole transaction (:func:`batch_failed`). Both backends
    commit their batches through this.
    """
    results: list = []
    for req in batch:
        try:
            results.append(req.fn(state, *req.args))
        except errors.GatewayError as err:
            results.append(err)
    state.flush()
    return results


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def batch_failed(exc: BaseException, size: int) -> list:
    """The answers of a batch a bug aborted: INTERNAL for each, logged once."""
    log.error("writer_batch_failed", size=size, exc_info=exc)
    bug = errors.Internal("WRITE_FAILED", f"internal error: {type(exc).__name__}")
    return [bug] * size


def _deliver(pairs: list) -> None:
    """Runs on an event loop: settles the futures of one batch in one call."""
    for fut, value in pairs:
        if fut.cancelled():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


class GroupCommitWriter:
    """Batches write operations into shared LMDB transactions on one thread."""

    def __init__(
        self,
        env: lmdb.Environment,
        make_batch: Callable[[lmdb.Transaction, int], Any],
        *,
        max_batch: int = 2048,
        max_wait_s: float = 0.0,
        queue_limit: int = 100_000,
        map_size_limit: int = 1 << 40,
        name: str = "lmdb-writer",
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        assert max_batch >= 1 and queue_limit >= max_batch
        self._env = env
        self._make_batch = make_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue_limit = queue_limit
        self._map_size_limit = map_size_limit
        # The rules' notion of now (expiry, timestamps); tests inject a clock.
        self._clock_ms = clock_ms or _wall_ms
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Requests queued and not yet committed: submitted minus done, two counters each
        # moved by one side. (One shared ``+= 1`` / ``-= n`` from two threads loses
        # updates, as the GIL does not make them atomic: seen as a negative depth.)
        # ``next()`` of an itertools.count is atomic; the last value stored may lag a
        # racing submit by one, which the next submit corrects.
        self._submit_seq = itertools.count(1)
        self._submitted = 0
        self._done = 0  # moved by the writer thread alone
        self._closed = False
        self.batches = 0
        self.requests = 0
        self.batch_size_max = 0
        self.apply_s_total = 0.0  # running the operations
        self.commit_s_total = 0.0  # committing, fsync included
        self.queue_wait_s_total = 0.0  # requests waiting for their batch to start, summed
        self.cpu_s_total = 0.0  # the writer thread's own CPU time (it holds the GIL then)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests queued and not yet committed."""
        return max(0, self._submitted - self._done)

    def _admit(self) -> None:
        if self._closed:
            raise errors.Unavailable("SHUTTING_DOWN", "the gateway is shutting down")
        if self.depth >= self._queue_limit:
            raise errors.ResourceExhausted(
                "WRITER_QUEUE_FULL", "too many writes waiting", retry_after_ms=50
            )
        self._submitted = next(self._submit_seq)

    async def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(batch, *args)`` in the next group commit; returns after the commit."""
        self._admit()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Request(fn, args, loop, fut, None))
        return await fut

    def submit_sync(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 30.0) -> Any:
        """The same for threads without an event loop (CLI, tests, recovery)."""
        self._admit()
        box: list = []
        done = threading.Event()
        self._queue.put(_Request(fn, args, None, box, done))
        if not done.wait(timeout_s):
            raise errors.Unavailable("WRITER_TIMEOUT", "the LMDB writer did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def close(self, timeout_s: float = 10.0) -> None:
        """Commits what is queued, then stops the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    # -- writer thread -------------------------------------------------------

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch = [first]
        stop = False
        deadline = time.monotonic() + self._max_wait_s if self._max_wait_s else 0.0
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if deadline and time.monotonic() < deadline:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                else:
                    break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            started, cpu = time.perf_counter(), time.thread_time()
            self.queue_wait_s_total += started * len(batch) - sum(r.queued_at for r in batch)
            results = self._commit(batch)
            self.cpu_s_total += time.thread_time() - cpu
            self._done += len(batch)
            self.batches += 1
            self.requests += len(batch)
            self.batch_size_max = max(self.batch_size_max, len(batch))
            self._acknowledge(batch, results)

    def _commit(self, batch: list[_Request]) -> list:
        for _attempt in range(8):
            try:
                return self._apply(batch)
            except lmdb.MapFullError:
                if not self._grow():
                    break
            except lmdb.MapResizedError:
                # Another process (a sibling worker) grew the map: adopt its size and retry.
                # Before this, every later batch of this worker failed WRITE_FAILED.
                self._env.set_mapsize(0)
                log.info("lmdb_map_adopted", map_size=self._env.info()["map_size"])
            except Exception as exc:  # a bug: fail the batch loudly, write nothing
                return batch_failed(exc, len(batch))
        full = errors.ResourceExhausted("LEDGER_FULL", "the ledger map cannot grow further")
        return [full] * len(batch)

    def _apply(self, batch: list[_Request]) -> list:
        now_ms = self._clock_ms()
        t0 = time.perf_counter()
        with self._env.begin(write=True) as txn:
            results = run_batch(self._make_batch(txn, now_ms), batch)
            t1 = time.perf_counter()
        self.apply_s_total += t1 - t0
        self.commit_s_total += time.perf_counter() - t1
        return results

    def _grow(self) -> bool:
        # set_mapsize wants no transaction of this process open; readers are
        # short (one request), and LMDB re-reads the size on their next begin.
        size = self._env.info()["map_size"]
        if size * 2 > self._map_size_limit:
            log.error("lmdb_map_limit", map_size=size)
            return False
        self._env.set_mapsize(size * 2)
        log.warning("lmdb_map_grown", map_size=size * 2)
        return True

    @staticmethod
    def _acknowledge(batch: list[_Request], results: list) -> None:
        by_loop: dict = {}
        for req, value in zip(batch, results, strict=True):
            if req.loop is None:
                req.future.append(value)
                req.done.set()
            else:
                by_loop.setdefault(req.loop, []).append((req.future, value))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed while we committed
                loop.call_soon_threadsafe(_deliver, pairs)
