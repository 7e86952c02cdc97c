"""The gateway's vocabulary: kinds, states and the values the ledger returns.

The enums that also exist in hongbao.v1 share their numbers with it (a test
pins them to the generated protos), so a servicer passes them through as they
are; nothing here imports protobuf.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple


class EnvelopeKind(enum.IntEnum):
    LUCKY = 1
    NORMAL = 2


class EnvelopeStatus(enum.IntEnum):
    ACTIVE = 1
    SOLD_OUT = 2
    EXPIRED = 3
    PAYING = 4  # paid by card, the bank has not answered yet: not grabbable
    PAY_UNKNOWN = 5  # the card payment's result is unclear; the resolver decides
    FAILED = 6
    REFUNDED = 7


class PayMethod(enum.IntEnum):
    AUTO = 1
    BALANCE = 2
    CARD = 3


class PaymentKind(enum.StrEnum):
    """What a card payment is for; the value is what the payment record stores."""

    TOP_UP = "top_up"
    WITHDRAW = "withdraw"
    ENVELOPE = "envelope"  # a card-paid SendEnvelope


class PaymentStatus(enum.IntEnum):
    PENDING = 1
    SUCCEEDED = 2
    FAILED = 3
    UNKNOWN = 4
    REFUNDED = 5


OPEN_PAYMENT_STATES = (PaymentStatus.PENDING, PaymentStatus.UNKNOWN)


class GrabOutcome(enum.IntEnum):
    GRABBED = 1
    ALREADY_GRABBED = 2
    SOLD_OUT = 3
    EXPIRED = 4


class TxKind(enum.IntEnum):
    """Transfer kinds; also the wallet transaction kinds of hongbao.v1."""

    TOP_UP = 1
    WITHDRAW = 2
    ENVELOPE_SENT = 3
    ENVELOPE_CREDIT = 4
    EXPIRY_REFUND = 5
    WITHDRAW_REVERSAL = 6
    PHOTO_UNLOCK = 7  # viewer's wallet -> owner's wallet; the viewer's entry and the transfer
    PHOTO_INCOME = 8  # the owner's wallet entry of that same transfer
    GRAB = 20  # escrow -> pending credit; not a wallet movement


class NoticeKind(enum.IntEnum):
    """hongbao.v1.NotificationKind."""

    SUCCEEDED = 1
    UNKNOWN = 2
    LOCKED = 3
    REFUNDED = 4
    EXPIRED_REFUND = 5
    CREDITED = 6
    CARD_SWITCHED = 7


# What a user reads in their notification feed, defined once for every backend.
NOTICE_TEXT = {
    NoticeKind.SUCCEEDED: "the payment went through",
    NoticeKind.UNKNOWN: "the bank's answer is unclear; we are checking and will tell you",
    NoticeKind.LOCKED: "the bank order is locked: it can never be charged",
    NoticeKind.REFUNDED: "the bank took the money and has returned it to your card",
    NoticeKind.CREDITED: "a red envelope share reached your wallet",
    NoticeKind.CARD_SWITCHED: "the card could not pay; trying your next card",
}


def expired_refund_text(unclaimed_count: int) -> str:
    return f"{unclaimed_count} unclaimed shares came back to your wallet"


def photo_income_text(photo_id: str) -> str:
    """The owner's CREDITED event of a paid photo unlock (it does not name the viewer)."""
    return f"a friend paid to see your photo {photo_id}"


# -- results -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    envelope_id: str
    status: int  # EnvelopeStatus
    paid_via: int  # PayMethod
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


class CreditKind(enum.StrEnum):
    """What a credit between SETs pays for; the value is what its records and messages carry."""

    GRAB = "grab"  # a grab's share for a user of another SET
    PHOTO_INCOME = "photo_income"  # a paid photo unlock for an owner of another SET
    # A slot handoff's money (Ledger.export_slots): a moved wallet's balance, user_id its
    # owner and reference_id the move; a moved envelope's escrow, user_id its sender and
    # reference_id the envelope. Neither is a wallet entry: the history travels as records.
    WALLET_MOVE = "wallet_move"
    ESCROW_MOVE = "escrow_move"


# The transfer kind of a slot handoff's money (m:<move>:...). Like TxKind.GRAB it is never a
# wallet entry; unlike it, it is not a TxKind member, since the API's TransactionKind has
# no such value and the enums share their numbers with it.
SLOT_MOVE_KIND = 21


