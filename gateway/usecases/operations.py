"""What an operator asks of a running gateway: live QoS state, consumer rates, reconcile,
and (cluster mode) the credits this SET exchanged with the others."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from gateway import errors
from gateway.domain.audit import Report
from gateway.domain.keys import SLOTS
from gateway.domain.model import LedgerStats, SlotExport
from gateway.domain.reads import InterSetCredits
from gateway.ledger import Ledger
from gateway.payments.bank import BankClient
from gateway.payments.butler import PaymentButler
from gateway.payments.crosscheck import cross_check_bank
from gateway.qos.controller import split_level
from gateway.qos.governor import Governor
from gateway.qos.tiers import Tier

MAX_RATE_PER_S = 10_000_000
_MOVE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DUE_SCAN_LIMIT = 10_000  # the payment-unknown lag is counted up to this many
INTERSET_CHUNK = 1_000  # inter-SET credits per ListInterSetCredits response (~40 KB)


class RateControlled(Protocol):
    rate_per_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class TopicLag:
    topic: str
    lag: int
    rate_per_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class TierCount:
    """One tier's calls since the worker started, and whether the level sheds it now."""

    tier: str  # "P0".."P3"
    offered: int
    admitted: int
    shed: int
    shedding: bool


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionState:
    """The admission controller's state as operators see it."""

    enabled: bool
    level: int  # tier * 128 + user priority; 511 admits everything
    level_tier: str  # the tier the level is in, "P0".."P3"
    level_user_priority: int
    queuing_delay_ms: float  # the last window's mean (handler start + writer queue wait)
    loop_lag_ms: float
    windows: int
    tiers: list[TierCount]
    degradations: dict[str, bool]  # name -> in force
    free_share: float  # of Moments unlocks
    noncore_share: float  # of the non-core consumers' nominal rate
    served: dict[str, int] = dataclasses.field(default_factory=dict)  # degraded answers
    loop_busy: float = 0.0  # share of the last tick the loop's thread was on a CPU


@dataclasses.dataclass(frozen=True, slots=True)
class QosStatus:
    topics: list[TopicLag]
    banks: list[dict[str, Any]]  # the butler's health rows
    writer_queue_depth: int
    admission: AdmissionState | None = None  # None when no governor runs (tests of parts)


def _rate_of(consumer: RateControlled | None) -> float:
    """The rate a consumer runs at now (its floor while stepped down), 0 when absent."""
    if consumer is None:
        return 0.0
    return float(getattr(consumer, "effective_rate_per_s", consumer.rate_per_s))


