"""The payment butler: every bank call of a process goes through it, one steward per
(bank, channel).

Banks have a limited, known capacity, and a bank driven past it for long
collapses (it stops answering for a while). The butler keeps each bank's
traffic within what it can take and stops calling a bank that is failing,
failing fast instead of piling calls onto it.

Every bank is reached through channels (``direct``, then ``clearing``: see
``gateway.payments.bank``), and each channel of each bank is steered on its own, with its
own capacity, bucket, queue, limit and breaker, as below ("the bank" there means one
channel of it). Routing across them:

- **A new money call** (Debit, Credit) goes through the channel its payment names unless
  that one cannot take it now (breaker not closed, or no token and no in-flight place
  while another channel has both); then it goes through the first channel in order of
  preference that can. Before the call goes through another channel than the payment
  names, the caller's ``switch`` hook records the new channel durably (the payment
  intent), so whatever happens next, the gateway knows the one channel its order id was
  sent through.
- **Refused, it tries the next channel.** A call refused before anything reached the bank
  (BANK_BUSY, BANK_CIRCUIT_OPEN from this butler) or refused by the bank before acting
  (:class:`BankBusy`, :class:`ChannelDown`) left no trace of its order id at the bank, so
  the same order goes through the next channel that can take it, after ``switch``. An
  unclear result never moves: the bank may hold the order on that channel, and only a
  query through that channel can say. With every channel tried, the last refusal is
  raised. A caller with no ``switch`` (or a butler that is off) stays on its channel.
- **A silent channel is passed over at once.** A channel with calls out and no definite
  answer from it for ``stall_s`` (a bank that stopped answering: its calls will end
  unclear, but only at their deadline, and only then can the breaker count them) takes no
  new call while another channel can send at once. The calls already sent stay where they
  are; the breaker opens as they time out.
- **A query** (the resolver's, the breaker's probe) goes through the channel the order
  was sent through, and never another: the bank would answer WRONG_CHANNEL.
- A channel answering :class:`ChannelDown` counts as a failure for its breaker, like an
  unclear result (five in a row open it), but not as an overload signal for its limit.

Per channel:

- **Admission.** A token bucket refilled at the current limit (calls/s, at
  first the configured capacity) and only ``burst_s`` deep, so that no second
  holds much more than one second's worth, plus a concurrency limit
  (``limit x concurrency_window_s`` calls in flight), so that a bank that slows
  down is not handed ever more calls while it holds the earlier ones. A call
  beyond both waits in a bounded FIFO queue for at most ``max_wait_s`` (and
  never past its deadline). If the queue is full, or the wait it would face
  (the calls ahead of it at the current rate) exceeds that, it fails at once
  with ``Unavailable("BANK_BUSY")``. Nothing was sent to the bank, so the
  failure is definite: the caller may mark the payment failed or retry.
- **Adaptive limit (AIMD).** Overload signals are BankBusy (the bank refused:
  over capacity) and BankUnclear (timeouts, UNAVAILABLE, the butler's own
  deadline). When they make up at least ``decrease_error_rate`` of the calls
  answered over the last two seconds, the limit is multiplied by
  ``decrease_factor``, at most once per ``decrease_interval_s``; a rare random
  failure (a lost response now and then) does not shrink it. Each success adds
  back ``increase_per_s`` x capacity per second of successes. The limit stays
  within [floor, capacity], the floor being ``floor_fraction`` x capacity (at
  least 1 call/s).
- **Circuit breaker.** Closed, it opens when ``breaker_consecutive_failures``
  unclear results come in a row, or when over the last ``breaker_window_s``
  seconds at least ``breaker_min_calls`` calls were answered and at least
  ``breaker_error_rate`` of them failed (unclear or busy). Open, every call
  fails fast with ``Unavailable("BANK_CIRCUIT_OPEN")`` and calls waiting in the
  queue are failed the same way. After ``cool_down_s`` it turns half-open and
  probes. The probe is a QueryOrder of an order id this bank has answered
  definitely before (the bank routes a known id through its own gate of
  capacity, faults and collapse, so the query tests exactly what a payment
  would meet, and it moves no money); ``probe_count`` of them in a row must
  succeed, one at a time, each within ``probe_timeout_s``. While those run,
  real calls still fail fast. A process that has never had a definite answer
  from the bank has no such id (QueryOrder of an unknown id passes no gate at
  the simulator, so it would prove nothing); then the next ``probe_count`` real
  calls are the probes and the rest fail fast. All probes succeeding closes the
  breaker; any failing re-opens it, with the cool-down doubled up to
  ``max_cool_down_s``. Opening also counts as one overload signal for the limit,
  so a bank that comes back is fed at a reduced rate that then grows slowly.

Outcomes pass through unchanged: a BankAnswer (settled or declined) is
returned, BankUnclear is re-raised (the money may have moved: the caller must
resolve it), BankBusy is re-raised (the bank refused before acting). The butler
never retries a call itself: deciding to retry a money call is the caller's job.

With ``enabled=False`` every call goes straight to the bank (no admission, no
breaker, no deadline of its own); outcomes are still counted for ``health()``.

Everything runs on one event loop and is bounded: the queue per bank, the
outcome window, the latency sample, the probes, the waits, the log lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import structlog

from gateway.errors import InvalidArgument, Unavailable
from gateway.payments.bank import (
    CHANNELS,
    DIRECT,
    BankAnswer,
    BankBusy,
    BankUnclear,
    ChannelDown,
    OrderStatus,
    bank_of_card,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# What one bank call came to, as far as the bank's health is concerned.
_OK = "ok"  # a definite answer (settled, declined, a query's record)
_BUSY = "busy"  # the bank refused: over capacity
_UNCLEAR = "unclear"  # no definite answer: timeout, UNAVAILABLE, the butler's deadline
_DOWN = "down"  # the channel refused: CHANNEL_DOWN (nothing recorded)
_NEUTRAL = "neutral"  # the caller went away, or a bug upstream (a malformed call)

# The butler's own refusals: nothing reached the bank.
REFUSALS = frozenset({"BANK_BUSY", "BANK_CIRCUIT_OPEN"})

# Records the channel a payment is about to go through, durably, before it does.
Switch = Callable[[str], Awaitable[None]]

_CARD_DECLINES = frozenset({"CARD_DECLINED", "CARD_INSUFFICIENT_FUNDS"})


class BankLike(Protocol):
    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT) -> BankAnswer: ...

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT) -> BankAnswer: ...

    async def query(self, order_id: str, channel: str = DIRECT) -> OrderStatus: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ButlerOptions:
    """How the butler steers each bank; every number is bounded and named by its unit."""

    # Deadline of one call through the butler, queue wait included.
    call_timeout_s: float = 3.0
    # Longest a call waits in its bank's queue for admission (and never past its deadline).
    max_wait_s: float = 0.25
    # Calls waiting per bank; past it a call fails fast with BANK_BUSY.
    queue_limit: int = 1000
    # Depth of the token bucket, in seconds of the current limit. Small, so no second holds
    # more than (1 + burst_s) seconds' worth of calls.
    burst_s: float = 0.02
    # Calls in flight per bank: limit x this (at least 1). A bank answering within this
    # time at its capacity never meets it.
    concurrency_window_s: float = 1.0
    # The adaptive limit never goes below capacity x this (and never below 1 call/s).
    floor_fraction: float = 0.05
    decrease_factor: float = 0.7
    decrease_error_rate: float = 0.1
    decrease_interval_s: float = 1.0
    # Additive increase: this fraction of capacity per second of successes.
    increase_per_s: float = 0.05
    # Breaker: error rate over a window of whole seconds, with a minimum number of calls.
    breaker_window_s: int = 5
    breaker_min_calls: int = 20
    breaker_error_rate: float = 0.5
    # Breaker: this many unclear results in a row open it whatever the rate.
    breaker_consecutive_failures: int = 5
    cool_down_s: float = 5.0
    max_cool_down_s: float = 30.0
    probe_count: int = 3
    probe_timeout_s: float = 1.0
    # A channel with calls out and no definite answer for this long is passed over by new
    # calls while another channel can take them (a channel that went silent).
    stall_s: float = 0.5
    # Latencies kept per bank for latency_ms_p99 (the most recent ones).
    latency_window: int = 1024
    # At most one limit-change log line per bank per interval.
    log_interval_s: float = 1.0

    def __post_init__(self) -> None:
        positive = ("call_timeout_s", "burst_s", "concurrency_window_s", "decrease_interval_s",
                    "cool_down_s", "probe_timeout_s", "log_interval_s", "stall_s")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, not {value!r}")
        if not (0 <= self.max_wait_s <= self.call_timeout_s):
            raise ValueError("max_wait_s must be in [0, call_timeout_s]")
        if self.max_cool_down_s < self.cool_down_s:
            raise ValueError("max_cool_down_s must be >= cool_down_s")
        for name in ("floor_fraction", "decrease_factor"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1)")
        for name in ("decrease_error_rate", "breaker_error_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if not 0 <= self.increase_per_s <= 1:
            raise ValueError("increase_per_s must be in [0, 1]")
        counts = {"queue_limit": 1_000_000, "breaker_window_s": 3600, "breaker_min_calls": 10**6,
                  "breaker_consecutive_failures": 10**6, "probe_count": 100,
                  "latency_window": 1_000_000}
        for name, high in counts.items():
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in 1..{high}")


def bank_of(card_id: str) -> str:
    """The bank a card belongs to (``icbc-6222...`` -> ``icbc``), by the bank's own rule."""
    bank = bank_of_card(card_id)
    if bank is None:
        raise InvalidArgument("BAD_CARD_ID", "card_id must be <bank>-<digits>")
    return bank


