"""Time-driven work of worker 0, off the request path (peak shaving, SPEC lesson 3).

The credit consumer drains the ledger's credit outbox (written in the same
transaction as each grab), moving grabbed shares from pending credit into
wallets at a rate that can change at run time; each credit is idempotent by
grab id, so a crash between applying and acknowledging can only repeat a
no-op. The expiry sweeper returns what expired envelopes left unclaimed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gateway import errors
from gateway.ledger import Ledger
from gateway.loops import BackgroundLoop
from gateway.qos.pressure import Pressure

log = structlog.get_logger(__name__)

_MAX_IDLE_S = 0.1  # the credit consumer's longest pause between looks when idle (or a wake-up)


class CreditConsumer(BackgroundLoop):
    """Applies pending credits in batches, at a rate that can change at run time."""

    topic = "credit"

    def __init__(self, ledger: Ledger, *, batch: int = 1024, rate_per_s: float = 100_000.0,
                 idle_sleep_s: float = 0.01, pressure: Pressure | None = None,
                 floor_rate_per_s: float = 1_000.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``pressure.writer_trouble`` (the writer is the bottleneck) slows crediting to
        ``floor_rate_per_s``, leaving the writer to the money path; otherwise the rate
        holds whatever the level (credits are core work: money users are waiting for)."""
        assert batch >= 1 and rate_per_s >= 0 and floor_rate_per_s >= 0
        super().__init__()
        self._pressure = pressure
        self.floor_rate_per_s = floor_rate_per_s
        self._work = asyncio.Event()
        self._ledger = ledger
        self._batch = batch
        self.rate_per_s = rate_per_s  # credits per second; 0 pauses the topic
        self._idle_sleep_s = idle_sleep_s
        self.applied = 0
        self._clock = clock

    def wake(self) -> None:
        """New credits may be waiting: end an idle pause now (cheap when already awake)."""
        self._work.set()

    async def _idle(self, seconds: float) -> None:
        """Sleeps up to ``seconds``, waking at once on :meth:`wake` or stop."""
        if not self._work.is_set():
            waiters = [asyncio.ensure_future(self._work.wait()),
                       asyncio.ensure_future(self.pause(seconds))]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:  # cancelled too: a waiter left behind would wait forever
                for w in waiters:
                    w.cancel()
        self._work.clear()

    @property
    def effective_rate_per_s(self) -> float:
        """The rate set, or the floor while the writer is the bottleneck."""
        p = self._pressure
        if p is not None and p.writer_trouble:
            return min(self.rate_per_s, self.floor_rate_per_s)
        return self.rate_per_s

    async def run(self) -> None:
        idle = 0.0
        while not self.stopping:
            rate = self.effective_rate_per_s
            if rate <= 0:
                await self.pause(0.1)
                continue
            # A slice of at most 100 ms of the rate, so a new rate bites quickly.
            limit = max(1, min(self._batch, int(rate * 0.1)))
            started = self._clock()
            try:
                n = await self._ledger.apply_credits(limit)
            except errors.GatewayError as err:  # queue full or shutting down: back off
                log.warning("credit_consumer_backoff", reason=err.reason)
                n = 0
            self.applied += n
            if n == 0:
                # Idle: look again after a pause that doubles up to _MAX_IDLE_S (a look
                # is a read; nothing is written while there is nothing to credit).
                idle = min(_MAX_IDLE_S, idle * 2) if idle else self._idle_sleep_s
                await self._idle(idle)
                continue
            idle = 0.0
            await self.pause(n / rate - (self._clock() - started))


class ExpirySweeper(BackgroundLoop):
    """Every ``interval_s``, refunds envelopes whose expiry has passed, in bounded batches."""

    def __init__(self, ledger: Ledger, *, interval_s: float = 1.0, batch: int = 500) -> None:
        super().__init__()
        self._ledger = ledger
        self._interval_s = interval_s
        self._batch = batch
        self.refunded = 0

    async def run(self) -> None:
        while not self.stopping:
            try:
                n = await self._ledger.expire_due(self._batch)
            except errors.GatewayError as err:
                log.warning("expiry_sweeper_backoff", reason=err.reason)
                n = 0
            self.refunded += n
            if n < self._batch:
                await self.pause(self._interval_s)
