"""The gateway's client of the bank (banksim.v1), speaking in domain terms.

The only module of the gateway that speaks the bank's protocol: everything
else sees :class:`BankAnswer`, :class:`OrderStatus` and :class:`BankTotals`.
Every call has a deadline. An answer is either definite (:class:`BankAnswer`:
settled or declined) or it is not, and then :class:`BankUnclear` says so: the
money may or may not have moved, and only asking the bank later can tell.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import grpc

from banksim import cards
from banksim.v1 import bank_pb2, bank_pb2_grpc
from gateway.errors import reason_of

SETTLED = bank_pb2.ORDER_STATUS_SETTLED

# The ways a bank is reached, in the butler's order of preference: the bank's own link,
# then the clearing house (a network operator between the gateway and every bank). An order
# id belongs to the channel the bank first recorded it through; the bank refuses the same
# id through another one (FAILED_PRECONDITION WRONG_CHANNEL: a bug here, never routine).
DIRECT = "direct"
CLEARING = "clearing"
CHANNELS = (DIRECT, CLEARING)
_WIRE_CHANNEL = {DIRECT: bank_pb2.CHANNEL_DIRECT, CLEARING: bank_pb2.CHANNEL_CLEARING}
_CHANNEL_NAME = {v: k for k, v in _WIRE_CHANNEL.items()}


class OrderStatus(enum.IntEnum):
    """What the bank says about an order id (banksim.v1.OrderStatus, same numbers)."""

    UNSPECIFIED = bank_pb2.ORDER_STATUS_UNSPECIFIED
    NOT_FOUND = bank_pb2.ORDER_STATUS_NOT_FOUND
    SETTLED = bank_pb2.ORDER_STATUS_SETTLED
    DECLINED = bank_pb2.ORDER_STATUS_DECLINED
    VOIDED = bank_pb2.ORDER_STATUS_VOIDED
    REFUNDED = bank_pb2.ORDER_STATUS_REFUNDED


@dataclasses.dataclass(frozen=True, slots=True)
class BankTotals:
    """The bank's own ledger totals for the merchant (gateway) account."""

    merchant_balance_fen: int
    total_debited_fen: int
    total_credited_fen: int
    total_refunded_fen: int
    # The merchant balance per channel, over every bank (a bank simulator from before
    # channels reports none).
    channels: dict[str, int] = dataclasses.field(default_factory=dict)


def bank_of_card(card_id: str) -> str | None:
    """The bank a card id names, or None when it is malformed (the bank's own rule)."""
    parsed = cards.parse_card_id(card_id)
    return None if parsed is None else parsed[0]


class BankUnclear(Exception):
    """The bank gave no definite answer (timeout, lost response, collapse)."""


class BankBusy(Exception):
    """The bank refused the call before acting on it (over capacity)."""


class ChannelDown(BankBusy):
    """The channel refused the call before acting on it (UNAVAILABLE ``CHANNEL_DOWN``): as
    definite as :class:`BankBusy`, nothing was recorded, so the order id is still free to go
    through another channel."""


@dataclasses.dataclass(frozen=True, slots=True)
class BankAnswer:
    settled: bool
    status: int
    decline_reason: str  # "" when settled


_DECLINES = {
    bank_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS: "CARD_INSUFFICIENT_FUNDS",
    bank_pb2.DECLINE_REASON_DECLINED: "CARD_DECLINED",
    bank_pb2.DECLINE_REASON_ORDER_VOIDED: "BANK_ORDER_VOIDED",
    bank_pb2.DECLINE_REASON_ORDER_ID_REUSED: "BANK_ORDER_ID_REUSED",
}


class BankClient:
    """One channel to the bank simulator, shared by every request of a process."""

    def __init__(self, target: str, timeout_s: float = 3.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.tls = credentials is not None
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(target))
        self._bank = bank_pb2_grpc.BankServiceStub(self._channel)
        self._admin = bank_pb2_grpc.BankAdminServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT) -> BankAnswer:
        req = bank_pb2.DebitRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen,
                                    channel=_WIRE_CHANNEL[channel])
        return self._answer(await self._call(self._bank.Debit, req))

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT) -> BankAnswer:
        req = bank_pb2.CreditRequest(order_id=order_id, card_id=card_id, amount_fen=amount_fen,
                                     channel=_WIRE_CHANNEL[channel])
        return self._answer(await self._call(self._bank.Credit, req))

    async def query(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        resp = await self._call(self._bank.QueryOrder, bank_pb2.QueryOrderRequest(
            order_id=order_id, channel=_WIRE_CHANNEL[channel]))
        return OrderStatus(resp.status)

    async def void(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        """Locks the order id; the answer is VOIDED, or SETTLED/REFUNDED if it had settled."""
        resp = await self._call(self._bank.VoidOrder, bank_pb2.VoidOrderRequest(
            order_id=order_id, channel=_WIRE_CHANNEL[channel]))
        return OrderStatus(resp.status)

    async def refund(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        resp = await self._call(self._bank.Refund, bank_pb2.RefundRequest(
            order_id=order_id, channel=_WIRE_CHANNEL[channel]))
        return OrderStatus(resp.status)

    async def totals(self) -> BankTotals:
        s = await self._call(self._admin.GetStats, bank_pb2.GetStatsRequest())
        channels: dict[str, int] = {}
        for bank in s.banks:
            for ch in bank.channels:
                name = _CHANNEL_NAME.get(ch.channel, DIRECT)
                channels[name] = channels.get(name, 0) + ch.merchant_balance_fen
        return BankTotals(s.merchant_balance_fen, s.total_debited_fen, s.total_credited_fen,
                          s.total_refunded_fen, channels)

    # -- the simulator's controls (demo, tests, benchmarks) -------------------------

    async def stats(self) -> bank_pb2.GetStatsResponse:
        """The simulator's raw per-bank counters."""
        return await self._call(self._admin.GetStats, bank_pb2.GetStatsRequest())

    async def set_faults(self, bank_id: str = "", faults: Mapping[str, float] | None = None,
                         *, channel: str = "", down: bool = False) -> None:
        """Replaces the fault settings (banksim.v1.FaultConfig fields) of one bank, or of all
        with ``bank_id`` empty, on ``channel`` or on every channel with it empty; ``down``
        takes the channel down."""
        await self._call(self._admin.SetFaults, bank_pb2.SetFaultsRequest(
            bank_id=bank_id, faults=bank_pb2.FaultConfig(**(faults or {})), down=down,
            channel=_WIRE_CHANNEL[channel] if channel else bank_pb2.CHANNEL_UNSPECIFIED))

    async def card_balance(self, card_id: str) -> int:
        """The card's balance at the bank (or the one it would open with)."""
        resp = await self._call(self._admin.GetCard, bank_pb2.GetCardRequest(card_id=card_id))
        return resp.balance_fen

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BankBusy(err.details()) from err
            if (err.code() == grpc.StatusCode.UNAVAILABLE
                    and reason_of(err) == "CHANNEL_DOWN"):
                raise ChannelDown(err.details()) from err
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION):
                raise  # a definite refusal of a malformed call: a bug upstream
            raise BankUnclear(f"{err.code().name}: {err.details()}") from err

    @staticmethod
    def _answer(resp) -> BankAnswer:
        if resp.status == SETTLED:
            return BankAnswer(True, resp.status, "")
        return BankAnswer(False, resp.status, _DECLINES.get(resp.decline_reason, "CARD_DECLINED"))
