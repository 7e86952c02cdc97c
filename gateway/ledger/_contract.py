"""The ledger interface the services use, and the values it returns.

Services talk only to :class:`Ledger`; the LMDB implementation is the first
one, and a distributed backend can be added beside it without touching them.
Amounts are int64 fen; every money movement is a double-entry transfer with a
unique id; the sum over all accounts is always zero.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import secrets
from typing import NamedTuple

# Envelope kinds and statuses share their numbers with hongbao.v1.
KIND_LUCKY = 1
KIND_NORMAL = 2
ENV_ACTIVE = 1
ENV_SOLD_OUT = 2
ENV_EXPIRED = 3
ENV_PAYING = 4
ENV_PAY_UNKNOWN = 5
ENV_FAILED = 6
ENV_REFUNDED = 7


class GrabOutcome(enum.IntEnum):
    GRABBED = 1
    ALREADY_GRABBED = 2
    SOLD_OUT = 3
    EXPIRED = 4


class PaymentStatus(enum.IntEnum):
    PENDING = 1
    SUCCEEDED = 2
    FAILED = 3
    UNKNOWN = 4
    REFUNDED = 5


class TxKind(enum.IntEnum):
    """Transfer kinds; also the wallet transaction kinds of hongbao.v1."""

    TOP_UP = 1
    WITHDRAW = 2
    ENVELOPE_SENT = 3
    ENVELOPE_CREDIT = 4
    EXPIRY_REFUND = 5
    WITHDRAW_REVERSAL = 6
    GRAB = 20  # escrow -> pending credit; not a wallet movement


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    envelope_id: str
    status: int
    paid_via: int
    payment_id: str


class GrabResult(NamedTuple):
    """A tuple, not a dataclass: one is built per grab on the writer thread."""

    outcome: GrabOutcome
    amount_fen: int = 0
    remaining_count: int = 0
    credited: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class GrabView:
    user_id: str
    amount_fen: int
    grabbed_at_ms: int
    share_index: int
    credited: bool


@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeView:
    envelope_id: str
    sender_id: str
    total_fen: int
    count: int
    kind: int
    status: int
    remaining_fen: int
    remaining_count: int
    greeting: str
    created_at_ms: int
    expires_at_ms: int
    grabs: tuple[GrabView, ...]
    best_luck_user_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class WalletEntry:
    transaction_id: str
    kind: TxKind
    amount_fen: int  # signed: + into the wallet, - out of it
    reference_id: str
    created_at_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    """One event of a user's notification feed; ``event_id`` only grows."""

    event_id: int
    kind: int  # hongbao.v1.NotificationKind
    payment_id: str
    envelope_id: str
    amount_fen: int
    message: str
    created_at_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    user_id: str
    kind: str  # "top_up", "withdraw" or "envelope"
    card_id: str
    bank_id: str
    amount_fen: int
    status: PaymentStatus
    reason: str = ""
    created_at_ms: int = 0
    updated_at_ms: int = 0
    envelope_id: str = ""  # the envelope a card payment funds
    attempts: int = 0  # resolver attempts that found the bank unclear


class CardEnvelope(NamedTuple):
    """An envelope to create with its card payment (see Ledger.begin_payment)."""

    envelope_id: str
    count: int
    kind: int
    greeting: str
    expires_in_s: int
    shares: list[int]
    request_id: str  # of the SendEnvelope call: its idempotency record is written too
    send_fingerprint: bytes


def new_envelope_id() -> str:
    """80 random bits: unguessable, so nobody can grab an envelope not shared with them."""
    return "env_" + secrets.token_hex(10)


