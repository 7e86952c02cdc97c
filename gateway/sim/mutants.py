"""Known defects the simulation must find: the proof that its checks bite.

A mutant builds the process's card payments and resolver. ``none`` builds the
product's own; each other one plants one classic payment bug:

- ``unclear-is-declined``: the bank link takes an unclear answer for a decline, so a
  payment the bank applied but whose answer was lost is booked as failed (Jepsen's
  "an unknown outcome is never a failure");
- ``resolver-skips-void``: the resolver fails a debit the bank has not seen without
  voiding its order id first, so a late debit lands after the gateway gave up on it.

``hongbao sim --mutant NAME`` runs one; tests/test_sim.py checks each is caught.
"""

from __future__ import annotations

from typing import Any

from gateway.config import Settings
from gateway.domain.model import PaymentKind, PaymentStatus
from gateway.ledger import Ledger
from gateway.payments.bank import BankAnswer, BankUnclear, OrderStatus
from gateway.payments.resolver import Resolver
from gateway.usecases import CardPayments


class Mutant:
    """The product as it is."""

    name = "none"

    def cards(self, ledger: Ledger, settings: Settings, bank: Any) -> CardPayments:
        return CardPayments(ledger, settings, bank)

    def resolver(self, ledger: Ledger, bank: Any, *, delay_s: float, max_backoff_s: float
                 ) -> Resolver:
        return Resolver(ledger, bank, delay_s=delay_s, max_backoff_s=max_backoff_s)


class _UnclearIsDeclined:
    def __init__(self, bank: Any) -> None:
        self._bank = bank

    async def debit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer:
        try:
            return await self._bank.debit(order_id, card_id, amount_fen)
        except BankUnclear:
            return BankAnswer(False, OrderStatus.DECLINED, "CARD_DECLINED")

    async def credit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer:
        try:
            return await self._bank.credit(order_id, card_id, amount_fen)
        except BankUnclear:
            return BankAnswer(False, OrderStatus.DECLINED, "CARD_DECLINED")


class UnclearIsDeclined(Mutant):
    name = "unclear-is-declined"

    def cards(self, ledger: Ledger, settings: Settings, bank: Any) -> CardPayments:
        return CardPayments(ledger, settings, _UnclearIsDeclined(bank))


class _VoidSkippingResolver(Resolver):
    async def resolve(self, payment_id: str) -> None:
        p = await self._ledger.get_payment(payment_id)
        if (p is not None and p.status == PaymentStatus.UNKNOWN
                and p.kind != PaymentKind.WITHDRAW
                and await self._bank.query(payment_id) == OrderStatus.NOT_FOUND):
            await self._finish(payment_id, PaymentStatus.FAILED, "LOCKED")  # never voided
            return
        await super().resolve(payment_id)


class ResolverSkipsVoid(Mutant):
    name = "resolver-skips-void"

    def resolver(self, ledger: Ledger, bank: Any, *, delay_s: float, max_backoff_s: float
                 ) -> Resolver:
        return _VoidSkippingResolver(ledger, bank, delay_s=delay_s, max_backoff_s=max_backoff_s)


MUTANTS: dict[str, type[Mutant]] = {m.name: m for m in (Mutant, UnclearIsDeclined,
                                                         ResolverSkipsVoid)}
