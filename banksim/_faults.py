"""Per-channel faults and capacity: the configuration, the dice and the admission gate.

Each channel of each bank (direct, clearing) has its own ``BankState``: its own
settings, token bucket, overload streak, collapse and counters.

Everything here runs on the event loop thread, so it holds no locks. Time comes
from ``time.monotonic`` passed in by the caller, which keeps the state machine
easy to test.

One draw of ``random.Random`` per admitted call picks at most one fault, so the
rates are exclusive bands of [0, 1) and must sum to at most 1:

    [decline | timeout | lost response | late debit | none]

A band that does not apply to the call (a decline for a QueryOrder, a late debit
for a Credit, any money fault for an order id the bank already recorded) falls
through to "none".
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from dataclasses import dataclass

import structlog

from banksim._errors import InvalidArgument, Unavailable
from banksim._model import Channel

log = structlog.get_logger("banksim.faults")

DEFAULT_COLLAPSE_AFTER_S = 5.0
DEFAULT_COLLAPSE_FOR_S = 10.0
DEFAULT_LATE_DEBIT_DELAY_MS = 1000.0
# Rejections closer together than this belong to one overload streak.
OVERLOAD_GAP_S = 1.0
# Bounds on the configurable numbers, so a typo cannot hang the bank for a day.
MAX_CAPACITY_TPS = 1e7
MAX_LATENCY_MS = 60_000.0
MAX_COLLAPSE_S = 3600.0


class Fault(enum.Enum):
    NONE = "none"
    DECLINE = "decline"
    TIMEOUT = "timeout"
    LOST_RESPONSE = "lost_response"
    LATE_DEBIT = "late_debit"


class Admission(enum.Enum):
    ADMIT = "admit"
    REJECT = "reject"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Faults:
    """One bank's fault settings; the field names are the proto's and the flags'."""

    capacity_tps: float = 0.0
    latency_ms: float = 0.0
    decline_rate: float = 0.0
    timeout_rate: float = 0.0
    lost_response_rate: float = 0.0
    late_debit_rate: float = 0.0
    collapse_after_s: float = 0.0
    collapse_for_s: float = 0.0
    late_debit_delay_ms: float = 0.0
    # The channel answers UNAVAILABLE CHANNEL_DOWN at once, before any other gate.
    down: bool = False

    def checked(self) -> Faults:
        """These settings with defaults filled in; INVALID_ARGUMENT if any is out of range."""
        for name in FAULT_KEYS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument("INVALID_FAULTS", f"{name} must be finite and >= 0")
        rates = (self.decline_rate, self.timeout_rate, self.lost_response_rate,
                 self.late_debit_rate)
        if any(r > 1 for r in rates) or math.fsum(rates) > 1 + 1e-9:
            raise InvalidArgument("INVALID_FAULTS", "fault rates are exclusive: each and their "
                                  "sum must be in [0, 1]")
        limits = {"capacity_tps": MAX_CAPACITY_TPS, "latency_ms": MAX_LATENCY_MS,
                  "late_debit_delay_ms": MAX_LATENCY_MS, "collapse_after_s": MAX_COLLAPSE_S,
                  "collapse_for_s": MAX_COLLAPSE_S}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise InvalidArgument("INVALID_FAULTS", f"{name} must be <= {limit:g}")
        filled = self
        if self.collapse_after_s > 0 and self.collapse_for_s == 0:
            filled = dataclasses.replace(filled, collapse_for_s=DEFAULT_COLLAPSE_FOR_S)
        if self.late_debit_delay_ms == 0:
            filled = dataclasses.replace(filled, late_debit_delay_ms=DEFAULT_LATE_DEBIT_DELAY_MS)
        return filled


# The numeric settings (each a flag and a config key); FAULT_FIELDS adds the switch ``down``.
FAULT_FIELDS = tuple(f.name for f in dataclasses.fields(Faults))
FAULT_KEYS = tuple(name for name in FAULT_FIELDS if name != "down")


@dataclass(slots=True)
class Counters:
    """Per-bank counters since the process started (the ledger holds the durable totals)."""

    requests: int = 0
    debits_settled: int = 0
    credits_settled: int = 0
    declines: int = 0
    refunds: int = 0
    voids: int = 0
    rejected_over_capacity: int = 0
    collapses: int = 0
    held_while_collapsed: int = 0
    declines_injected: int = 0
    timeouts_injected: int = 0
    lost_responses: int = 0
    late_debits_scheduled: int = 0
    late_debits_applied: int = 0
    late_debits_dropped: int = 0
    refused_while_down: int = 0

    @property
    def faults_injected(self) -> int:
        return (self.declines_injected + self.timeouts_injected + self.lost_responses
                + self.late_debits_scheduled)


