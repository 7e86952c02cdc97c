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
from grpc_health.v1 import health

import hotpath
from gateway.config import Settings
from gateway.ledger import Ledger, LmdbLedger
from gateway.loops import BackgroundLoop
from gateway.payments.bank import BankClient
from gateway.payments.butler import ButlerOptions, PaymentButler
from gateway.payments.resolver import Resolver
from gateway.qos.pressure import Pressure
from gateway.security import tickets
from gateway.transport.interceptors.auth import AuthInterceptor
from gateway.transport.interceptors.logging import LoggingInterceptor
from gateway.usecases import (
    CardPayments,
    Gateway,
    Grabbing,
    Operations,
    Sending,
    WalletReads,
)
from gateway.usecases.background import CreditConsumer, ExpirySweeper


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
    health: Any  # grpc_health.v1.health.aio.HealthServicer (absent from grpc-stubs)
    _tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)

    def start_background(self) -> None:
        self._tasks = [asyncio.create_task(w.run()) for w in self.background]

    async def close(self) -> None:
        """Stops the background workers, then the bank link, then the ledger (in that order)."""
        for w in self.background:
            w.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.butler is not None:
            await self.butler.close()
        if self.bank is not None:
            await self.bank.close()
        self.ledger.close()


def open_ledger(settings: Settings, data_dir: Path) -> LmdbLedger:
    return LmdbLedger(
        data_dir, durable=settings.durability == "strict",
        map_size_bytes=settings.map_size_mb << 20, max_readers=settings.max_readers,
        max_batch=settings.writer_max_batch, max_wait_s=settings.writer_max_wait_ms / 1000,
        queue_limit=settings.writer_queue_limit)


def build_app(settings: Settings, keyring: tickets.KeyRing, ledger: Ledger, *,
              bank_target: str | None = None, run_background: bool = True) -> App:
    """Wires one worker; ``run_background`` is true on worker 0 only."""
    pressure = Pressure(free_step=settings.unlock_free_step,
                        noncore_floor_share=settings.noncore_floor_share,
                        pushback_ms=settings.qos_retry_pushback_ms)
    bank = BankClient(bank_target, settings.bank_timeout_s) if bank_target else None
    butler = None
    if bank is not None:
        butler = PaymentButler(bank, settings.capacities(),
                               ButlerOptions(call_timeout_s=settings.bank_timeout_s),
                               enabled=settings.butler_enabled)
    credit = resolver = None
    background: list[BackgroundLoop] = []
    if run_background:
        credit = CreditConsumer(ledger, batch=settings.credit_batch,
                                rate_per_s=settings.credit_rate_per_s)
        background += [credit, ExpirySweeper(ledger, interval_s=settings.expiry_sweep_s)]
        if bank is not None:
            resolver = Resolver(ledger, bank, delay_s=settings.resolve_delay_s,
                                max_backoff_s=settings.resolver_max_backoff_s)
            background.append(resolver)
    cards = CardPayments(ledger, settings, butler if butler is not None else bank)
    gateway = Gateway(
        settings=settings,
        sending=Sending(ledger, settings, cards),
        grabbing=Grabbing(ledger, hotpath.GrabGate(settings.gate_max_envelopes)),
        cards=cards,
        wallet=WalletReads(ledger),
        operations=Operations(ledger, butler, bank,
                              {"credit": credit, "payment-unknown": resolver}))
    interceptors = [LoggingInterceptor(access_log=settings.access_log,
                                       echo_request_id=settings.echo_request_id),
                    AuthInterceptor(keyring)]
    return App(settings, keyring, ledger, gateway, bank, butler, credit, background,
               interceptors, pressure, health.aio.HealthServicer())  # type: ignore[attr-defined]
