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
from gateway.bank import BankBusy, BankClient, BankUnclear
from gateway.config import Settings
from gateway.ledger import (
    ENV_SOLD_OUT,
    KIND_LUCKY,
    KIND_NORMAL,
    EnvelopeView,
    GrabOutcome,
    GrabResult,
    Ledger,
    Payment,
    PaymentStatus,
    SendResult,
    WalletEntry,
    request_digest,
)

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
                 gate: hotpath.GrabGate | None = None) -> None:
        self.ledger = ledger
        self.settings = settings
        self.bank = bank
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
        if method == PAY_CARD:
            raise errors.Unimplemented(
                "CARD_PAYMENT_UNAVAILABLE", "paying an envelope by card is not available yet")
        if cmd.kind == KIND_LUCKY:
            shares = hotpath.split_lucky(cmd.total_fen, cmd.count, self.settings.max_share_fen,
                                         max_count=self.settings.max_count)
        else:
            shares = hotpath.split_normal(cmd.total_fen, cmd.count, self.settings.max_share_fen,
                                          max_count=self.settings.max_count)
        fp = fingerprint("send", cmd.total_fen, cmd.count, cmd.kind, cmd.greeting, method,
                         cmd.card_id, cmd.expires_in_s)
        # AUTO whose balance falls short would pay by card; until card payments
        # exist it answers INSUFFICIENT_BALANCE, like BALANCE.
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
        view, digest = found
        state = self.ledger.envelope_state(envelope_id)
        remaining = state[0] - state[1] if state else 0
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

    async def top_up(self, user_id: str, request_id: str, card_id: str,
                     amount_fen: int) -> Payment:
        """Card -> wallet. The intent is saved before the bank is called.

        The bank order id is the payment id, derived from (user, request_id),
        so a retry after any failure repeats the same order and the bank's
        idempotency keeps the card from being debited twice.
        """
        check_request_id(request_id)
        bank_id = self._bank_of(card_id)
        if not 0 < amount_fen <= self.settings.max_top_up_fen:
            raise errors.InvalidArgument(
                "BAD_AMOUNT", f"amount_fen must be in 1..{self.settings.max_top_up_fen}")
        if self.bank is None:
            raise errors.Unavailable("BANK_NOT_CONFIGURED", "this gateway has no bank link")
        fp = fingerprint("top_up", card_id, amount_fen)
        payment = await self.ledger.begin_payment(
            user_id, "top_up", request_id, fp, card_id=card_id, bank_id=bank_id,
            amount_fen=amount_fen)
        if payment.status == PaymentStatus.SUCCEEDED:
            return payment
        if payment.status == PaymentStatus.FAILED:
            raise errors.FailedPrecondition(payment.reason, "the bank refused this payment",
                                            payment_id=payment.payment_id)
        try:
            answer = await self.bank.debit(payment.payment_id, card_id, amount_fen)
        except BankBusy as err:
            raise errors.Unavailable("BANK_BUSY", "the bank is over capacity; retry later",
                                     payment_id=payment.payment_id) from err
        except BankUnclear as err:
            log.warning("bank_result_unknown", payment_id=payment.payment_id, detail=str(err))
            raise errors.Unavailable(
                "BANK_RESULT_UNKNOWN",
                "the bank did not answer clearly; retry with the same request_id",
                payment_id=payment.payment_id) from err
        if answer.settled:
            return await self.ledger.settle_top_up(payment.payment_id)
        failed = await self.ledger.fail_payment(payment.payment_id, answer.decline_reason)
        raise errors.FailedPrecondition(failed.reason, "the bank refused this payment",
                                        payment_id=payment.payment_id)
