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
    def find_grab(self, user_id: str, envelope_id: str) -> tuple[GrabView, bytes] | None:
        """The user's grab of an envelope and its request digest (a read)."""

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
    async def begin_payment(
        self, user_id: str, kind: str, request_id: str, fingerprint: bytes, *,
        card_id: str, bank_id: str, amount_fen: int,
    ) -> Payment:
        """Saves a payment intent (PENDING) before the bank is called, or returns the saved one."""

    @abc.abstractmethod
    async def settle_top_up(self, payment_id: str) -> Payment:
        """The bank debited the card: credit the wallet from the bank clearing account."""

    @abc.abstractmethod
    async def fail_payment(self, payment_id: str, reason: str) -> Payment:
        """The bank definitely refused: the payment ends FAILED, nothing moves."""

    @abc.abstractmethod
    async def expire_due(self, limit: int) -> int:
        """Returns expired envelopes' unclaimed shares to their senders, exactly once each."""

    @abc.abstractmethod
    async def apply_credits(self, limit: int) -> int:
        """Applies up to ``limit`` pending grab credits to wallets, each exactly once."""

    @abc.abstractmethod
    def notifications(self, user_id: str, after_event_id: int, limit: int) -> list[Notice]:
        """The user's notification events after ``after_event_id``, oldest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commits what is queued and closes the store."""
