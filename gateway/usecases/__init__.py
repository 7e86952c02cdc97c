"""The domain layer: what the gateway does, with no gRPC in it.

Servicers translate protobuf into calls on :class:`Gateway` and its
:class:`~gateway.errors.GatewayError` exceptions into statuses. Input is
checked here, before anything is written, so a refused request changes
nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import structlog

import hotpath
from gateway import errors
from gateway.config import Settings
from gateway.ledger import (
    ENV_SOLD_OUT,
    KIND_LUCKY,
    KIND_NORMAL,
    CardEnvelope,
    EnvelopeView,
    GrabOutcome,
    GrabResult,
    Ledger,
    Payment,
    PaymentStatus,
    SendResult,
    WalletEntry,
    new_envelope_id,
    payment_id_for,
    request_digest,
)
from gateway.payments.bank import BankBusy, BankClient, BankUnclear
from gateway.payments.butler import PaymentButler

log = structlog.get_logger(__name__)

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ENVELOPE_ID = re.compile(r"env_[0-9a-f]{20}")
_CARD_ID = re.compile(r"([a-z]{2,16})-[0-9]{1,32}")
INT64_MAX = 2**63 - 1
PAY_AUTO, PAY_BALANCE, PAY_CARD = 1, 2, 3


def check_user_id(user_id: str, field: str = "user_id") -> str:
    if not _ID.fullmatch(user_id):
        raise errors.InvalidArgument("BAD_USER_ID", f"{field} must be 1..64 of [A-Za-z0-9._:-]")
    return user_id


def check_request_id(request_id: str) -> str:
    if not _ID.fullmatch(request_id):
        raise errors.InvalidArgument(
            "BAD_REQUEST_ID", "request_id must be 1..64 of [A-Za-z0-9._:-]")
    return request_id


def check_envelope_id(envelope_id: str) -> str:
    if not _ENVELOPE_ID.fullmatch(envelope_id):
        raise errors.InvalidArgument("BAD_ENVELOPE_ID", "envelope_id is malformed")
    return envelope_id


def fingerprint(*parts: object) -> bytes:
    """What a request asked for, so a reused request_id with another payload is caught."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class SendCommand:
    request_id: str
    total_fen: int
    count: int
    kind: int
    greeting: str = ""
    pay_method: int = PAY_AUTO
    card_id: str = ""
    expires_in_s: int = 0


