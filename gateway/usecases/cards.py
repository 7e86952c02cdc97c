"""Card payments with a closed loop: intent saved, bank call, result saved (SPEC lesson 7).

A payment id is derived from (user, kind, request id), so a retry after a
crash reuses the bank order id and the bank deduplicates it. The intent is
saved before the bank is called; the bank call stands alone between two
durable steps and its outcome is saved at once; an unclear outcome is left
UNKNOWN for the resolver. A retry never calls the bank again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from gateway import errors
from gateway.config import Settings
from gateway.crashpoints import crash_point
from gateway.domain.keys import fingerprint, payment_id_for
from gateway.domain.model import CardEnvelope, Payment, PaymentKind, PaymentStatus
from gateway.ledger import Ledger
from gateway.payments.bank import DIRECT, BankAnswer, BankBusy, BankUnclear, ChannelDown
from gateway.payments.bank import bank_of_card as _bank_of_card
from gateway.usecases.bound import BoundCards
from gateway.usecases.checks import check_card, check_request_id

log = structlog.get_logger(__name__)

# Refusals that say "not now" rather than "no": nothing reached the bank.
_UNAVAILABLE_REASONS = frozenset({"BANK_BUSY", "BANK_CIRCUIT_OPEN", "BANK_CHANNEL_DOWN"})


class Payer(Protocol):
    """Who moves the money: the payment butler (``gateway.payments.butler``)."""

    async def debit(self, order_id: str, card_id: str, amount_fen: int, channel: str = DIRECT,
                    switch: Callable[[str], Awaitable[None]] | None = None) -> BankAnswer: ...

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT,
                     switch: Callable[[str], Awaitable[None]] | None = None) -> BankAnswer: ...

    def route(self, bank_id: str, preferred: str | None = None) -> str | None: ...

    def usable(self, bank_id: str) -> bool: ...


def raise_refusal(payment: Payment, **detail: str) -> None:
    """A definite refusal is an error with its reason, on the first call and on retries."""
    if payment.status != PaymentStatus.FAILED or payment.reason == "LOCKED":
        return
    if payment.reason in _UNAVAILABLE_REASONS:
        raise errors.Unavailable(payment.reason, "the bank cannot take this payment now", 0,
                                 payment_id=payment.payment_id, **detail)
    raise errors.FailedPrecondition(payment.reason, "the bank refused this payment",
                                    payment_id=payment.payment_id, **detail)


class _Claimed(Exception):
    """The resolver took the payment over while its handler was routing it."""

    def __init__(self, payment: Payment) -> None:
        super().__init__(payment.payment_id)
        self.payment = payment


class CardPayments:
    """Top-ups, withdrawals and card-paid envelopes through ``payer`` (the butler or the bank)."""

    def __init__(self, ledger: Ledger, settings: Settings, payer: Payer | None,
                 bound: BoundCards | None = None) -> None:
        self._ledger = ledger
        self._settings = settings
        self._payer = payer
        self._bound = bound

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
                  amount_fen: int, envelope: CardEnvelope | None = None, *,
                  replaces: str = "") -> Payment:
        """One card payment, its intent saved before the bank is called. ``replaces``: the
        payment of the same send this one takes over (AUTO's next card); its id is then
        derived from the request id and the card, so a retry finds it again."""
        bank_id = self.check(request_id, card_id, amount_fen)
        assert self._payer is not None
        fp = (envelope.send_fingerprint if envelope is not None
              else fingerprint(kind, card_id, amount_fen))
        pid = payment_id_for(user_id, kind, f"{request_id}\0{card_id}" if replaces
                             else request_id)
        channel = self._payer.route(bank_id)
        if channel is None:  # every channel of the bank is failing: refuse, saving nothing
            await self._refuse_open(user_id, pid, card_id, bank_id)
        intent = Payment(pid, user_id, kind, card_id, bank_id, amount_fen,
                         PaymentStatus.PENDING, envelope_id=envelope.envelope_id if envelope
                         else "", channel=channel or DIRECT)
        payment, created = await self._ledger.begin_payment(
            intent, fp, self._due_in_ms(), envelope, replaces)
        if created:
            crash_point("after_intent")
            payment = await self._call_bank(payment)
        # A retry never calls the bank again: it reports the state, and the
        # resolver settles whatever a crash left unclear.
        if payment.status == PaymentStatus.FAILED and payment.reason == "BANK_CIRCUIT_OPEN":
            others = await self.usable_cards(user_id, exclude=card_id)
            raise_refusal(payment, bank_id=bank_id, other_cards=",".join(others))
        raise_refusal(payment)
        return payment

    async def bound_cards(self, user_id: str) -> list[str]:
        """The user's bound cards, most preferred first."""
        return [] if self._bound is None else await self._bound.list(user_id)

    async def usable_cards(self, user_id: str, exclude: str = "") -> list[str]:
        """The user's bound cards, most preferred first, whose bank takes payments now."""
        if self._payer is None:
            return []
        return [c for c in await self.bound_cards(user_id) if c != exclude and self.usable(c)]

    def usable(self, card_id: str) -> bool:
        """Whether a payment with ``card_id`` could reach its bank now (a channel admits)."""
        bank_id = _bank_of_card(card_id)
        return (self._payer is not None and bank_id in self._settings.banks
                and self._payer.usable(bank_id))

    async def _refuse_open(self, user_id: str, payment_id: str, card_id: str,
                           bank_id: str) -> None:
        """UNAVAILABLE BANK_CIRCUIT_OPEN naming the user's other usable cards (ErrorInfo
        ``other_cards``, comma-separated, most preferred first), unless the payment was
        saved before (a retry then reports what it came to)."""
        if await self._ledger.get_payment(payment_id) is not None:
            return
        others = await self.usable_cards(user_id, exclude=card_id)
        raise errors.Unavailable(
            "BANK_CIRCUIT_OPEN", f"bank {bank_id} is failing on every channel; nothing was "
            "saved or sent", bank_id=bank_id, card_id=card_id, other_cards=",".join(others))

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
        """The bank call, alone between two durable steps; its outcome is saved at once.

        The butler may move the call to another channel of the bank; the payment names the
        new one durably before the call goes there (``switch``)."""
        assert self._payer is not None
        pid = payment.payment_id
        ledger = self._ledger

        async def switch(channel: str) -> None:
            moved = await ledger.switch_channel(pid, channel)
            if moved.channel != channel:
                raise _Claimed(moved)

        try:
            answer: BankAnswer
            move = (self._payer.credit if payment.kind == PaymentKind.WITHDRAW
                    else self._payer.debit)
            answer = await move(pid, payment.card_id, payment.amount_fen, payment.channel,
                                switch)
        except errors.Unavailable as err:  # the butler refused: nothing reached the bank
            return await ledger.finish_payment(pid, PaymentStatus.FAILED, err.reason)
        except ChannelDown:  # the channel refused before acting: nothing recorded
            return await ledger.finish_payment(pid, PaymentStatus.FAILED, "BANK_CHANNEL_DOWN")
        except BankBusy:  # the bank refused before acting
            return await ledger.finish_payment(pid, PaymentStatus.FAILED, "BANK_BUSY")
        except BankUnclear as err:
            log.warning("bank_result_unknown", payment_id=pid, detail=str(err))
            return await ledger.payment_unknown(
                pid, int(self._settings.resolve_delay_s * 1000), "BANK_RESULT_UNKNOWN")
        except _Claimed as claimed:
            return claimed.payment
        crash_point("after_bank")
        if answer.settled:
            return await ledger.finish_payment(pid, PaymentStatus.SUCCEEDED)
        return await ledger.finish_payment(pid, PaymentStatus.FAILED, answer.decline_reason)
