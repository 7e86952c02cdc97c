"""One worker's admission: the controller, its signals, and the Pressure it drives.

The admission interceptor asks :meth:`Governor.admit` for every call of a
tiered method and reports each admitted call's queuing delay with
:meth:`Governor.started`. :meth:`Governor.run` (a task on the worker's event
loop) wakes every ``tick_s`` and

- measures the event loop's lag (how late the wake-up came): a loop that
  cannot keep its own timers is overloaded whatever the queuing delay says;
- measures how busy the worker is: the CPU time of the loop's thread and of
  the writer's thread over the tick (the GIL's share), or the whole process's
  over the CPUs it may run on, whichever is higher (a window's mean of it is
  compared with ``loop_busy``). grpc
  hands a waiting call to Python about once per loop iteration, so when the
  loop is saturated calls queue inside grpc's core, before the interceptor
  can timestamp them: the queuing delay it measures stays small while callers
  wait. A window whose mean is over ``loop_busy`` reports saturation (see
  :meth:`AdmissionController.report_saturation` for how far that may shed);
- reads the writer's queue (depth, and the mean wait of the writes committed
  since the last window, which is added to the window's queuing delay: a
  grab admitted quickly but waiting 50 ms for its group commit was queued);
- asks whether a bank is in trouble (its error rate over a threshold, or its
  breaker not closed). That feeds the payment-path degradations (Moments
  unlocks turn free) and the status, not the level: the butler already
  sheds a failing bank's traffic by its own breaker, and tightening the level
  would refuse wallet reads that never touch a bank;
- raises the controller's overload flag for the window on loop lag or a
  deep writer queue, and closes the window when its time is up.

When a window closes the Pressure gets the new level and signals, and a log
line records any level change. ``enabled = False`` keeps everything measured
and reported but admits every call (level stays at the top).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.qos.controller import MAX_LEVEL, AdmissionController, split_level
from gateway.qos.pressure import Pressure
from gateway.qos.tiers import Tier

log = structlog.get_logger(__name__)


# Below this share of the saturation threshold a window has spare capacity, and the
# level may open as fast as the traffic allows.
SPARE_SHARE = 0.75


@dataclasses.dataclass(frozen=True, slots=True)
class WriterSample:
    """The writer's counters at one moment."""

    depth: int = 0  # writes queued, not yet committed
    wait_s_total: float = 0.0  # time writes spent queued, summed
    requests: int = 0  # writes committed
    cpu_s_total: float = 0.0  # the writer thread's CPU time


@dataclasses.dataclass(frozen=True, slots=True)
class Thresholds:
    loop_lag_ms: float = 50.0
    writer_depth: int = 5_000
    loop_busy: float = 0.85  # mean busy share of a window that counts as saturation


