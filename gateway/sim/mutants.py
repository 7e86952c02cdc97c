"""Known defects the simulation must find: the proof that its checks bite.

A mutant builds the process's card payments and resolver. ``none`` builds the
product's own (its payer the butler's twin, :class:`gateway.sim.bank.SimPayer`); each
other one plants one classic payment bug:

- ``unclear-is-declined``: the bank link takes an unclear answer for a decline, so a
  payment the bank applied but whose answer was lost is booked as failed (Jepsen's
  "an unknown outcome is never a failure");
- ``resolver-skips-void``: the resolver fails a debit the bank has not seen without
  voiding its order id first, so a late debit lands after the gateway gave up on it;
- ``resolver-ignores-channel``: the resolver asks the bank about every order through
  the direct channel, whichever channel the payment went through, so the bank refuses
  an order that went through clearing (WRONG_CHANNEL).

``caught_by`` is the check that must catch it. ``hongbao sim --mutant NAME`` runs one;
tests/test_sim.py checks each is caught.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import Settings
from gateway.domain.model import PaymentKind, PaymentStatus
from gateway.ledger import Ledger
from gateway.payments.bank import DIRECT, BankAnswer, BankUnclear, OrderStatus
from gateway.payments.resolver import Resolver
from gateway.sim.bank import SimPayer
from gateway.usecases import CardPayments

Switch = Callable[[str], Awaitable[None]]


class Mutant:
    """The product as it is."""

    name = "none"
    caught_by = ""

    def cards(self, ledger: Ledger, settings: Settings, bank: Any) -> CardPayments:
        return CardPayments(ledger, settings, SimPayer(bank))

    def resolver(self, ledger: Ledger, bank: Any, *, delay_s: float, max_backoff_s: float
                 ) -> Resolver:
        return Resolver(ledger, bank, delay_s=delay_s, max_backoff_s=max_backoff_s)


class _UnclearIsDeclined:
    def __init__(self, payer: SimPayer) -> None:
        self._payer = payer

    def route(self, bank_id: str, preferred: str | None = None) -> str | None:
        return self._payer.route(bank_id, preferred)

    def usable(self, bank_id: str) -> bool:
        return self._payer.usable(bank_id)

    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        try:
            return await self._payer.debit(order_id, card_id, amount_fen, channel, switch)
        except BankUnclear:
            return BankAnswer(False, OrderStatus.DECLINED, "CARD_DECLINED")

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        try:
            return await self._payer.credit(order_id, card_id, amount_fen, channel, switch)
        except BankUnclear:
            return BankAnswer(False, OrderStatus.DECLINED, "CARD_DECLINED")


class UnclearIsDeclined(Mutant):
    name = "unclear-is-declined"
    caught_by = "bank-agrees"

    def cards(self, ledger: Ledger, settings: Settings, bank: Any) -> CardPayments:
        return CardPayments(ledger, settings, _UnclearIsDeclined(SimPayer(bank)))


class _VoidSkippingResolver(Resolver):
    async def resolve(self, payment_id: str) -> None:
        p = await self._ledger.get_payment(payment_id)
        if (p is not None and p.status == PaymentStatus.UNKNOWN
                and p.kind != PaymentKind.WITHDRAW
                and await self._bank.query(payment_id, p.channel) == OrderStatus.NOT_FOUND):
            await self._finish(payment_id, PaymentStatus.FAILED, "LOCKED")  # never voided
            return
        await super().resolve(payment_id)


class ResolverSkipsVoid(Mutant):
    name = "resolver-skips-void"
    caught_by = "bank-agrees"

    def resolver(self, ledger: Ledger, bank: Any, *, delay_s: float, max_backoff_s: float
                 ) -> Resolver:
        return _VoidSkippingResolver(ledger, bank, delay_s=delay_s, max_backoff_s=max_backoff_s)


class _DirectOnly:
    """The bank as a resolver that ignores channels sees it: every call through direct."""

    def __init__(self, bank: Any) -> None:
        self._bank = bank

    async def query(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._bank.query(order_id, DIRECT)

    async def void(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._bank.void(order_id, DIRECT)

    async def refund(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._bank.refund(order_id, DIRECT)


class ResolverIgnoresChannel(Mutant):
    name = "resolver-ignores-channel"
    caught_by = "channel"

    def resolver(self, ledger: Ledger, bank: Any, *, delay_s: float, max_backoff_s: float
                 ) -> Resolver:
        direct_only: Any = _DirectOnly(bank)
        return Resolver(ledger, direct_only, delay_s=delay_s, max_backoff_s=max_backoff_s)


MUTANTS: dict[str, type[Mutant]] = {m.name: m for m in (Mutant, UnclearIsDeclined,
                                                         ResolverSkipsVoid,
                                                         ResolverIgnoresChannel)}
