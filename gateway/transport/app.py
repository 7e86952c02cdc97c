"""The app factory: one worker's parts, built from ``Settings`` in one place.

Builds the ledger, the grab gate, the bank link, the payment butler, the use
cases, the background workers (worker 0 only) and the interceptor chain, so
``hongbao serve``, tests and a future cluster mode construct the same thing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health

import hotpath
from gateway.config import Settings
from gateway.ledger import Ledger, LmdbLedger
from gateway.loops import BackgroundLoop
from gateway.payments.bank import BankClient
from gateway.payments.butler import ButlerOptions, PaymentButler
from gateway.payments.resolver import Resolver
from gateway.qos.controller import AdmissionController
from gateway.qos.governor import Governor, Thresholds, WriterSample
from gateway.qos.pressure import Pressure
from gateway.qos.tiers import tier_table
from gateway.qos.userlimit import UserRateLimiter
from gateway.security import tickets
from gateway.transport.interceptors.admission import AdmissionInterceptor
from gateway.transport.interceptors.auth import AuthInterceptor
from gateway.transport.interceptors.logging import LoggingInterceptor
from gateway.transport.interceptors.routing import Peers, RoutingInterceptor
from gateway.transport.metrics import Metrics
from gateway.transport.role import BackgroundRole
from gateway.usecases import (
    BoundCards,
    CardPayments,
    Gateway,
    Grabbing,
    Moments,
    Operations,
    Sending,
    WalletReads,
)
from gateway.usecases.background import CreditConsumer, ExpirySweeper

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class App:
    """Everything one worker process runs, and how to stop it."""

    settings: Settings
    keyring: tickets.KeyRing
    ledger: Ledger
    gateway: Gateway
    bank: BankClient | None
    butler: PaymentButler | None
    credit: CreditConsumer | None
    background: list[BackgroundLoop]
    interceptors: list[grpc.aio.ServerInterceptor]
    pressure: Pressure
    governor: Governor
    metrics: Metrics
    health: Any  # grpc_health.v1.health.aio.HealthServicer (absent from grpc-stubs)
    # Who runs the background loops among the workers of one data directory; None: this
    # process runs them unconditionally (tests, a single embedded worker).
    role: BackgroundRole | None = None
    # Cluster mode: this SET's view of the cluster (gateway.cluster.node.ClusterNode) and
    # the channels its routing forwards on; None in the embedded mode.
    cluster: Any = None
    peers: Peers | None = None
    _tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)
    _role_task: asyncio.Task | None = None

    def start_background(self) -> None:
        """Starts the governor (every worker) and the background loops: at once without a
        role, else once this worker holds it (when the holder dies, another takes over)."""
        self._tasks = [asyncio.create_task(self.governor.run())]
        if self.role is None:
            self._start_loops()
        else:
            self._role_task = asyncio.create_task(self._take_role(self.role))

    def _start_loops(self) -> None:
        self._tasks += [asyncio.create_task(_kept_running(w)) for w in self.background]

    async def _take_role(self, role: BackgroundRole) -> None:
        await role.acquire()
        self._start_loops()

    def runs_background(self) -> bool:
        return self.role is None or self.role.held

    async def close(self) -> None:
        """Stops the background workers, then the bank link, then the ledger (in that order)."""
        self.governor.stop()
        for w in self.background:
            w.stop()
        if self._role_task is not None:
            self._role_task.cancel()   # a worker still waiting for the role stops waiting
            await asyncio.gather(self._role_task, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.role is not None:
            self.role.release()
        if self.butler is not None:
            await self.butler.close()
        if self.bank is not None:
            await self.bank.close()
        if self.peers is not None:
            await self.peers.close()
        if self.cluster is not None:
            await self.cluster.close()
        self.ledger.close()


async def _kept_running(loop: BackgroundLoop, restart_s: float = 1.0) -> None:
    """Runs a background loop until it is stopped. A loop that raises is a bug, but the
    work it does (crediting, expiry, payment resolution, the relay between SETs) must not
    stop silently with it: the error is logged with its traceback, and the loop starts
    again after ``restart_s``. Each loop's work is idempotent, so a restart redoes nothing."""
    while not loop.stopping:
        try:
            await loop.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background_loop_failed", loop=type(loop).__name__)
            await loop.pause(restart_s)


def open_ledger(settings: Settings, data_dir: Path) -> LmdbLedger:
    return LmdbLedger(
        data_dir, durable=settings.durability == "strict",
        map_size_bytes=settings.map_size_mb << 20, max_readers=settings.max_readers,
        max_batch=settings.writer_max_batch, max_wait_s=settings.writer_max_wait_ms / 1000,
        queue_limit=settings.writer_queue_limit)


