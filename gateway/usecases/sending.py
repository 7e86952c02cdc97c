"""Sending an envelope: checks, the pre-split, and balance first (SPEC lesson 5)."""

from __future__ import annotations

import dataclasses
import re

import hotpath
from gateway import errors
from gateway.config import Settings
from gateway.domain.keys import fingerprint, new_envelope_id, split_seed
from gateway.domain.model import (
    SWITCHABLE_REASONS,
    CardEnvelope,
    EnvelopeKind,
    PaymentKind,
    PayMethod,
    SendResult,
)
from gateway.ledger import Ledger
from gateway.usecases.cards import CardPayments
from gateway.usecases.checks import INT64_MAX, check_card, check_request_id

# Refused in greetings: C0 and C1 controls (NUL, ESC, newline, tab, ...) and the
# bidirectional formatting characters (U+202E RIGHT-TO-LEFT OVERRIDE and kin), with which
# one user's greeting could rewrite what another sees around it. Joiners and variation
# selectors stay allowed: emoji sequences need them.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclasses.dataclass(frozen=True, slots=True)
class SendCommand:
    request_id: str
    total_fen: int
    count: int
    kind: int
    greeting: str = ""
    pay_method: int = PayMethod.AUTO
    card_id: str = ""
    expires_in_s: int = 0