class Governor:
    """Admission for one worker process; every method runs on its event loop."""

    def __init__(self, controller_factory: Callable[..., AdmissionController],
                 pressure: Pressure, *, enabled: bool = True,
                 thresholds: Thresholds | None = None,
                 writer: Callable[[], Awaitable[WriterSample]] | None = None,
                 bank_trouble: Callable[[], bool] | None = None,
                 tick_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        """``controller_factory(extra_delay_ms=..., on_window=...)`` builds the controller
        (the governor supplies those two hooks)."""
        self.controller = controller_factory(extra_delay_ms=self._writer_wait_ms,
                                             on_window=self._on_window)
        self.pressure = pressure
        self.enabled = enabled
        self.thresholds = thresholds or Thresholds()
        self._writer = writer
        self._bank_trouble = bank_trouble or (lambda: False)
        self._tick_s = tick_s
        self._clock = clock
        n = len(Tier)
        self.offered = [0] * n
        self.admitted = [0] * n
        self.shed = [0] * n
        self.loop_lag_ms = 0.0
        self.loop_busy = 0.0  # share of the last tick the loop's thread was on a CPU
        self._busy_sum = 0.0
        self._busy_ticks = 0
        self._cpus = max(1, len(os.sched_getaffinity(0)))
        self._window_lag_ms = 0.0
        self._busy_sum, self._busy_ticks = 0.0, 0
        self._sample = WriterSample()
        self._window_sample = WriterSample()
        self.writer_wait_ms = 0.0
        self._writer_trouble = False
        self._bank_trouble_now = False
        self._levels: dict[int, str] = {}
        self._stopping = asyncio.Event()
        pressure.start_at(self.level)

    # -- per call --------------------------------------------------------------------

    def user_priority(self, user_id: str) -> int:
        return self.controller.user_priority(user_id)

    def salt_epoch(self) -> int:
        """The current salt period's number: user priorities change when it does."""
        return self.controller.salt_epoch()

    def admit(self, tier: Tier, user_priority: int) -> bool:
        """Counts the call and says whether the level admits it."""
        t = int(tier)
        self.offered[t] += 1
        ok = self.controller.admit(tier, user_priority) or not self.enabled
        if ok:
            self.admitted[t] += 1
        else:
            self.shed[t] += 1
        return ok

    def started(self, queuing_s: float) -> None:
        """An admitted call's handler started ``queuing_s`` after it arrived."""
        self.controller.record_delay(queuing_s * 1000.0)

    @property
    def level(self) -> int:
        return self.controller.level if self.enabled else MAX_LEVEL

    def level_text(self) -> str:
        """The level as the trailing-metadata value (cached: one string per level)."""
        level = self.level
        text = self._levels.get(level)
        if text is None:
            text = self._levels[level] = str(level)
        return text

    # -- the tick task -----------------------------------------------------------------

    async def run(self) -> None:
        """Ticks until :meth:`stop`: loop lag, writer, banks, window time."""
        while not self._stopping.is_set():
            started, cpu, process = self._clock(), time.thread_time(), time.process_time()
            try:
                await asyncio.wait_for(self._stopping.wait(), self._tick_s)
                return
            except TimeoutError:
                pass
            elapsed = self._clock() - started
            await self.tick(max(0.0, (elapsed - self._tick_s) * 1000.0),
                            loop_cpu_s=time.thread_time() - cpu, elapsed_s=elapsed,
                            process_cpu_s=time.process_time() - process)

    def stop(self) -> None:
        self._stopping.set()

    async def tick(self, lag_ms: float, *, loop_cpu_s: float = 0.0, elapsed_s: float = 0.0,
                   process_cpu_s: float = 0.0) -> None:
        """One tick's checks; run() calls it every tick_s with the lag it measured, the
        loop thread's and the whole process's CPU time, and the wall time since the last
        tick."""
        self.loop_lag_ms = lag_ms
        self._window_lag_ms = max(self._window_lag_ms, lag_ms)
        writer_cpu = self._sample.cpu_s_total
        if self._writer is not None:
            self._sample = await self._writer()
        if elapsed_s > 0:
            # The GIL's busy share: the loop's thread and the writer's; grpc's own threads
            # run C code and are left out.
            gil = (loop_cpu_s + self._sample.cpu_s_total - writer_cpu) / elapsed_s
            # On as many CPUs as the process may use, grpc's C threads compete for the
            # same cores: the whole process's share counts too (it is what saturates a
            # worker pinned to one CPU while the GIL is 75-85 % busy).
            self.loop_busy = min(1.0, max(gil, process_cpu_s / elapsed_s / self._cpus))
            self._note_busy()
        self._writer_trouble = self._sample.depth > self.thresholds.writer_depth
        self._bank_trouble_now = self._bank_trouble()
        if lag_ms > self.thresholds.loop_lag_ms or self._writer_trouble:
            self.controller.report_overload()
        self.controller.tick()

    def _note_busy(self) -> None:
        """Adds the tick's busy share to the window's; over the threshold, saturation."""
        self._busy_sum += self.loop_busy
        self._busy_ticks += 1
        mean = self._busy_sum / self._busy_ticks
        if mean >= self.thresholds.loop_busy:
            self.controller.report_saturation()
        elif mean >= self.thresholds.loop_busy * SPARE_SHARE:
            self.controller.report_no_spare()

    # -- controller hooks ----------------------------------------------------------------

    def _writer_wait_ms(self) -> float:
        """Mean queue wait of the writes committed since the last window closed."""
        now, then = self._sample, self._window_sample
        n = now.requests - then.requests
        self.writer_wait_ms = (now.wait_s_total - then.wait_s_total) / n * 1000.0 if n > 0 else 0.0
        self._window_sample = now
        return self.writer_wait_ms

    def _on_window(self) -> None:
        c = self.controller
        before = self.pressure.level
        self.pressure.update(self.level, writer_trouble=self._writer_trouble,
                             bank_trouble=self._bank_trouble_now)
        if self.pressure.level != before:
            tier, prio = split_level(self.pressure.level)
            log.info("admission_level", level=self.pressure.level, tier=Tier(tier).name,
                     user_priority=prio, queuing_delay_ms=round(c.last_mean_delay_ms, 3),
                     loop_lag_ms=round(self._window_lag_ms, 3),
                     writer_trouble=self._writer_trouble, bank_trouble=self._bank_trouble_now,
                     shed=dict(zip((t.name for t in Tier), self.shed, strict=True)))
        self._window_lag_ms = 0.0
        self._busy_sum, self._busy_ticks = 0.0, 0