def build_governor(settings: Settings, ledger: Ledger, butler: PaymentButler | None,
                   pressure: Pressure) -> Governor:
    """The worker's admission: controller options, signals and thresholds from settings."""
    async def writer() -> WriterSample:
        stats = await ledger.stats()
        return WriterSample(stats.queue_depth, stats.queue_wait_s_total, stats.requests,
                            stats.cpu_s_total)

    def bank_trouble() -> bool:
        return butler is not None and bool(butler.troubled_banks(settings.qos_bank_error_rate))

    pin = settings.qos_pin_level if settings.qos_pin_level >= 0 else None
    return Governor(
        lambda **hooks: AdmissionController(settings.controller_options(), pinned_level=pin,
                                            **hooks),
        pressure, enabled=settings.qos_enabled, writer=writer, bank_trouble=bank_trouble,
        thresholds=Thresholds(loop_lag_ms=settings.qos_loop_lag_ms,
                              writer_depth=settings.qos_writer_depth,
                              loop_busy=settings.qos_loop_busy),
        tick_s=min(0.1, settings.qos_window_s / 2))


def build_app(settings: Settings, keyring: tickets.KeyRing, ledger: Ledger, *,
              bank_target: str | None = None, run_background: bool = True,
              bank_credentials: grpc.ChannelCredentials | None = None,
              role: BackgroundRole | None = None, cluster: Any = None) -> App:
    """Wires one worker; ``run_background`` builds the background loops (they start when
    the worker holds the background role, see ``role.py``). ``cluster`` (a started
    ``gateway.cluster.node.ClusterNode``) makes the worker one of a SET: the ledger learns
    where wallets live, the relay and the credit consumer of the stream join the
    background loops, and calls for other SETs' slots are routed to them."""
    pressure = Pressure(free_step=settings.unlock_free_step,
                        noncore_floor_share=settings.noncore_floor_share,
                        pushback_ms=settings.qos_retry_pushback_ms)
    bank = (BankClient(bank_target, settings.bank_timeout_s, bank_credentials)
            if bank_target else None)
    butler = None
    if bank is not None:
        butler = PaymentButler(bank, settings.capacities(),
                               ButlerOptions(call_timeout_s=settings.bank_timeout_s,
                                             stall_s=settings.bank_stall_s),
                               enabled=settings.butler_enabled,
                               channels=settings.bank_channels,
                               channel_capacity_tps=settings.channel_capacity_tps)
    credit = resolver = None
    background: list[BackgroundLoop] = []
    if run_background:
        credit = CreditConsumer(ledger, batch=settings.credit_batch,
                                rate_per_s=settings.credit_rate_per_s, pressure=pressure,
                                floor_rate_per_s=settings.credit_floor_rate_per_s)
        background += [credit, ExpirySweeper(ledger, interval_s=settings.expiry_sweep_s)]
        if bank is not None:
            resolver = Resolver(ledger, bank, delay_s=settings.resolve_delay_s,
                                max_backoff_s=settings.resolver_max_backoff_s)
            background.append(resolver)
    governor = build_governor(settings, ledger, butler, pressure)
    bound = BoundCards(ledger, settings)
    cards = CardPayments(ledger, settings, butler, bound)
    gateway = Gateway(
        settings=settings,
        sending=Sending(ledger, settings, cards),
        grabbing=Grabbing(ledger, hotpath.GrabGate(settings.gate_max_envelopes)),
        cards=cards,
        moments=Moments(ledger, settings, pressure),
        pressure=pressure,
        wallet=WalletReads(ledger, settings, pressure),
        operations=Operations(ledger, butler, bank,
                              {"credit": credit, "payment-unknown": resolver}, governor),
        limits=UserRateLimiter(settings.user_rate_per_s, settings.user_burst),
        bound=bound)
    metrics = Metrics()
    interceptors = [AdmissionInterceptor(governor, metrics, tier_table(settings.tiers)),
                    LoggingInterceptor(access_log=settings.access_log,
                                       echo_request_id=settings.echo_request_id),
                    AuthInterceptor(keyring)]
    if credit is not None:
        gateway.grabbing.on_credit = credit.wake
    peers = None
    if cluster is not None:
        ledger.set_placement(cluster.away)
        gateway.operations.cluster = cluster
        if run_background:
            background += cluster.loops(ledger)
        peers = Peers()
        interceptors.append(RoutingInterceptor(cluster, peers,
                                               pushback_ms=settings.qos_retry_pushback_ms))
    app = App(settings, keyring, ledger, gateway, bank, butler, credit, background,
              interceptors, pressure, governor, metrics,
              health.aio.HealthServicer(),  # type: ignore[attr-defined]
              role, cluster, peers)
    gateway.operations.runs_consumers = app.runs_background
    return app