class _Window:
    """Outcomes per whole second over the last ``span_s`` seconds (bounded: one row a second)."""

    def __init__(self, span_s: int) -> None:
        self._span_s = span_s
        # [second, answered, failed, overload signals]
        self._rows: collections.deque[list[int]] = collections.deque(maxlen=span_s)

    def add(self, now: float, failed: bool, overload: bool) -> None:
        second = math.floor(now)
        if not self._rows or self._rows[-1][0] != second:
            self._rows.append([second, 0, 0, 0])
        row = self._rows[-1]
        row[1] += 1
        row[2] += failed
        row[3] += overload

    def totals(self, now: float, span_s: int | None = None) -> tuple[int, int, int]:
        """(answered, failed, overload) over the last ``span_s`` seconds, this one included."""
        oldest = math.floor(now) - (span_s or self._span_s) + 1
        answered = failed = overload = 0
        for second, a, f, o in self._rows:
            if second >= oldest:
                answered, failed, overload = answered + a, failed + f, overload + o
        return answered, failed, overload

    def clear(self) -> None:
        self._rows.clear()


class _Steward:
    """One channel of one bank, live: limit, bucket, queue, breaker, outcome window,
    counters."""

    def __init__(self, bank_id: str, channel: str, capacity_tps: float, opts: ButlerOptions,
                 now: float) -> None:
        self.bank_id = bank_id
        self.channel = channel
        self.capacity_tps = capacity_tps
        self.floor_tps = min(capacity_tps, max(1.0, capacity_tps * opts.floor_fraction))
        self.limit_tps = capacity_tps
        self._opts = opts
        self.tokens = self.burst
        self.refilled_at = now
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[Exception | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.window = _Window(opts.breaker_window_s)
        self.latencies_ms: collections.deque[float] = collections.deque(
            maxlen=opts.latency_window)
        self.consecutive_failures = 0
        # Counters since start.
        self.calls = 0
        self.rejected_busy = 0
        self.rejected_open = 0
        self.probes = 0
        self.opens = 0
        self.rerouted_in = 0  # calls that came here because another channel could not
        # Calls sent and not ended, and since when the channel has been answering nothing
        # definite while it had some out (the last answer, or the moment it became busy).
        self.sent_open = 0
        self.quiet_since = now
        self._stall_s = opts.stall_s
        # Breaker. The epoch changes at every transition; an outcome counts for the breaker
        # only if its call was admitted in the current epoch.
        self.state = CLOSED
        self.epoch = 0
        self.cool_down_s = opts.cool_down_s
        self.probe_order_id: str | None = None
        self.probes_in_flight = 0
        self.probe_successes = 0
        self.query_probing = False
        # Limit bookkeeping.
        self.last_decrease = -math.inf
        self.last_increase = now
        self.limit_changes = 0
        self.last_limit_log = -math.inf

    @property
    def burst(self) -> float:
        return max(1.0, self.limit_tps * self._opts.burst_s)

    @property
    def max_in_flight(self) -> int:
        return max(1, math.ceil(self.limit_tps * self._opts.concurrency_window_s))

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.refilled_at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.limit_tps)
        self.refilled_at = now

    def can_go(self) -> bool:
        return self.tokens >= 1 and self.in_flight < self.max_in_flight

    def admits(self, probe_count: int) -> bool:
        """Whether a new call could be admitted at all (now or after a wait): closed, or
        half-open with real calls as the probes and a probe place left."""
        if self.state == CLOSED:
            return True
        return (self.state == HALF_OPEN and not self.query_probing
                and self.probes_in_flight + self.probe_successes < probe_count)

    def free_now(self, now: float) -> bool:
        """Closed, answering, and able to send a call this instant, with nobody queued
        before it."""
        self.refill(now)
        return (self.state == CLOSED and not self.waiters and self.can_go()
                and not self.stalled(now))

    def stalled(self, now: float) -> bool:
        return self.sent_open > 0 and now - self.quiet_since > self._stall_s

    def wait_estimate_s(self) -> float:
        """How long a call joining the queue now would wait at the current rate."""
        return max(0.0, len(self.waiters) + 1 - self.tokens) / self.limit_tps

    def p99_ms(self) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class PaymentButler:
    """Steers every bank call of a process: see the module docstring.

    ``bank`` is a :class:`gateway.payments.bank.BankClient` or anything with the same async
    ``debit``, ``credit`` and ``query``; ``capacities_tps`` maps each bank id to the
    calls per second each of its channels is known to take, and ``channel_capacity_tps``
    overrides that for a channel of every bank (``{"clearing": 500}``). ``channels``
    lists the channels in order of preference.
    """

    def __init__(self, bank: BankLike, capacities_tps: Mapping[str, float],
                 options: ButlerOptions | None = None, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 channels: Sequence[str] = CHANNELS,
                 channel_capacity_tps: Mapping[str, float] | None = None) -> None:
        if not capacities_tps:
            raise ValueError("capacities_tps names no bank")
        overrides = dict(channel_capacity_tps or {})
        if not channels or len(set(channels)) != len(channels) or set(channels) - set(CHANNELS):
            raise ValueError(f"channels must be distinct names of {', '.join(CHANNELS)}")
        if set(overrides) - set(channels):
            raise ValueError(f"channel_capacity_tps names unknown channels: "
                             f"{sorted(set(overrides) - set(channels))}")
        for name, capacity in [*capacities_tps.items(), *overrides.items()]:
            if not (isinstance(capacity, int | float) and math.isfinite(capacity)
                    and capacity > 0):
                raise ValueError(f"capacity of {name!r} must be > 0 calls/s")
        self._bank = bank
        self.options = options or ButlerOptions()
        self.enabled = enabled
        self._clock = clock
        now = clock()
        # Per bank, its channels' stewards in order of preference.
        self._banks = {b: [_Steward(b, ch, float(overrides.get(ch, c)), self.options, now)
                           for ch in channels]
                       for b, c in capacities_tps.items()}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the calls ----------------------------------------------------------------------------

    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        """Debit through the butler, from ``channel`` on (see the module docstring);
        BANK_BUSY / BANK_CIRCUIT_OPEN mean nothing was sent."""
        return await self._move(bank_of(card_id), channel, switch, order_id,
                                lambda ch: self._bank.debit(order_id, card_id, amount_fen, ch))

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        """Credit through the butler, from ``channel`` on; as :meth:`debit`."""
        return await self._move(bank_of(card_id), channel, switch, order_id,
                                lambda ch: self._bank.credit(order_id, card_id, amount_fen, ch))

    async def query(self, order_id: str, card_id: str, channel: str = DIRECT) -> OrderStatus:
        """QueryOrder through the butler, on the channel the order went through."""
        return await self.run(bank_of(card_id), lambda: self._bank.query(order_id, channel),
                              order_id=order_id, channel=channel)

    def route(self, bank_id: str, preferred: str | None = None) -> str | None:
        """The channel a new call to ``bank_id`` would take now: ``preferred`` (by default
        the first) if it can send at once, else the first that can, else the first that
        admits calls at all (it will queue); None when no channel admits any."""
        chans = self._channels(bank_id)
        if not self.enabled:
            return preferred or chans[0].channel
        s = self._pick(chans, preferred or chans[0].channel, set())
        return None if s is None else s.channel

    def usable(self, bank_id: str) -> bool:
        """Whether some channel of ``bank_id`` admits calls (False: each breaker is open)."""
        return self.route(bank_id) is not None

    async def run(self, bank_id: str, call: Callable[[], Awaitable[T]], *,
                  order_id: str | None = None, channel: str = DIRECT) -> T:
        """Makes ``call()`` (one call to bank ``bank_id`` through ``channel``) under the
        butler's steering, without moving it to another channel.

        ``order_id``, when the call concerns one, becomes the breaker's probe id once the
        channel has answered it definitely.
        """
        return await self._through(self._steward(bank_id, channel), call, order_id)

    def _channels(self, bank_id: str) -> list[_Steward]:
        chans = self._banks.get(bank_id)
        if chans is None:
            raise InvalidArgument("UNKNOWN_BANK", f"the butler knows no bank {bank_id!r}",
                                  bank_id=bank_id)
        return chans

    def _steward(self, bank_id: str, channel: str) -> _Steward:
        for s in self._channels(bank_id):
            if s.channel == channel:
                return s
        raise InvalidArgument("UNKNOWN_CHANNEL", f"the butler steers no {channel!r} channel "
                              f"to bank {bank_id!r}", bank_id=bank_id, channel=channel)

    def _pick(self, chans: list[_Steward], preferred: str, tried: set[str]) -> _Steward | None:
        """The channel for the next attempt (see :meth:`route`), among those not tried."""
        candidates = [s for s in chans
                      if s.channel not in tried and s.admits(self.options.probe_count)]
        if not candidates:
            return None
        now = self._clock()
        first = next((s for s in candidates if s.channel == preferred), candidates[0])
        if first.free_now(now):
            return first
        free = next((s for s in candidates if s.free_now(now)), None)
        if free is not None:
            return free
        # Nothing can send at once: queue on the preferred channel, unless it is silent
        # and another is not.
        if first.stalled(now):
            return next((s for s in candidates if not s.stalled(now)), first)
        return first

    async def _move(self, bank_id: str, channel: str, switch: Switch | None,
                    order_id: str, call: Callable[[str], Awaitable[BankAnswer]]) -> BankAnswer:
        """A money call, routed and moved on refusal as the module docstring says."""
        chans = self._channels(bank_id)
        if switch is None or not self.enabled:
            fixed = self._steward(bank_id, channel)
            return await self._through(fixed, functools.partial(call, fixed.channel), order_id)
        tried: set[str] = set()
        refusal: Exception | None = None
        while True:
            s = self._pick(chans, channel, tried)
            if s is None:  # every channel tried or shut: the last refusal, else the breakers'
                raise refusal or self._reject_open(chans[0], all_channels=True)
            if s.channel != channel:
                await switch(s.channel)
                s.rerouted_in += 1
                log.info("bank_channel_switch", bank_id=bank_id, order_id=order_id,
                         came_from=channel, to=s.channel)
                channel = s.channel
            try:
                return await self._through(s, functools.partial(call, s.channel), order_id)
            except Unavailable as err:
                if err.reason not in REFUSALS:
                    raise
                refusal = err
            except BankBusy as err:  # ChannelDown included: the bank recorded nothing
                refusal = err
            tried.add(s.channel)

    async def _through(self, s: _Steward, call: Callable[[], Awaitable[T]],
                       order_id: str | None) -> T:
        if not self.enabled:
            return await self._send(s, call, order_id, epoch=None, deadline_s=None)
        started = self._clock()
        epoch = await self._admit(s, started)
        remaining_s = self.options.call_timeout_s - (self._clock() - started)
        return await self._send(s, call, order_id, epoch, max(remaining_s, 0.001))

    # -- admission ----------------------------------------------------------------------------

    async def _admit(self, s: _Steward, started: float) -> int:
        """Takes a slot (a token and an in-flight place) or fails fast; returns the epoch."""
        if s.state == OPEN:
            raise self._reject_open(s)
        if s.state == HALF_OPEN:
            return self._admit_probe(s)
        now = self._clock()
        s.refill(now)
        if not s.waiters and s.can_go():
            s.tokens -= 1
            s.in_flight += 1
            return s.epoch
        wait_s = min(self.options.max_wait_s,
                     self.options.call_timeout_s - (now - started))
        if len(s.waiters) >= self.options.queue_limit:
            raise self._reject_busy(s, "the queue is full")
        if s.wait_estimate_s() > wait_s:
            raise self._reject_busy(s, "the wait would exceed the bound")
        fut: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        s.waiters.append(fut)
        self._dispatch(s)
        try:
            async with asyncio.timeout(wait_s):
                refusal = await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.result() is None:
                if isinstance(exc, TimeoutError):
                    return s.epoch  # admitted just as the wait ran out: the slot is ours
                self._release(s)
                raise
            fut.cancel()
            with contextlib.suppress(ValueError):  # already taken off by _dispatch or _open
                s.waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                raise self._reject_busy(s, "waited too long") from None
            raise
        if refusal is not None:
            raise refusal
        if s.state != CLOSED:  # the breaker opened between our admission and our turn to run
            self._release(s)
            raise self._reject_open(s)
        return s.epoch

    def _admit_probe(self, s: _Steward) -> int:
        """Half-open with no known order id: the next few real calls are the probes."""
        if s.query_probing or s.probes_in_flight + s.probe_successes >= self.options.probe_count:
            raise self._reject_open(s)
        # A probe skips the bucket and the queue: at most probe_count of them per cool-down.
        s.probes_in_flight += 1
        s.in_flight += 1
        return s.epoch

    def _dispatch(self, s: _Steward) -> None:
        """Hands free slots to waiting calls in order; arms a timer for the next token."""
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        s.refill(self._clock())
        while s.waiters:
            fut = s.waiters[0]
            if fut.done():
                s.waiters.popleft()
                continue
            if s.in_flight >= s.max_in_flight:
                return  # _release dispatches again
            if s.tokens < 1:
                delay_s = (1 - s.tokens) / s.limit_tps
                s.timer = asyncio.get_running_loop().call_later(delay_s, self._dispatch, s)
                return
            s.tokens -= 1
            s.in_flight += 1
            s.waiters.popleft()
            fut.set_result(None)

    def _release(self, s: _Steward) -> None:
        s.in_flight -= 1
        assert s.in_flight >= 0, s.bank_id
        if s.waiters and s.timer is None:
            self._dispatch(s)

    def _reject_busy(self, s: _Steward, why: str) -> Unavailable:
        s.rejected_busy += 1
        return Unavailable("BANK_BUSY", f"bank {s.bank_id} ({s.channel} channel) is at its "
                           f"limit: {why}; nothing was sent", bank_id=s.bank_id,
                           channel=s.channel)

    def _reject_open(self, s: _Steward, *, all_channels: bool = False) -> Unavailable:
        s.rejected_open += 1
        if all_channels:
            return Unavailable("BANK_CIRCUIT_OPEN", f"bank {s.bank_id} is failing on every "
                               "channel; nothing was sent", bank_id=s.bank_id)
        return _open_refusal(s)

    # -- the call and its outcome -------------------------------------------------------------

    async def _send(self, s: _Steward, call: Callable[[], Awaitable[T]], order_id: str | None,
                    epoch: int | None, deadline_s: float | None) -> T:
        """Sends the admitted call, records what came of it, and passes the outcome on."""
        s.calls += 1
        if epoch is None:
            s.in_flight += 1
        t0 = self._clock()
        if s.sent_open == 0:
            s.quiet_since = t0  # idle until now: not silent
        s.sent_open += 1
        outcome = _NEUTRAL
        try:
            if deadline_s is None:
                result = await call()
            else:
                try:
                    async with asyncio.timeout(deadline_s):
                        result = await call()
                except TimeoutError:
                    raise BankUnclear(f"no answer from bank {s.bank_id} within the "
                                      f"butler's deadline ({deadline_s:.3f} s)") from None
            outcome = _OK
            if order_id is not None and _routes_to(result, s.bank_id):
                s.probe_order_id = order_id
            return result
        except ChannelDown:
            outcome = _DOWN
            raise
        except BankBusy:
            outcome = _BUSY
            raise
        except BankUnclear:
            outcome = _UNCLEAR
            raise
        finally:
            s.sent_open -= 1
            latency_s = self._clock() - t0
            if epoch is None:
                s.in_flight -= 1
                self._record(s, outcome, latency_s)
            else:
                probe = s.state == HALF_OPEN and epoch == s.epoch
                if probe:
                    s.probes_in_flight -= 1
                self._release(s)
                self._record(s, outcome, latency_s)
                self._steer(s, outcome, epoch, probe)

    def _record(self, s: _Steward, outcome: str, latency_s: float) -> None:
        if outcome == _NEUTRAL:
            return
        now = self._clock()
        failed = outcome != _OK
        if outcome != _UNCLEAR:
            s.quiet_since = now  # a definite answer: the channel speaks
        s.window.add(now, failed=failed, overload=failed and outcome != _DOWN)
        s.latencies_ms.append(latency_s * 1000.0)

    def _steer(self, s: _Steward, outcome: str, epoch: int, probe: bool) -> None:
        """Moves the limit and the breaker after one call admitted in ``epoch``."""
        if outcome == _NEUTRAL:
            return
        now = self._clock()
        if outcome == _OK:
            self._increase(s, now)
        else:
            self._maybe_decrease(s, now)
        if epoch != s.epoch:
            return  # admitted before the last transition: no say in the breaker now
        if probe:
            if outcome != _OK:
                self._open(s, "a probe call failed")
                return
            s.probe_successes += 1
            if s.probe_successes >= self.options.probe_count:
                self._close(s)
            return
        if s.state != CLOSED:
            return
        if outcome == _OK:
            s.consecutive_failures = 0
            return
        if outcome in (_UNCLEAR, _DOWN):
            s.consecutive_failures += 1
        if s.consecutive_failures >= self.options.breaker_consecutive_failures:
            self._open(s, f"{s.consecutive_failures} unclear or down results in a row")
            return
        answered, failed, _ = s.window.totals(now)
        if (answered >= self.options.breaker_min_calls
                and failed >= self.options.breaker_error_rate * answered):
            self._open(s, f"{failed} of {answered} calls failed")

    # -- the adaptive limit -------------------------------------------------------------------

    def _increase(self, s: _Steward, now: float) -> None:
        elapsed_s = min(max(0.0, now - s.last_increase), 1.0)
        s.last_increase = now
        if s.limit_tps >= s.capacity_tps:
            return
        step = s.capacity_tps * self.options.increase_per_s * elapsed_s
        self._set_limit(s, min(s.capacity_tps, s.limit_tps + step), now)

    def _maybe_decrease(self, s: _Steward, now: float, *, force: bool = False) -> None:
        if not force:
            if now - s.last_decrease < self.options.decrease_interval_s:
                return
            answered, _, overload = s.window.totals(now, 2)
            if overload < self.options.decrease_error_rate * answered:
                return
        s.last_decrease = now
        self._set_limit(s, max(s.floor_tps, s.limit_tps * self.options.decrease_factor), now)

    def _set_limit(self, s: _Steward, limit_tps: float, now: float) -> None:
        if limit_tps == s.limit_tps:
            return
        went = "down" if limit_tps < s.limit_tps else "up"
        s.limit_tps = limit_tps
        s.tokens = min(s.tokens, s.burst)
        s.limit_changes += 1
        if now - s.last_limit_log >= self.options.log_interval_s:
            log.info("bank_limit", bank_id=s.bank_id, channel=s.channel,
                     limit_tps=round(limit_tps, 1), capacity_tps=s.capacity_tps, went=went,
                     changes=s.limit_changes)
            s.last_limit_log = now
            s.limit_changes = 0
        if s.waiters and s.timer is not None:
            self._dispatch(s)  # the next token's time changed

    # -- the breaker --------------------------------------------------------------------------

    def _open(self, s: _Steward, why: str) -> None:
        now = self._clock()
        if s.state == HALF_OPEN:
            s.cool_down_s = min(self.options.max_cool_down_s, s.cool_down_s * 2)
        s.state = OPEN
        s.epoch += 1
        s.opens += 1
        s.probes_in_flight = s.probe_successes = 0
        s.query_probing = False
        s.consecutive_failures = 0
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        while s.waiters:
            fut = s.waiters.popleft()
            if not fut.done():
                s.rejected_open += 1
                fut.set_result(_open_refusal(s))
        self._maybe_decrease(s, now, force=True)
        log.warning("bank_breaker", bank_id=s.bank_id, channel=s.channel, state=OPEN, why=why,
                    cool_down_s=s.cool_down_s, limit_tps=round(s.limit_tps, 1))
        self._spawn(self._recover(s, s.epoch))

    def _close(self, s: _Steward) -> None:
        s.state = CLOSED
        s.epoch += 1
        s.cool_down_s = self.options.cool_down_s
        s.probes_in_flight = s.probe_successes = 0
        s.query_probing = False
        s.consecutive_failures = 0
        s.window.clear()  # the failures that opened it must not open it again
        log.info("bank_breaker", bank_id=s.bank_id, channel=s.channel, state=CLOSED,
                 limit_tps=round(s.limit_tps, 1))

    async def _recover(self, s: _Steward, epoch: int) -> None:
        """Waits out the cool-down, then probes the bank (see the module docstring)."""
        await asyncio.sleep(s.cool_down_s)
        if s.epoch != epoch:
            return
        s.state = HALF_OPEN
        s.epoch += 1
        probe_id = s.probe_order_id
        s.query_probing = probe_id is not None
        log.info("bank_breaker", bank_id=s.bank_id, channel=s.channel, state=HALF_OPEN,
                 probe="query" if probe_id else "next calls")
        if probe_id is None:
            return
        epoch = s.epoch
        for _ in range(self.options.probe_count):
            ok = await self._probe(s, probe_id)
            if s.epoch != epoch:
                return
            if not ok:
                self._open(s, "a probe query failed")
                return
        self._close(s)

    async def _probe(self, s: _Steward, order_id: str) -> bool:
        s.probes += 1
        s.in_flight += 1
        try:
            async with asyncio.timeout(self.options.probe_timeout_s):
                await self._bank.query(order_id, s.channel)
            return True
        except (BankBusy, BankUnclear, TimeoutError):
            return False
        except Exception as exc:  # any failed probe means "not healthy yet":
            # letting it escape would end the recovery task and leave the breaker half-open.
            log.warning("bank_probe_error", bank_id=s.bank_id, channel=s.channel, error=repr(exc))
            return False
        finally:
            self._release(s)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- health and shutdown ------------------------------------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """Per channel of each bank (banks in order, channels in order of preference):
        limit (calls/s), in_flight, queued, latency_ms_p99, error_rate, breaker_state,
        traffic_share (of the bank's calls answered over the breaker's window), calls,
        rejected_fast and a few more counters."""
        now = self._clock()
        out = []
        for chans in self._banks.values():
            windows = [s.window.totals(now) for s in chans]
            bank_answered = sum(w[0] for w in windows)
            for s, (answered, failed, _) in zip(chans, windows, strict=True):
                out.append(self._row(s, answered, failed, bank_answered))
        return out

    def _row(self, s: _Steward, answered: int, failed: int,
             bank_answered: int) -> dict[str, Any]:
        return {
            "bank_id": s.bank_id,
            "channel": s.channel,
            "limit": int(s.limit_tps),
            "capacity": int(s.capacity_tps),
            "in_flight": s.in_flight,
            "max_in_flight": s.max_in_flight,
            "queued": len(s.waiters),
            "latency_ms_p99": round(s.p99_ms(), 3),
            "error_rate": failed / answered if answered else 0.0,
            "breaker_state": s.state,
            "traffic_share": answered / bank_answered if bank_answered else 0.0,
            "stalled": s.stalled(self._clock()),
            "calls": s.calls,
            "rerouted_in": s.rerouted_in,
            "rejected_fast": s.rejected_busy + s.rejected_open,
            "rejected_busy": s.rejected_busy,
            "rejected_open": s.rejected_open,
            "breaker_opens": s.opens,
            "probes": s.probes,
            "enabled": self.enabled,
        }

    def troubled_banks(self, error_rate: float) -> list[str]:
        """Banks with no closed channel, or whose closed channels all fail at least
        ``error_rate`` of their calls: a bank the butler has routed around is not one."""
        now = self._clock()
        out = []
        for bank_id, chans in self._banks.items():
            ok = False
            for s in chans:
                answered, failed, _ = s.window.totals(now)
                if s.state == CLOSED and not (answered and failed / answered > error_rate):
                    ok = True
            if not ok:
                out.append(bank_id)
        return out

    async def close(self) -> None:
        """Stops the breakers' probe tasks (the bank client is the caller's to close)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in (s for chans in self._banks.values() for s in chans):
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None


def _open_refusal(s: _Steward) -> Unavailable:
    return Unavailable("BANK_CIRCUIT_OPEN", f"bank {s.bank_id} ({s.channel} channel) is "
                       "failing; nothing was sent", bank_id=s.bank_id, channel=s.channel)


def _routes_to(result: Any, bank_id: str) -> bool:
    """Whether the bank now holds the order with a card of ``bank_id``, so that a
    QueryOrder of it passes that bank's gate (a probe that proves something)."""
    if isinstance(result, BankAnswer):
        # A decline for a voided or reused id may concern a record with no card.
        return result.settled or result.decline_reason in _CARD_DECLINES
    return getattr(result, "bank_id", "") == bank_id