class PeakMeter:
    """The most requests seen in any one (monotonic) second."""

    def __init__(self, now: float) -> None:
        self._second = math.floor(now)
        self._in_second = 0
        self._peak_tps = 0

    def count(self, now: float) -> None:
        self._roll(now)
        self._in_second += 1

    def peak_tps(self, now: float) -> int:
        self._roll(now)
        return max(self._peak_tps, self._in_second)

    def _roll(self, now: float) -> None:
        second = math.floor(now)
        if second != self._second:
            self._peak_tps = max(self._peak_tps, self._in_second)
            self._second, self._in_second = second, 0


class BankState:
    """One channel of one bank, live: settings, token bucket, overload streak, collapse,
    counters."""

    def __init__(self, bank_id: str, faults: Faults, rng: random.Random, now: float,
                 channel: Channel = Channel.DIRECT, bank_meter: PeakMeter | None = None) -> None:
        self.bank_id = bank_id
        self.channel = channel
        self.counters = Counters()
        self._rng = rng
        self.set_faults(faults, now)
        self._meter = PeakMeter(now)
        # The bank's own meter, shared by its channels: the bank-wide peak is not the sum
        # of the channels' peaks (they need not fall in the same second).
        self._bank_meter = bank_meter

    def set_faults(self, faults: Faults, now: float) -> None:
        """Replaces the settings (already ``checked``) and resets capacity and collapse."""
        self.faults = faults
        self._tokens = self._burst
        self._refilled_at = now
        self._streak_start: float | None = None
        self._last_reject = -math.inf
        self._collapsed_until = 0.0

    @property
    def _burst(self) -> float:
        # One second's worth of requests, so a bank at capacity admits exactly capacity_tps/s.
        return max(1.0, self.faults.capacity_tps)

    def collapsed(self, now: float) -> bool:
        return now < self._collapsed_until

    def peak_tps(self, now: float) -> int:
        return self._meter.peak_tps(now)

    def admit(self, now: float) -> Admission:
        """Counts the request and decides: admit, reject (over capacity) or hold (collapsed)."""
        self.counters.requests += 1
        self._meter.count(now)
        if self._bank_meter is not None:
            self._bank_meter.count(now)
        if self.collapsed(now):
            self.counters.held_while_collapsed += 1
            return Admission.HOLD
        if self._collapsed_until:  # the collapse just ended: start afresh
            self.set_faults(self.faults, now)
            log.warning("bank_recovered", bank_id=self.bank_id, channel=self.channel.label)
        capacity = self.faults.capacity_tps
        if capacity <= 0:
            return Admission.ADMIT
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * capacity)
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return Admission.ADMIT
        self.counters.rejected_over_capacity += 1
        if self._streak_start is None or now - self._last_reject > OVERLOAD_GAP_S:
            self._streak_start = now
        self._last_reject = now
        after = self.faults.collapse_after_s
        if after > 0 and now - self._streak_start >= after:
            self._collapsed_until = now + self.faults.collapse_for_s
            self.counters.collapses += 1
            log.warning("bank_collapsed", bank_id=self.bank_id, channel=self.channel.label,
                        overloaded_s=now - self._streak_start, for_s=self.faults.collapse_for_s)
        return Admission.REJECT

    def refuse_if_down(self) -> None:
        """UNAVAILABLE CHANNEL_DOWN at once if the channel is down (counted, nothing moves)."""
        if not self.faults.down:
            return
        self.counters.requests += 1
        self.counters.refused_while_down += 1
        raise Unavailable("CHANNEL_DOWN", f"the {self.channel.label} channel to "
                          f"{self.bank_id} is down", bank_id=self.bank_id,
                          channel=self.channel.label)

    def latency_s(self) -> float:
        """This call's added latency: uniform in [0.5, 1.5] x the mean, so bounded both ways."""
        mean_ms = self.faults.latency_ms
        return 0.0 if mean_ms <= 0 else self._rng.uniform(0.5, 1.5) * mean_ms / 1000.0

    def late_delay_s(self) -> float:
        return self._rng.uniform(0.5, 1.5) * self.faults.late_debit_delay_ms / 1000.0

    def roll(self, *, money: bool, late_allowed: bool) -> Fault:
        """One draw picks this call's fault; see the module docstring for the bands."""
        f = self.faults
        u = self._rng.random()
        for fault, rate, applies in (
            (Fault.DECLINE, f.decline_rate, money),
            (Fault.TIMEOUT, f.timeout_rate, True),
            (Fault.LOST_RESPONSE, f.lost_response_rate, money),
            (Fault.LATE_DEBIT, f.late_debit_rate, money and late_allowed),
        ):
            if u < rate:
                return fault if applies else Fault.NONE
            u -= rate
        return Fault.NONE