class Gateway:
    """Envelopes and wallets over a :class:`Ledger`, a grab gate and a bank."""

    def __init__(self, ledger: Ledger, settings: Settings, bank: BankClient | None = None,
                 gate: hotpath.GrabGate | None = None,
                 butler: PaymentButler | None = None) -> None:
        self.ledger = ledger
        self.settings = settings
        self.bank = bank
        # Debits and credits go through the payment butler when there is one.
        self.butler = butler
        self.gate = gate if gate is not None else hotpath.GrabGate(settings.gate_max_envelopes)

    # -- envelopes -----------------------------------------------------------------

    def _check_send(self, cmd: SendCommand) -> int:
        s = self.settings
        check_request_id(cmd.request_id)
        if cmd.kind not in (KIND_LUCKY, KIND_NORMAL):
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
        if cmd.kind == KIND_NORMAL and cmd.total_fen % cmd.count:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", "a NORMAL envelope's total must divide evenly by count")
        if len(cmd.greeting) > s.max_greeting_chars:
            raise errors.InvalidArgument(
                "BAD_GREETING", f"greeting is longer than {s.max_greeting_chars} characters")
        expires_in_s = cmd.expires_in_s or s.default_expiry_s
        if not 0 < expires_in_s <= s.max_expiry_s:
            raise errors.InvalidArgument(
                "BAD_EXPIRY", f"expires_in_seconds must be in 1..{s.max_expiry_s}")
        if cmd.pay_method not in (0, PAY_AUTO, PAY_BALANCE, PAY_CARD):
            raise errors.InvalidArgument("BAD_PAY_METHOD", "unknown pay_method")
        if cmd.card_id:
            self._bank_of(cmd.card_id)
        return expires_in_s

    async def send_envelope(self, user_id: str, cmd: SendCommand) -> SendResult:
        """Pays for an envelope; balance first (SPEC lesson 5)."""
        expires_in_s = self._check_send(cmd)
        method = cmd.pay_method or PAY_AUTO
        if cmd.kind == KIND_LUCKY:
            shares = hotpath.split_lucky(cmd.total_fen, cmd.count, self.settings.max_share_fen,
                                         max_count=self.settings.max_count)
        else:
            shares = hotpath.split_normal(cmd.total_fen, cmd.count, self.settings.max_share_fen,
                                          max_count=self.settings.max_count)
        fp = fingerprint("send", cmd.total_fen, cmd.count, cmd.kind, cmd.greeting, method,
                         cmd.card_id, cmd.expires_in_s)
        existing = None
        if cmd.card_id:
            existing = self.ledger.send_result(user_id, cmd.request_id, fp)
        if method == PAY_AUTO and cmd.card_id:
            # Balance first: the wallet pays whenever it covers the amount, and
            # the bank is spared; a retry finds whichever way paid the first time.
            short = existing is None and self.ledger.balance(user_id)[0] < cmd.total_fen
            if short or (existing is not None and existing.paid_via == PAY_CARD):
                method = PAY_CARD
        if method == PAY_CARD:
            return await self._send_by_card(user_id, cmd, expires_in_s, shares, fp, existing)
        return await self.ledger.send_from_balance(
            user_id, cmd.request_id, fp, total_fen=cmd.total_fen, count=cmd.count,
            kind=cmd.kind, greeting=cmd.greeting, expires_in_s=expires_in_s, shares=shares)

    def _track(self, envelope_id: str, env_key: bytes) -> None:
        state = self.ledger.envelope_state(envelope_id)
        if state is None:
            raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
        count, claimed, status, _expires = state
        sold_out = status == ENV_SOLD_OUT or claimed >= count
        self.gate.track(env_key, count, claimed, sold_out, self.ledger.grabbers(envelope_id))

    def _replay(self, user_id: str, envelope_id: str, request_id: str) -> GrabResult | None:
        """The answer for a user who already holds a share, from LMDB; None if they hold none."""
        found = self.ledger.find_grab(user_id, envelope_id)
        if found is None:
            return None
        view, digest, remaining = found
        if digest != request_digest(request_id):
            return GrabResult(GrabOutcome.ALREADY_GRABBED, 0, remaining)
        return GrabResult(GrabOutcome.GRABBED, view.amount_fen, remaining, view.credited)

    def _admit(self, user_id: str, envelope_id: str, request_id: str
               ) -> tuple[int, GrabResult | None]:
        """The gate's verdict, and the answer when no write is needed.

        The gate only knows facts that never change back, so its SOLD_OUT and
        ALREADY answers are confirmed against LMDB for the one case they could
        hide: this user's own earlier grab, which a retry must get back.
        """
        check_envelope_id(envelope_id)
        check_request_id(request_id)
        env_key = envelope_id.encode()
        user_key = user_id.encode()
        verdict = self.gate.admit(env_key, user_key)
        if verdict == hotpath.GATE_UNTRACKED:
            self._track(envelope_id, env_key)
            verdict = self.gate.admit(env_key, user_key)
        if verdict < 0:
            replay = self._replay(user_id, envelope_id, request_id)
            if replay is not None:
                return verdict, replay
            if verdict == hotpath.GATE_SOLD_OUT:
                return verdict, GrabResult(GrabOutcome.SOLD_OUT, 0, 0)
            # ALREADY without a grab in LMDB: the user's other request is in
            # flight, or a hash collision; the writer knows which.
        return verdict, None

    def _settle(self, user_id: str, envelope_id: str, verdict: int,
                result: GrabResult | errors.GatewayError) -> None:
        """Teaches the gate what the writer decided."""
        env_key = envelope_id.encode()
        if isinstance(result, errors.GatewayError):
            if verdict >= 0:
                self.gate.release(env_key, user_id.encode())
            return
        outcome = result.outcome
        if outcome == GrabOutcome.GRABBED:
            if result.remaining_count == 0:
                self.gate.mark_sold_out(env_key)
        elif outcome == GrabOutcome.SOLD_OUT:
            if verdict >= 0:
                self.gate.release(env_key, user_id.encode())
            self.gate.mark_sold_out(env_key)
        elif outcome == GrabOutcome.EXPIRED and verdict >= 0:
            self.gate.release(env_key, user_id.encode())

    async def grab(self, user_id: str, envelope_id: str, request_id: str) -> GrabResult:
        """Claims one share. The gate answers the flood; the writer decides the rest."""
        verdict, answer = self._admit(user_id, envelope_id, request_id)
        if answer is not None:
            return answer
        try:
            result = await self.ledger.grab(user_id, envelope_id, request_id)
        except errors.GatewayError as err:
            self._settle(user_id, envelope_id, verdict, err)
            raise
        self._settle(user_id, envelope_id, verdict, result)
        return result

    async def grab_batch(self, items: list[tuple[str, str, str]]
                         ) -> list[GrabResult | errors.GatewayError]:
        """(user, envelope, request id) grabs; those that need a write share one writer request."""
        results: list = [None] * len(items)
        verdicts: list[int] = [0] * len(items)
        to_write: list[int] = []
        for i, (user_id, envelope_id, request_id) in enumerate(items):
            try:
                check_user_id(user_id)
                verdicts[i], results[i] = self._admit(user_id, envelope_id, request_id)
            except errors.GatewayError as err:
                results[i] = err
                verdicts[i] = -1
                continue
            if results[i] is None:
                to_write.append(i)
        if to_write:
            written = await self.ledger.grab_many([items[i] for i in to_write])
            for i, result in zip(to_write, written, strict=True):
                self._settle(items[i][0], items[i][1], verdicts[i], result)
                results[i] = result
        return results

    def get_envelope(self, envelope_id: str) -> EnvelopeView:
        check_envelope_id(envelope_id)
        return self.ledger.get_envelope(envelope_id)

    # -- wallet ----------------------------------------------------------------------

    def balance(self, user_id: str) -> tuple[int, int]:
        return self.ledger.balance(user_id)

    def list_transactions(self, user_id: str, page_size: int, page_token: str
                          ) -> tuple[list[WalletEntry], str]:
        if page_size == 0:
            page_size = 20
        if not 1 <= page_size <= 100:
            raise errors.InvalidArgument("BAD_PAGE_SIZE", "page_size must be in 0..100")
        before = None
        if page_token:
            if not page_token.isdigit() or len(page_token) > 20 or int(page_token) >= 2**64:
                raise errors.InvalidArgument("BAD_PAGE_TOKEN", "page_token is malformed")
            before = int(page_token)
        entries, cursor = self.ledger.list_transactions(user_id, page_size, before)
        return entries, "" if cursor is None else str(cursor)

    def _bank_of(self, card_id: str) -> str:
        m = _CARD_ID.fullmatch(card_id)
        if not m:
            raise errors.InvalidArgument("BAD_CARD_ID", "card_id must be <bank>-<digits>")
        if m.group(1) not in self.settings.banks:
            raise errors.InvalidArgument("UNKNOWN_BANK", f"no bank {m.group(1)!r}")
        return m.group(1)

    # -- card payments: intent saved, bank call, result saved ---------------------------

    def _check_card_amount(self, request_id: str, card_id: str, amount_fen: int) -> str:
        check_request_id(request_id)
        bank_id = self._bank_of(card_id)
        if not 0 < amount_fen <= self.settings.max_top_up_fen:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", f"amount_fen must be in 1..{self.settings.max_top_up_fen}")
        if self.bank is None:
            raise errors.Unavailable("BANK_NOT_CONFIGURED", "this gateway has no bank link")
        return bank_id

    def _due_in_ms(self) -> int:
        """When the resolver may take over a payment whose handler never finished it.

        After the bank call's own deadline, so a live handler always finishes
        first; the resolver only meets payments whose process died mid-call.
        """
        return int((self.settings.bank_timeout_s + self.settings.resolve_delay_s) * 1000)

    async def _call_bank(self, payment: Payment) -> Payment:
        """The bank call, alone between two durable steps; its outcome is saved at once."""
        pid = payment.payment_id
        payer = self.butler if self.butler is not None else self.bank
        try:
            if payment.kind == "withdraw":
                answer = await payer.credit(pid, payment.card_id, payment.amount_fen)
            else:
                answer = await payer.debit(pid, payment.card_id, payment.amount_fen)
        except errors.Unavailable as err:  # the butler refused: nothing reached the bank
            return await self.ledger.finish_payment(pid, PaymentStatus.FAILED, err.reason)
        except BankBusy:  # the bank refused before acting
            return await self.ledger.finish_payment(pid, PaymentStatus.FAILED, "BANK_BUSY")
        except BankUnclear as err:
            log.warning("bank_result_unknown", payment_id=pid, detail=str(err))
            return await self.ledger.payment_unknown(
                pid, int(self.settings.resolve_delay_s * 1000), "BANK_RESULT_UNKNOWN")
        if answer.settled:
            return await self.ledger.finish_payment(pid, PaymentStatus.SUCCEEDED)
        return await self.ledger.finish_payment(pid, PaymentStatus.FAILED, answer.decline_reason)

    @staticmethod
    def _refusal(payment: Payment) -> None:
        """A definite refusal is an error with its reason, on the first call and on retries."""
        if payment.status != PaymentStatus.FAILED or payment.reason == "LOCKED":
            return
        if payment.reason in _UNAVAILABLE_REASONS:
            raise errors.Unavailable(payment.reason, "the bank cannot take this payment now",
                                     payment_id=payment.payment_id)
        raise errors.FailedPrecondition(payment.reason, "the bank refused this payment",
                                        payment_id=payment.payment_id)

    async def _card_payment(self, user_id: str, kind: str, request_id: str, card_id: str,
                            amount_fen: int, envelope: CardEnvelope | None = None) -> Payment:
        bank_id = self._check_card_amount(request_id, card_id, amount_fen)
        fp = (envelope.send_fingerprint if envelope is not None
              else fingerprint(kind, card_id, amount_fen))
        intent = Payment(payment_id_for(user_id, kind, request_id), user_id, kind, card_id,
                         bank_id, amount_fen, PaymentStatus.PENDING,
                         envelope_id=envelope.envelope_id if envelope else "")
        payment, created = await self.ledger.begin_payment(
            intent, fp, self._due_in_ms(), envelope)
        if created:
            payment = await self._call_bank(payment)
        # A retry never calls the bank again: it reports the state, and the
        # resolver settles whatever a crash left unclear.
        self._refusal(payment)
        return payment

    async def top_up(self, user_id: str, request_id: str, card_id: str,
                     amount_fen: int) -> Payment:
        """Card -> wallet. The bank order id is the payment id, derived from (user, request_id)."""
        return await self._card_payment(user_id, "top_up", request_id, card_id, amount_fen)

    async def withdraw(self, user_id: str, request_id: str, card_id: str,
                       amount_fen: int) -> Payment:
        """Wallet -> card. The amount is held out of the wallet before the bank is asked."""
        return await self._card_payment(user_id, "withdraw", request_id, card_id, amount_fen)

    async def _send_by_card(self, user_id: str, cmd: SendCommand, expires_in_s: int,
                            shares: list[int], fp: bytes,
                            existing: SendResult | None) -> SendResult:
        if not cmd.card_id:
            raise errors.InvalidArgument("CARD_REQUIRED", "paying by card needs card_id")
        if existing is not None:
            payment = self.ledger.get_payment(existing.payment_id)
            if payment is not None:
                self._refusal(payment)
            return existing
        envelope = CardEnvelope(new_envelope_id(), cmd.count, cmd.kind, cmd.greeting,
                                expires_in_s, shares, cmd.request_id, fp)
        payment = await self._card_payment(user_id, "envelope", cmd.request_id, cmd.card_id,
                                           cmd.total_fen, envelope)
        state = self.ledger.envelope_state(payment.envelope_id)
        return SendResult(payment.envelope_id, state[2] if state else 0, PAY_CARD,
                          payment.payment_id)


# Refusals that say "not now" rather than "no": nothing reached the bank.
_UNAVAILABLE_REASONS = frozenset({"BANK_BUSY", "BANK_CIRCUIT_OPEN"})
