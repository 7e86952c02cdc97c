"""The simulated gateway process: it runs the product's use cases and workers, and dies.

The books (a :class:`MemoryLedger`) stand for the data directory: what they committed
survives every crash. A :class:`Process` stands for one incarnation of a worker: its
use cases, its grab gate and its background loops (credit consumer, expiry sweeper,
payment resolver), and every request it is serving. It reaches the books through its
own :class:`ProcessBooks`, which is where it dies:

- at a crash point of ``gateway.crashpoints`` (``after_intent``, ``after_bank``,
  ``resolver_void``, ``resolver_refund``), and
- in the ledger: ``ledger_before_commit`` (the write never commits) and
  ``ledger_after_commit`` (the write committed, its caller never hears),

each on the n-th time the step is reached in the run, as the plan says. Death is
SIGKILL-like: the task that reached the step ends with :class:`Crashed`, every other
task of the process is cancelled, writes still queued are dropped, and the dead
process's handle refuses every further read and write, so no ``finally`` of a dead
process touches the books. The world restarts a new process after the plan's delay.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import hotpath
from gateway import crashpoints
from gateway.config import Settings
from gateway.ledger import BooksLedger, MemoryLedger
from gateway.loops import BackgroundLoop
from gateway.usecases import CardPayments, Grabbing, Sending
from gateway.usecases.background import CreditConsumer, ExpirySweeper

T = TypeVar("T")

LEDGER_POINTS = ("ledger_before_commit", "ledger_after_commit")
POINTS = tuple(sorted(crashpoints.POINTS)) + LEDGER_POINTS
# Virtual time zero, in Unix milliseconds (2027-01-15): the books see plausible dates.
EPOCH_MS = 1_800_000_000_000


class Crashed(BaseException):
    """The simulated process died at this step; nothing after it runs."""


class ProcessBooks(BooksLedger):
    """One process's handle on the books; dead with its process."""

    def __init__(self, world: World) -> None:
        self._world = world
        self._store = world.store
        self.alive = True

    def _check(self) -> None:
        if not self.alive:
            raise Crashed("the process is dead")

    async def write(self, rule: Callable[..., T], *args: Any) -> T:
        self._check()
        self._world.reach("ledger_before_commit")
        result = await self._store.write(rule, *args)
        self._check()   # died while the write was queued: the answer is lost
        self._world.reach("ledger_after_commit")
        return result

    def read(self, query: Callable[..., T], *args: Any) -> T:
        self._check()
        return self._store.read(query, *args)

    def _now_ms(self) -> int:
        return self._world.now_ms()

    def _writer_stats(self) -> tuple[int, int, int, int, float, float, float, float]:
        return (0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)

    def close(self) -> None:
        self.alive = False


class Process:
    """One incarnation of the gateway worker over the world's books and bank."""

    def __init__(self, world: World, number: int) -> None:
        self.number = number
        self.world = world
        s = world.settings
        self.books = ProcessBooks(world)
        make = world.mutant
        self.cards: CardPayments = make.cards(self.books, s, world.bank)
        self.sending = Sending(self.books, s, self.cards)
        self.grabbing = Grabbing(self.books, hotpath.GrabGate(s.gate_max_envelopes))
        loop = asyncio.get_running_loop()
        credit = CreditConsumer(self.books, batch=s.credit_batch, clock=loop.time)
        self.grabbing.on_credit = credit.wake
        self.loops: list[BackgroundLoop] = [
            credit, ExpirySweeper(self.books, interval_s=s.expiry_sweep_s),
            make.resolver(self.books, world.bank, delay_s=s.resolve_delay_s,
                          max_backoff_s=s.resolver_max_backoff_s)]
        self.tasks: set[asyncio.Task] = set()

    @property
    def alive(self) -> bool:
        return self.books.alive

    def start(self) -> None:
        for loop in self.loops:
            task = self.spawn(loop.run())
            task.add_done_callback(functools.partial(self._loop_ended, name=type(loop).__name__))

    def _loop_ended(self, task: asyncio.Task, name: str) -> None:
        if task.cancelled() or not self.alive:
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, Crashed):
            self.world.fail("background", f"{name} of process {self.number} died: {exc!r}")

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def kill(self) -> None:
        """SIGKILL: the handle dies first, then every task but the one dying here stops."""
        self.books.alive = False
        me = asyncio.current_task()
        for task in list(self.tasks):
            if task is not me:
                task.cancel()


class World:
    """The books, the bank, the live process (or none while one restarts) and the trace."""

    def __init__(self, settings: Settings, bank: Any, mutant: Any, *,
                 crashes: set[tuple[str, int]], restart_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.settings = settings
        self.store = MemoryLedger(clock_ms=self.now_ms)
        self.bank = bank
        self.mutant = mutant
        self.crashes = crashes
        self.restart_s = restart_s
        self.reached: Counter[str] = Counter()
        self.process: Process | None = None
        self.started = 0
        self.crashed: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.trace: list[str] = []

    def now_ms(self) -> int:
        return EPOCH_MS + int(self.loop.time() * 1000)

    def log(self, what: str) -> None:
        self.trace.append(f"{self.loop.time():9.3f}  {what}")

    def fail(self, check: str, detail: str) -> None:
        self.failures.append((check, detail))
        self.log(f"FAILED {check}: {detail}")

    def start(self) -> None:
        self.started += 1
        self.process = Process(self, self.started)
        self.process.start()
        self.log(f"process {self.started} started")

    def reach(self, point: str) -> None:
        """A crash point is reached; the plan may say the process dies here."""
        self.reached[point] += 1
        if (point, self.reached[point]) in self.crashes and self.process is not None:
            self.crash(f"{point} #{self.reached[point]}")
            raise Crashed(point)

    def crash(self, why: str) -> None:
        proc = self.process
        assert proc is not None
        proc.kill()
        dropped = self.store.discard_queued()
        self.process = None
        self.crashed.append(why)
        self.log(f"process {proc.number} killed at {why} ({dropped} queued writes lost)")
        self.loop.call_later(self.restart_s, self.start)

    async def stop(self) -> None:
        """Ends the run: the live process stops (its tasks cancelled), the books close."""
        if self.process is not None:
            proc = self.process
            proc.kill()
            await asyncio.gather(*proc.tasks, return_exceptions=True)
        self.store.close()
