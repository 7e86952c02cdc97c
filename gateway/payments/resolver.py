"""Closes the loop on card payments whose outcome is unclear (SPEC lesson 7).

A payment is due here when the bank's answer was ambiguous (UNKNOWN), or when
its handler never finished it (PENDING past its due time: the process died
during the bank call). After the configured delay the resolver asks the bank:

- a debit (top-up, card-paid envelope) that did not happen is voided, so the
  bank order is locked and can never succeed later -> FAILED ("LOCKED");
- a debit that did happen is refunded -> REFUNDED (the envelope is cancelled);
- a withdrawal the bank credited is done -> SUCCEEDED; one it did not credit is
  voided and the held money goes back to the wallet -> FAILED ("LOCKED").

Every step is saved before the next is taken, and every bank call here is
idempotent by order id, so a crash anywhere just means the next pass repeats
the step. A bank that stays unclear is asked again with a growing, bounded
backoff. The user is notified at each step (unknown, locked, refunded,
succeeded).
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from gateway import errors
from gateway.crashpoints import crash_point
from gateway.domain.model import PaymentKind, PaymentStatus
from gateway.ledger import Ledger
from gateway.loops import BackgroundLoop
from gateway.payments.bank import BankBusy, BankClient, BankUnclear, OrderStatus

log = structlog.get_logger(__name__)

SETTLED, REFUNDED, VOIDED = OrderStatus.SETTLED, OrderStatus.REFUNDED, OrderStatus.VOIDED


class Resolver(BackgroundLoop):
    def __init__(self, ledger: Ledger, bank: BankClient, *, delay_s: float,
                 max_backoff_s: float = 60.0, interval_s: float = 0.2, batch: int = 64,
                 concurrency: int = 16) -> None:
        super().__init__()
        self._ledger = ledger
        self._bank = bank
        self._delay_ms = int(delay_s * 1000)
        self._max_backoff_ms = int(max_backoff_s * 1000)
        self._interval_s = interval_s
        self._batch = batch
        self._sem = asyncio.Semaphore(concurrency)
        self.resolved: dict[str, int] = {}
        # Payments taken up per second (SetConsumerRate "payment-unknown"); 0 pauses.
        self.rate_per_s = 1000.0

    async def run(self) -> None:
        while not self.stopping:
            take = min(self._batch, int(self.rate_per_s * self._interval_s))
            due = await self._ledger.due_payments(take) if take > 0 else []
            if due:
                await asyncio.gather(*(self._guarded(pid) for pid in due))
            if len(due) < self._batch or take < self._batch:
                await self.pause(self._interval_s)

    async def _guarded(self, payment_id: str) -> None:
        async with self._sem:
            try:
                await self.resolve(payment_id)
            except (BankUnclear, BankBusy, grpc.aio.AioRpcError) as err:
                await self._later(payment_id, f"bank still unclear: {err}")
            except errors.GatewayError as err:
                log.warning("resolver_backoff", payment_id=payment_id, reason=err.reason)

    async def _later(self, payment_id: str, why: str) -> None:
        p = await self._ledger.get_payment(payment_id)
        if p is None or not p.open:
            return
        backoff_ms = min(self._max_backoff_ms, self._delay_ms * 2 ** min(p.attempts, 10))
        log.info("resolve_later", payment_id=payment_id, backoff_ms=backoff_ms, why=why)
        await self._ledger.payment_unknown(payment_id, backoff_ms, p.reason or "BANK_UNCLEAR")

    async def _finish(self, payment_id: str, outcome: PaymentStatus, reason: str = "") -> None:
        done = await self._ledger.finish_payment(payment_id, outcome, reason,
                                                 from_states=(PaymentStatus.UNKNOWN,))
        key = f"{done.status.name}{'/' + reason if reason else ''}"
        self.resolved[key] = self.resolved.get(key, 0) + 1
        log.info("payment_resolved", payment_id=payment_id, status=done.status.name,
                 reason=reason)

    async def resolve(self, payment_id: str) -> None:
        p = await self._ledger.get_payment(payment_id)
        if p is None or not p.open:
            return
        if p.status == PaymentStatus.PENDING:
            # Claim it first: from now on a late handler cannot finish it.
            p = await self._ledger.payment_unknown(payment_id, self._delay_ms,
                                                   "HANDLER_DID_NOT_FINISH")
            if p.status != PaymentStatus.UNKNOWN:
                return
        # Every call through the channel the order was sent through: the bank knows it there
        # only (a payment saved before channels existed went direct).
        channel = p.channel
        status = await self._bank.query(payment_id, channel)
        if p.kind == PaymentKind.WITHDRAW:
            if status != SETTLED:
                status = await self._bank.void(payment_id, channel)
                crash_point("resolver_void")
            if status == SETTLED:
                await self._finish(payment_id, PaymentStatus.SUCCEEDED)
            elif status == VOIDED:
                await self._finish(payment_id, PaymentStatus.FAILED, "LOCKED")
            else:
                raise BankUnclear(f"withdrawal order is {status.name}")
            return
        if status not in (SETTLED, REFUNDED):
            status = await self._bank.void(payment_id, channel)
            crash_point("resolver_void")
        if status == VOIDED:
            await self._finish(payment_id, PaymentStatus.FAILED, "LOCKED")
            return
        if status == SETTLED:
            status = await self._bank.refund(payment_id, channel)
            crash_point("resolver_refund")
        if status == REFUNDED:
            await self._finish(payment_id, PaymentStatus.REFUNDED)
            return
        raise BankUnclear(f"debit order is {status.name}")
