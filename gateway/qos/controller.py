"""DAGOR-style admission control (Zhou et al., "Overload Control for Scaling WeChat
Microservices", SoCC 2018), with an injected clock.

A request's *key* is (tier, user priority) flattened to one number,
``tier * USER_LEVELS + user_priority``: lower keys matter more. The
*admission level* is a key too, and a request is admitted when its key is at
or below it, so the level sheds from the least important tier and, within a
tier, from the lowest user priority up. P0 is shed last and only down to
``min_level``, which keeps the highest user priorities of P0 always served.

Every request is counted in a histogram by key (admitted or not), and its
queuing delay is added to the window's mean. A window closes after
``window_s`` or ``window_requests``, whichever comes first. Then:

- overloaded (mean queuing delay above ``delay_threshold_ms``, or an
  external signal raised by :meth:`report_overload`): the level moves down
  until the requests it would have shed in the closing window grow by
  ``shed_step`` (5 %) of the window's total, a step that doubles with each
  overloaded window in a row (up to 20 %, see :meth:`_tighter`);
- otherwise it moves up until ``admit_step`` (1 %) more of the window's
  requests would have been admitted, at least one key.

The user priority is a keyed hash of the user id with a salt that changes
every hour, so in an overload the same users keep being served for the hour
instead of everyone failing at random, and no user is unlucky for ever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable

from gateway.qos.tiers import Tier

USER_LEVELS = 128
TIERS = len(Tier)
MAX_LEVEL = TIERS * USER_LEVELS - 1  # everything admitted
P0_TOP = USER_LEVELS - 1  # all of P0 admitted, nothing else
OPEN_KEYS_BUSY = USER_LEVELS // 2  # keys a calm window may open without spare capacity
# A saturated window whose refusals are at least this share of its calls may be
# saturated by the refusals' own cost: saturation alone then stops at P0's top.
REFUSAL_SHARE = 0.25
MAX_STEP_DOUBLINGS = 2  # the shed step grows 5 % -> 20 % over consecutive overloaded windows


def key_of(tier: Tier, user_priority: int) -> int:
    assert 0 <= user_priority < USER_LEVELS, user_priority
    return int(tier) * USER_LEVELS + user_priority


def split_level(level: int) -> tuple[int, int]:
    """(tier, user priority) of a level: requests at or below both are admitted."""
    return divmod(level, USER_LEVELS)


def salt_of(epoch: int, secret: bytes = b"") -> bytes:
    """The user-priority salt of one salt period (``epoch`` = wall time // period)."""
    return (secret + epoch.to_bytes(8, "big"))[-64:]


def priority_of(user_id: str, salt: bytes) -> int:
    """A user's priority under ``salt``: 0 (served longest) .. USER_LEVELS-1.

    With the default empty secret an upstream client computes the same priority
    as the server, which is what lets it drop early what the server would shed
    (DAGOR's collaborative admission).
    """
    digest = hashlib.blake2b(user_id.encode(), digest_size=2, key=salt).digest()
    return int.from_bytes(digest, "big") % USER_LEVELS


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerOptions:
    delay_threshold_ms: float = 20.0  # DAGOR's default mean queuing time
    window_s: float = 1.0
    window_requests: int = 2000
    shed_step: float = 0.05  # of a window's requests, per overloaded window
    admit_step: float = 0.01  # of a window's requests, per calm window
    # P0 keeps at least this many of its highest user priorities, whatever happens.
    p0_user_floor: int = USER_LEVELS // 2
    salt_period_s: int = 3600

    def validate(self) -> ControllerOptions:
        if not self.delay_threshold_ms > 0 or not self.window_s > 0:
            raise ValueError("delay_threshold_ms and window_s must be > 0")
        if self.window_requests < 1:
            raise ValueError("window_requests must be >= 1")
        if not 0 < self.shed_step <= 1 or not 0 < self.admit_step <= 1:
            raise ValueError("shed_step and admit_step must be in (0, 1]")
        if not 1 <= self.p0_user_floor <= USER_LEVELS:
            raise ValueError(f"p0_user_floor must be in 1..{USER_LEVELS}")
        return self


class AdmissionController:
    """One per worker process; all methods run on its event loop (no locking)."""

    def __init__(self, options: ControllerOptions | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, secret: bytes = b"",
                 extra_delay_ms: Callable[[], float] | None = None,
                 on_window: Callable[[], None] | None = None,
                 pinned_level: int | None = None) -> None:
        """``extra_delay_ms`` adds a downstream queue's mean wait (the writer's) to each
        window's mean; ``on_window`` runs after each window closes; ``pinned_level``
        fixes the level whatever the signals say (drills and tests)."""
        self.options = (options or ControllerOptions()).validate()
        assert pinned_level is None or 0 <= pinned_level <= MAX_LEVEL, pinned_level
        self._extra_delay_ms = extra_delay_ms
        self._on_window = on_window
        self.pinned_level = pinned_level
        self._clock = clock
        self._wall_clock = wall_clock
        self._secret = secret
        self.min_level = self.options.p0_user_floor - 1
        self.level = MAX_LEVEL if pinned_level is None else pinned_level
        self._histogram = [0] * (MAX_LEVEL + 1)
        self._count = 0
        self._delay_ms_total = 0.0
        self._window_start = clock()
        self._external_overload = False
        self._saturated = False
        self._no_spare = False
        self._refused = 0
        self._streak = 0  # overloaded windows in a row
        self._salt_epoch = -1
        self._salt = b""
        self.windows = 0
        self.last_mean_delay_ms = 0.0
        self.last_overloaded = False
        self.last_saturated = False

    # -- per request -------------------------------------------------------------

    def salt_epoch(self) -> int:
        """The number of the current salt period (wall time // salt_period_s)."""
        return int(self._wall_clock() // self.options.salt_period_s)

    def user_priority(self, user_id: str) -> int:
        """0 (served longest) .. USER_LEVELS-1, stable for a salt period."""
        epoch = self.salt_epoch()
        if epoch != self._salt_epoch:
            self._salt_epoch = epoch
            self._salt = salt_of(epoch, self._secret)
        return priority_of(user_id, self._salt)

    def admit(self, tier: Tier, user_priority: int) -> bool:
        """Counts the request and says whether the current level admits it."""
        key = key_of(tier, user_priority)
        self._histogram[key] += 1
        self._count += 1
        admitted = key <= self.level
        if not admitted:
            self._refused += 1
        if self._count >= self.options.window_requests:
            self._close_window()
        return admitted

    def record_delay(self, queuing_ms: float) -> None:
        """The queuing delay of an admitted request (arrival to handler start)."""
        self._delay_ms_total += queuing_ms

    def report_overload(self) -> None:
        """An outside signal (loop lag, writer queue, bank errors) for the current window."""
        self._external_overload = True

    def report_saturation(self) -> None:
        """The worker is saturated, so calls queue in grpc's core, where no timestamp
        reaches the interceptor. A weaker signal than :meth:`report_overload`: while a
        quarter or more of the window's calls are refused, it tightens the level down to
        P0's top but not into P0, because then the saturation may be the refusals' own
        cost (a flood of calls that are refused anyway, which shedding paying users
        would not reduce). With fewer refusals (callers dropping their own calls at the
        level they were told) the admitted calls are what saturate the worker, and it
        sheds P0 by user priority down to the floor like any overload."""
        self._saturated = True

    def report_no_spare(self) -> None:
        """The worker has little spare capacity this window: open the level slowly."""
        self._no_spare = True

    def tick(self) -> None:
        """Closes the window if its time is up; call it now and then (e.g. every 100 ms)."""
        if self._clock() - self._window_start >= self.options.window_s:
            self._close_window()

    # -- window -------------------------------------------------------------------

    def _close_window(self) -> None:
        n = self._count
        mean = self._delay_ms_total / n if n else 0.0
        if self._extra_delay_ms is not None:
            mean += self._extra_delay_ms()
        self.last_mean_delay_ms = mean
        overloaded = self._external_overload or mean > self.options.delay_threshold_ms
        self.last_overloaded = overloaded
        if self.pinned_level is not None:
            self.level = self.pinned_level
        elif overloaded and n:
            self.level = self._tighter(n)
        elif self._saturated and n:
            floor = P0_TOP if self._refused >= n * REFUSAL_SHARE else self.min_level
            self.level = max(self._tighter(n), min(self.level, floor))
        elif not overloaded and not self._saturated:
            self._streak = 0
            self.level = self._looser(n)
        self.last_saturated = self._saturated
        self.windows += 1
        self._histogram = [0] * (MAX_LEVEL + 1)
        self._count = 0
        self._delay_ms_total = 0.0
        self._external_overload = False
        self._saturated = False
        self._no_spare = False
        self._refused = 0
        self._window_start = self._clock()
        if self._on_window is not None:
            self._on_window()

    def _tighter(self, n: int) -> int:
        """Walks the level down until ``shed_step`` more of the window would be shed.

        The step doubles with each overloaded window in a row, up to ``MAX_STEP_DOUBLINGS``
        doublings (5 %, 10 %, 20 %): callers that drop at the level they were told
        take their calls out of the next window, so a fixed 5 % of what still arrives
        would need some 25 windows to shed two thirds of an offered load, while the calls
        already admitted wait in grpc's queue. One calm window resets the step.
        """
        self._streak = min(self._streak + 1, MAX_STEP_DOUBLINGS + 1)
        step = min(0.5, self.options.shed_step * 2 ** (self._streak - 1))
        target = max(1, int(n * step))
        level, shed = self.level, 0
        while level > self.min_level and shed < target:
            shed += self._histogram[level]
            level -= 1
        return level

    def _looser(self, n: int) -> int:
        """Walks the level up until ``admit_step`` more of the window would be admitted.

        Keys nobody used in the window cost nothing to open, so with the load gone the
        level is back at the top in a window or two. But a window without spare capacity
        (:meth:`report_no_spare`) opens at most ``OPEN_KEYS_BUSY`` keys: its empty keys
        may be callers dropping their own calls at the level they were told
        (collaborative admission), who would all come back at once.
        """
        if self.level >= MAX_LEVEL:
            return MAX_LEVEL
        target = max(1, int(n * self.options.admit_step))
        limit = MAX_LEVEL if not self._no_spare else min(MAX_LEVEL,
                                                         self.level + OPEN_KEYS_BUSY)
        level, added = self.level + 1, self._histogram[self.level + 1]
        while level < limit and added < target:
            level += 1
            added += self._histogram[level]
        return level