class Ledger(abc.ABC):
    """The gateway's books. Implementations MUST:

    - make every method that moves money atomic and durable before it returns
      (unless configured as relaxed, which they must log);
    - refuse a request they cannot honour with a ``GatewayError`` and change
      nothing;
    - keep the sum over all accounts at zero and every transfer id unique.
    """

    @abc.abstractmethod
    async def send_from_balance(
        self, user_id: str, request_id: str, fingerprint: bytes, *, total_fen: int,
        count: int, kind: int, greeting: str, expires_in_s: int, shares: list[int],
    ) -> SendResult:
        """Moves ``total_fen`` from the wallet into a new envelope's escrow.

        Idempotent by (user, request_id): a retry returns the first result;
        another payload under the same id raises InvalidArgument.
        """

    @abc.abstractmethod
    async def grab(self, user_id: str, envelope_id: str, request_id: str) -> GrabResult:
        """Claims the next share for ``user_id``: escrow -> the user's pending credit.

        One share per user per envelope; a retry with the same request_id
        returns the first result.
        """

    @abc.abstractmethod
    async def grab_many(self, items: list[tuple[str, str, str]]) -> list:
        """(user, envelope, request id) grabs in one request; a GrabResult or GatewayError each."""

    @abc.abstractmethod
    def find_grab(self, user_id: str, envelope_id: str
                  ) -> tuple[GrabView, bytes, int] | None:
        """The user's grab of an envelope, its request digest and the shares left (one read)."""

    @abc.abstractmethod
    def envelope_state(self, envelope_id: str) -> tuple[int, int, int, int] | None:
        """(count, claimed, status, expires_at_ms) of an envelope, or None."""

    @abc.abstractmethod
    def grabbers(self, envelope_id: str) -> list[bytes]:
        """The user ids (bytes) that hold a share of the envelope."""

    @abc.abstractmethod
    def send_result(self, user_id: str, request_id: str, fingerprint: bytes
                    ) -> SendResult | None:
        """The first result of a SendEnvelope request id, with the envelope's live status;
        InvalidArgument if the id was used with another payload."""

    @abc.abstractmethod
    def get_envelope(self, envelope_id: str) -> EnvelopeView:
        """The envelope with its grabs in grab order; NotFound if unknown."""

    @abc.abstractmethod
    def balance(self, user_id: str) -> tuple[int, int]:
        """(wallet balance, pending credit) in fen."""

    @abc.abstractmethod
    def list_transactions(
        self, user_id: str, page_size: int, before_seq: int | None
    ) -> tuple[list[WalletEntry], int | None]:
        """Wallet entries newest first, and the cursor of the next page (None at the end)."""

    @abc.abstractmethod
    async def begin_payment(self, payment: Payment, fingerprint: bytes, due_in_ms: int,
                            envelope: CardEnvelope | None = None) -> tuple[Payment, bool]:
        """Saves a payment intent (PENDING) before the bank is called.

        Returns it and whether this call created it; a retry gets the saved
        one (another payload under the same id raises InvalidArgument). A
        withdrawal holds its amount out of the wallet at once; a card-paid
        envelope is created PAYING, not grabbable. The intent is due for the
        resolver after ``due_in_ms`` unless it is finished first.
        """

    @abc.abstractmethod
    async def finish_payment(self, payment_id: str, outcome: PaymentStatus, reason: str = "",
                             from_states: tuple[PaymentStatus, ...] = (PaymentStatus.PENDING,)
                             ) -> Payment:
        """Takes a payment in one of ``from_states`` to SUCCEEDED, FAILED or REFUNDED, with
        its money, exactly once; otherwise returns it unchanged."""

    @abc.abstractmethod
    async def payment_unknown(self, payment_id: str, resolve_in_ms: int,
                              reason: str = "") -> Payment:
        """Marks an open payment UNKNOWN (notifying the user the first time) and due for
        the resolver in ``resolve_in_ms``."""

    @abc.abstractmethod
    def get_payment(self, payment_id: str) -> Payment | None:
        """The payment, or None."""

    @abc.abstractmethod
    def due_payments(self, limit: int) -> list[str]:
        """Ids of open payments whose resolve time has come, oldest first."""

    @abc.abstractmethod
    async def expire_due(self, limit: int) -> int:
        """Returns expired envelopes' unclaimed shares to their senders, exactly once each."""

    @abc.abstractmethod
    async def apply_credits(self, limit: int) -> int:
        """Applies up to ``limit`` pending grab credits to wallets, each exactly once."""

    @abc.abstractmethod
    def credit_backlog(self) -> int:
        """Grabs whose credit has not landed in a wallet yet (the credit bus's lag)."""

    @property
    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Write requests waiting to be committed."""

    @abc.abstractmethod
    def notifications(self, user_id: str, after_event_id: int, limit: int) -> list[Notice]:
        """The user's notification events after ``after_event_id``, oldest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commits what is queued and closes the store."""