class Sending:
    def __init__(self, ledger: Ledger, settings: Settings, cards: CardPayments) -> None:
        self._ledger = ledger
        self._settings = settings
        self._cards = cards

    def _check(self, cmd: SendCommand) -> int:
        """The envelope rules; returns the expiry in seconds."""
        s = self._settings
        check_request_id(cmd.request_id)
        if cmd.kind not in (EnvelopeKind.LUCKY, EnvelopeKind.NORMAL):
            raise errors.InvalidArgument("BAD_KIND", "kind must be LUCKY or NORMAL")
        if not 1 <= cmd.count <= s.max_count:
            raise errors.InvalidArgument("BAD_COUNT", f"count must be in 1..{s.max_count}")
        if not 0 < cmd.total_fen <= INT64_MAX:
            raise errors.InvalidArgument("BAD_AMOUNT", "total_fen must be positive")
        if cmd.total_fen < cmd.count:
            raise errors.InvalidArgument("BAD_AMOUNT", "total_fen must be at least 1 fen a share")
        if cmd.total_fen > s.max_share_fen * cmd.count:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", f"a share may not exceed {s.max_share_fen} fen")
        if cmd.kind == EnvelopeKind.NORMAL and cmd.total_fen % cmd.count:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", "a NORMAL envelope's total must divide evenly by count")
        if len(cmd.greeting) > s.max_greeting_chars:
            raise errors.InvalidArgument(
                "BAD_GREETING", f"greeting is longer than {s.max_greeting_chars} characters")
        spoof = _UNSHOWABLE.search(cmd.greeting)
        if spoof is not None:
            raise errors.InvalidArgument(
                "BAD_GREETING", f"greeting holds U+{ord(spoof.group()):04X} at {spoof.start()}: "
                "control and text-direction characters are not allowed")
        expires_in_s = cmd.expires_in_s or s.default_expiry_s
        if not 0 < expires_in_s <= s.max_expiry_s:
            raise errors.InvalidArgument(
                "BAD_EXPIRY", f"expires_in_seconds must be in 1..{s.max_expiry_s}")
        if cmd.pay_method not in (0, *PayMethod):
            raise errors.InvalidArgument("BAD_PAY_METHOD", "unknown pay_method")
        if cmd.card_id:
            check_card(cmd.card_id, s.banks)
        return expires_in_s

    def _split(self, cmd: SendCommand) -> list[int]:
        s = self._settings
        if cmd.kind == EnvelopeKind.LUCKY:
            return hotpath.split_lucky(cmd.total_fen, cmd.count, s.max_share_fen, split_seed(),
                                       max_count=s.max_count)
        return hotpath.split_normal(cmd.total_fen, cmd.count, s.max_share_fen,
                                    max_count=s.max_count)

    async def send(self, user_id: str, cmd: SendCommand) -> SendResult:
        """Pays for an envelope: from the wallet whenever it covers the amount.

        PAY_METHOD_AUTO short of balance pays by card: ``card_id`` if named, then the
        user's bound cards in order of preference, each only while its bank has a channel
        that takes payments, the next one only when the earlier one is known not to have
        moved money (see :meth:`_auto_by_card`).
        """
        expires_in_s = self._check(cmd)
        method = cmd.pay_method or PayMethod.AUTO
        shares = self._split(cmd)
        fp = fp_of(cmd)
        existing = None
        if cmd.card_id:
            existing = await self._ledger.send_result(user_id, cmd.request_id, fp)
        if method == PayMethod.AUTO and cmd.card_id:
            # Balance first: the wallet pays whenever it covers the amount, and
            # the bank is spared; a retry finds whichever way paid the first time.
            short = (existing is None
                     and (await self._ledger.balance(user_id)).balance_fen < cmd.total_fen)
            if short or (existing is not None and existing.paid_via == PayMethod.CARD):
                return await self._auto_by_card(user_id, cmd, expires_in_s, shares, fp,
                                                existing)
        if method == PayMethod.CARD:
            return await self._send_by_card(user_id, cmd, expires_in_s, shares, fp, existing)
        try:
            result = await self._ledger.send_from_balance(
                user_id, cmd.request_id, fp, total_fen=cmd.total_fen, count=cmd.count,
                kind=cmd.kind, greeting=cmd.greeting, expires_in_s=expires_in_s,
                shares=shares)
        except errors.FailedPrecondition as short_of:
            # AUTO without a card named: the bound cards take over, if there are any (with
            # every one's bank failing, the answer is BANK_CIRCUIT_OPEN, not the balance).
            if (method != PayMethod.AUTO or short_of.reason != "INSUFFICIENT_BALANCE"
                    or not await self._cards.bound_cards(user_id)):
                raise
            return await self._auto_by_card(user_id, cmd, expires_in_s, shares, fp, None)
        if method == PayMethod.AUTO and result.paid_via == PayMethod.CARD:
            # A retry of an AUTO send that a bound card paid (or tried to).
            return await self._auto_by_card(user_id, cmd, expires_in_s, shares, fp, result)
        return result

    async def _send_by_card(self, user_id: str, cmd: SendCommand, expires_in_s: int,
                            shares: list[int], fp: bytes,
                            existing: SendResult | None) -> SendResult:
        if not cmd.card_id:
            raise errors.InvalidArgument("CARD_REQUIRED", "paying by card needs card_id")
        if existing is not None:
            await self._cards.refuse_if_refused(existing.payment_id)
            return existing
        return await self._pay_with(user_id, cmd, expires_in_s, shares, fp, cmd.card_id, "")

    async def _pay_with(self, user_id: str, cmd: SendCommand, expires_in_s: int,
                        shares: list[int], fp: bytes, card_id: str,
                        replaces: str) -> SendResult:
        envelope = CardEnvelope(new_envelope_id(user_id), cmd.count, cmd.kind, cmd.greeting,
                                expires_in_s, shares, cmd.request_id, fp)
        payment = await self._cards.pay(user_id, PaymentKind.ENVELOPE, cmd.request_id,
                                        card_id, cmd.total_fen, envelope, replaces=replaces)
        state = await self._ledger.envelope_state(payment.envelope_id)
        return SendResult(payment.envelope_id, state.status if state else 0, PayMethod.CARD,
                          payment.payment_id)

    async def _auto_by_card(self, user_id: str, cmd: SendCommand, expires_in_s: int,
                            shares: list[int], fp: bytes,
                            existing: SendResult | None) -> SendResult:
        """AUTO's card chain: ``card_id``, then the bound cards, most preferred first.

        A card whose bank has no channel taking payments is passed over without a payment.
        A card's payment that FAILED before any money moved (the butler or the bank refused
        it at once, or the bank declined it) hands over to the next card: a new payment
        (its own order id) replaces it as the send's, in one ledger write that also tells
        the user (CARD_SWITCHED). An unclear result stops the chain: the money may have
        moved, and the resolver will say. A retry goes on from the send's latest payment.
        """
        chain = list(dict.fromkeys(
            [c for c in (cmd.card_id,) if c] + await self._cards.usable_cards(user_id)))
        replaces = ""
        if existing is not None:
            latest = await self._ledger.get_payment(existing.payment_id)
            if latest is None or not latest.replaceable:
                await self._cards.refuse_if_refused(existing.payment_id)
                return existing
            replaces = latest.payment_id
            chain = chain[chain.index(latest.card_id) + 1:] if latest.card_id in chain else chain
        refusal: errors.GatewayError | None = None
        for card_id in chain:
            if not self._cards.usable(card_id):
                continue
            try:
                return await self._pay_with(user_id, cmd, expires_in_s, shares, fp, card_id,
                                            replaces)
            except (errors.Unavailable, errors.FailedPrecondition) as err:
                if err.reason not in SWITCHABLE_REASONS or "payment_id" not in err.metadata:
                    raise
                refusal, replaces = err, err.metadata["payment_id"]
        if refusal is not None:
            raise refusal
        if existing is not None:
            await self._cards.refuse_if_refused(existing.payment_id)
        raise errors.Unavailable(
            "BANK_CIRCUIT_OPEN", "no card of yours has a bank that takes payments now; "
            "nothing was saved or sent", 0, other_cards="")


def fp_of(cmd: SendCommand) -> bytes:
    """The send's request fingerprint (its idempotency record's), for any pay method."""
    return fingerprint("send", cmd.total_fen, cmd.count, cmd.kind, cmd.greeting,
                       cmd.pay_method or PayMethod.AUTO, cmd.card_id, cmd.expires_in_s)