class RemoteCredit(NamedTuple):
    """A credit for a user whose wallet lives on another SET (cluster mode).

    ``transfer_id`` is the transfer the sending SET booked as <source> -> x:<home>: a
    grab's credit (pending -> x:<home>) or a photo unlock (viewer's wallet -> x:<home>).
    The home SET books the same id as x:<from> -> wallet, so a credit delivered twice is
    applied once and reconcile can pair the two halves.

    ``reference_id`` is what the wallet entry refers to, as it would on one SET: the
    envelope of a grab, the unlock's payment id of a photo income (whose ``photo_id``
    the owner's notification names).
    """

    home: str             # the SET the user's wallet lives on
    transfer_id: str
    user_id: str
    amount_fen: int
    reference_id: str
    kind: CreditKind = CreditKind.GRAB
    photo_id: str = ""    # PHOTO_INCOME only
    seq: int = 0          # its place on the sending SET's outbox (0 once received)


@dataclasses.dataclass(frozen=True, slots=True)
class SlotExport:
    """What Ledger.export_slots took off this SET for the new owner."""

    move_id: str
    chunks: int  # on the migration outbox, ids <move_id>:0 .. <move_id>:<chunks - 1>
    wallets: int  # wallets with a balance, moved to x:<new owner>
    wallet_fen: int
    envelopes: int  # envelopes of the slots (with or without escrow left)
    escrow_fen: int
    records: int  # rows carried in the chunks


class MigrationChunk(NamedTuple):
    """One chunk on the migration outbox, for the shipper to carry to ``to_set``."""

    seq: int  # its place on the outbox (what migration_chunks_sent takes)
    chunk_id: str  # <move_id>:<n>
    to_set: str
    data: bytes  # what the new owner's Ledger.import_slots takes


class GrabFound(NamedTuple):
    """A user's grab of an envelope, read in one go with what a replay needs."""

    grab: GrabView
    request_digest: bytes
    remaining_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeState:
    """The few envelope fields the grab gate needs."""

    count: int
    claimed: int
    status: int  # EnvelopeStatus
    expires_at_ms: int


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
class UnlockResult:
    """A Moments photo unlock: paid (``amount_fen`` > 0, in the books) or free (nothing written)."""

    payment_id: str
    amount_fen: int
    free: bool


class Balance(NamedTuple):
    balance_fen: int
    pending_credit_fen: int


@dataclasses.dataclass(frozen=True, slots=True)
class WalletEntry:
    transaction_id: str
    kind: TxKind
    amount_fen: int  # signed: + into the wallet, - out of it
    reference_id: str
    created_at_ms: int


class WalletPage(NamedTuple):
    entries: list[WalletEntry]
    next_cursor: int | None  # None: this is the last page


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    """One event of a user's notification feed; ``event_id`` only grows."""

    event_id: int
    kind: int  # NoticeKind
    payment_id: str
    envelope_id: str
    amount_fen: int
    message: str
    created_at_ms: int


# A card payment FAILED for one of these is known not to have moved money: refused before
# anything reached the bank, or declined by it. Another card may take over (AUTO).
SWITCHABLE_REASONS = frozenset({"BANK_BUSY", "BANK_CIRCUIT_OPEN", "BANK_CHANNEL_DOWN",
                                "CARD_DECLINED", "CARD_INSUFFICIENT_FUNDS"})


@dataclasses.dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    user_id: str
    kind: PaymentKind
    card_id: str
    bank_id: str
    amount_fen: int
    status: PaymentStatus
    reason: str = ""
    created_at_ms: int = 0
    updated_at_ms: int = 0
    envelope_id: str = ""  # the envelope a card payment funds
    attempts: int = 0  # resolver attempts that found the bank unclear
    # The bank channel the order id was (or is about to be) sent through: the only one the
    # bank may know it by, so the resolver asks there. "direct" or "clearing".
    channel: str = "direct"

    @property
    def open(self) -> bool:
        return self.status in OPEN_PAYMENT_STATES

    @property
    def replaceable(self) -> bool:
        """FAILED without moving money (see SWITCHABLE_REASONS): another card may take over."""
        return self.status == PaymentStatus.FAILED and self.reason in SWITCHABLE_REASONS


class PaymentBegun(NamedTuple):
    payment: Payment
    created: bool  # False: a retry found the intent saved by an earlier call


@dataclasses.dataclass(frozen=True, slots=True)
class CardEnvelope:
    """An envelope to create with its card payment (see Ledger.begin_payment)."""

    envelope_id: str
    count: int
    kind: int
    greeting: str
    expires_in_s: int
    shares: list[int]
    request_id: str  # of the SendEnvelope call: its idempotency record is written too
    send_fingerprint: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerStats:
    """The ledger's own counters, for metrics and GetQosStatus."""

    queue_depth: int  # writes waiting to be committed
    batches: int  # group commits so far
    requests: int  # write requests committed
    batch_size_max: int
    apply_s_total: float  # running the money rules
    commit_s_total: float  # committing, fsync included
    credit_backlog: int  # grabs whose credit has not reached a wallet yet
    queue_wait_s_total: float = 0.0  # writes waiting for their group commit, summed
    cpu_s_total: float = 0.0  # the writer thread's CPU time
    xcredit_outbox: int = 0  # credits for other SETs waiting for the relay (cluster mode)
