"""What the degradations read: one worker's QoS state, updated once per window.

The admission controller decides who is served; the degradations decide how.
They read this object rather than the controller, so a use case asks a plain
question ("is P2 being shed?", "what share of unlocks is free?") and the
answer changes only when a window closes (about once a second), never in the
middle of a request.

- :meth:`sheds` - whether the current level refuses any of a tier.
- :attr:`free_share` - the share of Moments unlocks that are free: it grows by
  ``free_step`` each window the payment path is under pressure (P3 shed, the
  writer queue or a bank in trouble) up to 1.0, and shrinks by the same step
  each calm window down to 0.
- :attr:`noncore_share` - the share of their nominal rate non-core consumers
  run at: ``noncore_floor_share`` while the level is raised, 1.0 otherwise.
- :attr:`writer_trouble` - the writer is the bottleneck; the credit consumer
  slows to its floor only then.
- :meth:`note` counts a request served degraded; :meth:`in_force` names the
  degradations in force in the last window, for GetQosStatus and metrics.

A method that degrades rather than fails (``tiers.DEGRADABLE``: GetBalance,
ListTransactions) is not refused by the admission interceptor when its level
is over the line: the call goes on with :data:`refused` set to its tier, and
the use case answers from its cache, or raises :meth:`Pressure.refusal` (the
same RESOURCE_EXHAUSTED ``SHED`` the interceptor would have sent) when it has
nothing cached.
"""

from __future__ import annotations

import collections
from contextvars import ContextVar

from gateway import errors
from gateway.qos.controller import MAX_LEVEL, USER_LEVELS
from gateway.qos.tiers import Tier

# The named degradations, in the order status displays list them.
BALANCE_CACHE = "balance_cache"  # GetBalance answered from the cache (stale = true)
LIST_CACHE = "list_cache"  # ListTransactions answered from the cache (stale = true)
NONCORE_STEPDOWN = "noncore_stepdown"  # non-core consumers at their floor rate
CREDIT_STEPDOWN = "credit_stepdown"  # the credit consumer at its floor (writer bottleneck)
MOMENTS_FREE = "moments_free"  # a share of Moments unlocks free
DEGRADATIONS = (BALANCE_CACHE, LIST_CACHE, NONCORE_STEPDOWN, CREDIT_STEPDOWN, MOMENTS_FREE)

# Set by the admission interceptor inside a degradable call it would have refused:
# the call's tier. None (the default) when the call was admitted.
refused: ContextVar[Tier | None] = ContextVar("hongbao_qos_refused", default=None)


def shed_error(tier: Tier, level: int, pushback_ms: int) -> errors.ResourceExhausted:
    """The refusal of a shed call: RESOURCE_EXHAUSTED, reason SHED, tier and level."""
    return errors.ResourceExhausted(
        "SHED", f"overloaded: {tier.name} calls of this user are shed at level {level}",
        retry_after_ms=pushback_ms, tier=tier.name, level=str(level))


class Pressure:
    """One per worker process; read by the use cases, updated by the QoS governor."""

    def __init__(self, *, free_step: float = 0.25, noncore_floor_share: float = 0.1,
                 pushback_ms: int = 1000) -> None:
        assert 0 < free_step <= 1 and 0 < noncore_floor_share <= 1
        self.pushback_ms = pushback_ms
        self.free_step = free_step
        self.noncore_floor_share = noncore_floor_share
        self.level = MAX_LEVEL
        self.writer_trouble = False
        self.bank_trouble = False
        self.free_share = 0.0
        self.noncore_share = 1.0
        self.served: collections.Counter[str] = collections.Counter()  # since start
        self._window: collections.Counter[str] = collections.Counter()
        self._last_window: collections.Counter[str] = collections.Counter()

    # -- read by the use cases ---------------------------------------------------------

    def sheds(self, tier: Tier) -> bool:
        """True when the current level refuses at least part of ``tier``."""
        return self.level < int(tier) * USER_LEVELS + USER_LEVELS - 1

    @property
    def raised(self) -> bool:
        """True when anything at all is being shed."""
        return self.level < MAX_LEVEL

    @property
    def payment_pressure(self) -> bool:
        """The Moments condition: P3 shed, or the writer or a bank in trouble."""
        return self.sheds(Tier.P3) or self.writer_trouble or self.bank_trouble

    def refusal(self, tier: Tier) -> errors.ResourceExhausted:
        """The SHED error for a call of ``tier`` at the current level."""
        return shed_error(tier, self.level, self.pushback_ms)

    def note(self, degradation: str) -> None:
        """Counts one request served degraded."""
        self.served[degradation] += 1
        self._window[degradation] += 1

    # -- written by the governor ---------------------------------------------------------

    def start_at(self, level: int) -> None:
        """The level before the first window (a pinned one), without a window's steps."""
        self.level = level
        self.noncore_share = self.noncore_floor_share if self.raised else 1.0

    def update(self, level: int, *, writer_trouble: bool = False,
               bank_trouble: bool = False) -> None:
        """Called when an admission window closes, with the new level and signals."""
        self.level = level
        self.writer_trouble = writer_trouble
        self.bank_trouble = bank_trouble
        step = self.free_step
        if self.payment_pressure:
            self.free_share = min(1.0, self.free_share + step)
        else:
            self.free_share = max(0.0, self.free_share - step)
        if self.free_share < 1e-9:
            self.free_share = 0.0
        self.noncore_share = self.noncore_floor_share if self.raised else 1.0
        self._last_window, self._window = self._window, collections.Counter()

    def in_force(self) -> dict[str, bool]:
        """Each degradation: in force now, or served in the last window."""
        state = {
            BALANCE_CACHE: self.sheds(Tier.P2),
            LIST_CACHE: self.sheds(Tier.P2),
            NONCORE_STEPDOWN: self.raised,
            CREDIT_STEPDOWN: self.writer_trouble,
            MOMENTS_FREE: self.free_share > 0,
        }
        return {name: state[name] or self._last_window[name] > 0 for name in DEGRADATIONS}