class Operations:
    """``consumers`` maps a topic to the loop draining it (None when this worker has none);
    ``runs_consumers`` says whether this worker runs them now (it holds the background role)."""

    def __init__(self, ledger: Ledger, butler: PaymentButler | None, bank: BankClient | None,
                 consumers: dict[str, RateControlled | None],
                 governor: Governor | None = None) -> None:
        self._governor = governor
        self._ledger = ledger
        self._butler = butler
        self._bank = bank
        self._consumers = consumers
        self.runs_consumers: Callable[[], bool] = lambda: True
        # Cluster mode: this SET's placement (gateway.cluster.node.ClusterNode), for the
        # slot handoff's checks; None in the embedded mode.
        self.cluster: Any = None

    async def ledger_stats(self) -> LedgerStats:
        return await self._ledger.stats()

    async def qos_status(self) -> QosStatus:
        stats = await self._ledger.stats()
        lags = {"credit": stats.credit_backlog,
                "payment-unknown": len(await self._ledger.due_payments(_DUE_SCAN_LIMIT))}
        here = self.runs_consumers()
        topics = [TopicLag(topic, lags[topic], _rate_of(c if here else None))
                  for topic, c in self._consumers.items()]
        banks = self._butler.health() if self._butler is not None else []
        return QosStatus(topics, banks, stats.queue_depth, self.admission_state())

    def admission_state(self) -> AdmissionState | None:
        gov = self._governor
        if gov is None:
            return None
        c, p = gov.controller, gov.pressure
        tier, prio = split_level(gov.level)
        tiers = [TierCount(t.name, gov.offered[t], gov.admitted[t], gov.shed[t], p.sheds(t))
                 for t in Tier]
        return AdmissionState(gov.enabled, gov.level, Tier(tier).name, prio,
                              c.last_mean_delay_ms, gov.loop_lag_ms, c.windows, tiers,
                              p.in_force(), p.free_share, p.noncore_share, dict(p.served),
                              gov.loop_busy)

    def set_consumer_rate(self, topic: str, rate_per_s: float) -> float:
        if topic not in self._consumers:
            raise errors.NotFound("UNKNOWN_TOPIC", f"no topic {topic!r}; "
                                  f"topics: {', '.join(self._consumers)}")
        if not math.isfinite(rate_per_s) or not 0 <= rate_per_s <= MAX_RATE_PER_S:
            raise errors.InvalidArgument("BAD_RATE",
                                         f"rate_per_second must be in 0..{MAX_RATE_PER_S}")
        consumer = self._consumers[topic]
        if consumer is None or not self.runs_consumers():
            raise errors.FailedPrecondition(
                "NO_CONSUMER_HERE", "this worker runs no consumer of that topic; ask the worker "
                "holding the background role (its log says background_role_acquired)")
        consumer.rate_per_s = rate_per_s
        return rate_per_s

    async def reconcile(self, *, bank_cross_check: bool = True) -> Report:
        """The audit of this SET's books, and the bank cross-check when this gateway has a
        bank and ``bank_cross_check`` (the cluster reconcile turns it off and checks the
        bank once over every SET: one bank holds the money of all of them)."""
        report = await self._ledger.audit()
        if self._bank is not None and bank_cross_check:
            await cross_check_bank(report, self._bank)
        return report

    async def export_slots(self, slots: list[int], to_set: str, move_id: str,
                           map_version: int) -> SlotExport:
        """The old owner's half of a slot handoff (``hongbao cluster move``): refused unless
        the map this SET holds (read again if older than ``map_version``) has every slot
        frozen for ``to_set``, so no call of the slots is being served here meanwhile."""
        node = self.cluster
        if node is None:
            raise errors.FailedPrecondition("NOT_A_CLUSTER", "this gateway runs no cluster")
        if not _MOVE_ID.fullmatch(move_id):
            raise errors.InvalidArgument("BAD_MOVE_ID", "move_id must be 1..64 of [A-Za-z0-9._-]")
        if not slots or any(not 0 <= s < SLOTS for s in slots):
            raise errors.InvalidArgument("BAD_SLOTS", f"slots must be in 0..{SLOTS - 1}")
        await node.refresh_if_older(map_version)
        loose = [s for s in slots if node.frozen_to(s) != to_set]
        if loose:
            raise errors.FailedPrecondition(
                "SLOT_NOT_FROZEN", f"slots {loose[:5]} are not frozen for SET {to_set} in map "
                f"version {node.version}", map_version=str(node.version))
        return await self._ledger.export_slots(set(slots), to_set, move_id)

    async def import_complete(self, move_id: str) -> bool:
        return await self._ledger.import_complete(move_id)

    async def interset_credits(self, chunk: int = INTERSET_CHUNK
                               ) -> AsyncIterator[InterSetCredits]:
        """The ledger's inter-SET credits (one snapshot) in chunks of at most ``chunk``.

        Always at least one chunk, and only the first carries the ``x:`` balances, so a
        caller that joins the chunks gets them once. The snapshot is read whole before the
        first chunk leaves: a slow caller then holds no LMDB read transaction open (which
        would keep the writer from reusing pages) for as long as it takes to read.
        """
        assert chunk > 0, chunk
        listing = await self._ledger.interset_credits()
        credits = listing.credits
        for start in range(0, max(len(credits), 1), chunk):
            yield InterSetCredits(credits[start:start + chunk],
                                  listing.balances if start == 0 else {})
