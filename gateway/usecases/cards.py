"""Card payments with a closed loop: intent saved, bank call, result saved (SPEC lesson 7).

A payment id is derived from (user, kind, request id), so a retry after a
crash reuses the bank order id and the bank deduplicates it. The intent is
saved before the bank is called; the bank call stands alone between two
durable steps and its outcome is saved at once; an unclear outcome is left
UNKNOWN for the resolver. A retry never calls the bank again.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from gateway import errors
from gateway.config import Settings
from gateway.crashpoints import crash_point
from gateway.domain.keys import fingerprint, payment_id_for
from gateway.domain.model import CardEnvelope, Payment, PaymentKind, PaymentStatus
from gateway.ledger import Ledger
from gateway.payments.bank import BankAnswer, BankBusy, BankUnclear
from gateway.usecases.checks import check_card, check_request_id

log = structlog.get_logger(__name__)

# Refusals that say "not now" rather than "no": nothing reached the bank.
_UNAVAILABLE_REASONS = frozenset({"BANK_BUSY", "BANK_CIRCUIT_OPEN"})


class Payer(Protocol):
    """Who moves the money: the payment butler, or the bank link itself when it is off."""

    async def debit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer: ...

    async def credit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer: ...


def raise_refusal(payment: Payment) -> None:
    """A definite refusal is an error with its reason, on the first call and on retries."""
    if payment.status != PaymentStatus.FAILED or payment.reason == "LOCKED":
        return
    if payment.reason in _UNAVAILABLE_REASONS:
        raise errors.Unavailable(payment.reason, "the bank cannot take this payment now",
                                 payment_id=payment.payment_id)
    raise errors.FailedPrecondition(payment.reason, "the bank refused this payment",
                                    payment_id=payment.payment_id)


class CardPayments:
    """Top-ups, withdrawals and card-paid envelopes through ``payer`` (the butler or the bank)."""

    def __init__(self, ledger: Ledger, settings: Settings, payer: Payer | None) -> None:
        self._ledger = ledger
        self._settings = settings
        self._payer = payer

    async def top_up(self, user_id: str, request_id: str, card_id: str,
                     amount_fen: int) -> Payment:
        """Card -> wallet."""
        return await self.pay(user_id, PaymentKind.TOP_UP, request_id, card_id, amount_fen)

    async def withdraw(self, user_id: str, request_id: str, card_id: str,
                       amount_fen: int) -> Payment:
        """Wallet -> card. The amount is held out of the wallet before the bank is asked."""
        return await self.pay(user_id, PaymentKind.WITHDRAW, request_id, card_id, amount_fen)

    def check(self, request_id: str, card_id: str, amount_fen: int) -> str:
        """The bank of a payment that may be attempted; INVALID_ARGUMENT or UNAVAILABLE."""
        check_request_id(request_id)
        bank_id = check_card(card_id, self._settings.banks)
        if not 0 < amount_fen <= self._settings.max_top_up_fen:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", f"amount_fen must be in 1..{self._settings.max_top_up_fen}")
        if self._payer is None:
            raise errors.Unavailable("BANK_NOT_CONFIGURED", "this gateway has no bank link")
        return bank_id

    async def pay(self, user_id: str, kind: PaymentKind, request_id: str, card_id: str,
                  amount_fen: int, envelope: CardEnvelope | None = None) -> Payment:
        bank_id = self.check(request_id, card_id, amount_fen)
        fp = (envelope.send_fingerprint if envelope is not None
              else fingerprint(kind, card_id, amount_fen))
        intent = Payment(payment_id_for(user_id, kind, request_id), user_id, kind, card_id,
                         bank_id, amount_fen, PaymentStatus.PENDING,
                         envelope_id=envelope.envelope_id if envelope else "")
        payment, created = await self._ledger.begin_payment(
            intent, fp, self._due_in_ms(), envelope)
        if created:
            crash_point("after_intent")
            payment = await self._call_bank(payment)
        # A retry never calls the bank again: it reports the state, and the
        # resolver settles whatever a crash left unclear.
        raise_refusal(payment)
        return payment

    async def refuse_if_refused(self, payment_id: str) -> None:
        """For a retried card-paid send: the first call's refusal, again."""
        payment = await self._ledger.get_payment(payment_id)
        if payment is not None:
            raise_refusal(payment)

    def _due_in_ms(self) -> int:
        """When the resolver may take over a payment whose handler never finished it.

        After the bank call's own deadline, so a live handler always finishes
        first; the resolver only meets payments whose process died mid-call.
        """
        return int((self._settings.bank_timeout_s + self._settings.resolve_delay_s) * 1000)

    async def _call_bank(self, payment: Payment) -> Payment:
        """The bank call, alone between two durable steps; its outcome is saved at once."""
        assert self._payer is not None
        pid = payment.payment_id
        ledger = self._ledger
        try:
            answer: BankAnswer
            if payment.kind == PaymentKind.WITHDRAW:
                answer = await self._payer.credit(pid, payment.card_id, payment.amount_fen)
            else:
                answer = await self._payer.debit(pid, payment.card_id, payment.amount_fen)
        except errors.Unavailable as err:  # the butler refused: nothing reached the bank
            return await ledger.finish_payment(pid, PaymentStatus.FAILED, err.reason)
        except BankBusy:  # the bank refused before acting
            return await ledger.finish_payment(pid, PaymentStatus.FAILED, "BANK_BUSY")
        except BankUnclear as err:
            log.warning("bank_result_unknown", payment_id=pid, detail=str(err))
            return await ledger.payment_unknown(
                pid, int(self._settings.resolve_delay_s * 1000), "BANK_RESULT_UNKNOWN")
        crash_point("after_bank")
        if answer.settled:
            return await ledger.finish_payment(pid, PaymentStatus.SUCCEEDED)
        return await ledger.finish_payment(pid, PaymentStatus.FAILED, answer.decline_reason)
