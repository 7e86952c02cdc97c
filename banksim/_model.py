"""The bank's domain vocabulary: ids, amounts, order records. Knows nothing about gRPC.

The enums mirror ``banksim.v1`` numbers one for one (``_service`` asserts it),
so a value crosses the transport boundary unchanged.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from banksim import cards
from banksim._errors import FailedPrecondition, InvalidArgument

MAX_AMOUNT_FEN = 10**12
INT64_MAX = 2**63 - 1

_ORDER_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class OrderStatus(enum.IntEnum):
    NOT_FOUND = 1
    SETTLED = 2
    DECLINED = 3
    VOIDED = 4
    REFUNDED = 5


class OrderKind(enum.IntEnum):
    UNSPECIFIED = 0
    DEBIT = 1
    CREDIT = 2


class Channel(enum.IntEnum):
    """The road to a bank: straight to it, or through a clearing house."""

    DIRECT = 1
    CLEARING = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def channel_of(value: int) -> Channel:
    """The channel a request names; 0 (unspecified, every caller before channels) is direct."""
    if value == 0:
        return Channel.DIRECT
    try:
        return Channel(value)
    except ValueError:
        raise InvalidArgument("UNKNOWN_CHANNEL", f"no channel {value}") from None


def check_channel(order_id: str, owner: Channel, asked: Channel) -> None:
    """FAILED_PRECONDITION WRONG_CHANNEL unless ``asked`` is the channel the order belongs to.

    An order id lives on one channel only, so a retry through the other channel can never
    move money twice (the two channels cannot see each other's answers in a real bank).
    """
    if owner != asked:
        raise FailedPrecondition(
            "WRONG_CHANNEL",
            f"order {order_id} belongs to the {owner.label} channel, not {asked.label}",
            order_id=order_id, channel=owner.label, asked_channel=asked.label,
        )


class DeclineReason(enum.IntEnum):
    UNSPECIFIED = 0
    INSUFFICIENT_FUNDS = 1
    DECLINED = 2
    ORDER_VOIDED = 3
    ORDER_ID_REUSED = 4


def bank_of(card_id: str, banks: frozenset[str]) -> str:
    """The bank a card belongs to; INVALID_ARGUMENT for a malformed id or unknown bank."""
    parsed = cards.parse_card_id(card_id)
    if parsed is None:
        raise InvalidArgument("INVALID_CARD_ID", "card id must be <bank_id>-<1..32 digits>")
    bank_id = parsed[0]
    if bank_id not in banks:
        raise InvalidArgument("UNKNOWN_BANK", f"no bank {bank_id!r}", bank_id=bank_id)
    return bank_id


def check_order_id(order_id: str) -> None:
    if _ORDER_ID.fullmatch(order_id) is None:
        raise InvalidArgument("INVALID_ORDER_ID", "order id must be 1..64 chars [A-Za-z0-9._:-]")


def check_amount(amount_fen: int) -> None:
    if not 0 < amount_fen <= MAX_AMOUNT_FEN:
        raise InvalidArgument("INVALID_AMOUNT", f"amount_fen must be in 1..{MAX_AMOUNT_FEN}")


# version, kind, status, decline_reason, amount_fen, created_ns, updated_ns; then card_id.
# Version 1 is an order of the direct channel (every order before channels existed, and
# every direct one since, byte for byte); version 2 adds a channel byte before card_id.
_ORDER = struct.Struct(">BBBBqqq")
_CHANNEL = struct.Struct(">B")
_ORDER_VERSION = 1
_ORDER_VERSION_CHANNEL = 2


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One order id as the ledger holds it. A voided never-seen id has no kind, card or amount."""

    kind: OrderKind
    status: OrderStatus
    decline_reason: DeclineReason
    card_id: str
    amount_fen: int
    created_ns: int
    updated_ns: int
    channel: Channel = Channel.DIRECT

    def __post_init__(self) -> None:
        # Checked on every build, so a record is checked before it is written and
        # again after it is read back.
        assert self.status != OrderStatus.NOT_FOUND, self
        assert isinstance(self.channel, Channel), self
        assert 0 <= self.amount_fen <= MAX_AMOUNT_FEN, self
        if self.kind == OrderKind.UNSPECIFIED:
            assert self.status == OrderStatus.VOIDED and not self.card_id, self
            assert self.amount_fen == 0, self
        else:
            assert self.card_id and self.amount_fen > 0, self
        assert (self.decline_reason != DeclineReason.UNSPECIFIED) == (
            self.status == OrderStatus.DECLINED
        ) or self.status == OrderStatus.VOIDED, self
        if self.status == OrderStatus.REFUNDED:
            assert self.kind == OrderKind.DEBIT, self

    @property
    def bank_id(self) -> str:
        return self.card_id.partition("-")[0] if self.card_id else ""

    def same_payload(self, kind: OrderKind, card_id: str, amount_fen: int) -> bool:
        return (self.kind, self.card_id, self.amount_fen) == (kind, card_id, amount_fen)

    def encode(self) -> bytes:
        direct = self.channel == Channel.DIRECT
        head = _ORDER.pack(
            _ORDER_VERSION if direct else _ORDER_VERSION_CHANNEL, self.kind, self.status,
            self.decline_reason, self.amount_fen, self.created_ns, self.updated_ns,
        )
        channel = b"" if direct else _CHANNEL.pack(self.channel)
        return head + channel + self.card_id.encode("ascii")

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> OrderRecord:
        version, kind, status, reason, amount, created, updated = _ORDER.unpack_from(raw)
        assert version in (_ORDER_VERSION, _ORDER_VERSION_CHANNEL), f"order version {version}"
        channel, start = Channel.DIRECT, _ORDER.size
        if version == _ORDER_VERSION_CHANNEL:
            channel = Channel(_CHANNEL.unpack_from(raw, start)[0])
            start += _CHANNEL.size
            assert channel != Channel.DIRECT, "a direct order is written as version 1"
        return cls(
            kind=OrderKind(kind), status=OrderStatus(status), decline_reason=DeclineReason(reason),
            card_id=bytes(raw[start:]).decode("ascii"), amount_fen=amount,
            created_ns=created, updated_ns=updated, channel=channel,
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """What a Debit or Credit call answers, and whether this call decided it."""

    order_id: str
    status: OrderStatus
    decline_reason: DeclineReason
    bank_id: str
    fresh: bool
