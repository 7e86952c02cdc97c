"""Thin gRPC servicers: protobuf in, ``BankSim`` call, protobuf out.

``BankError`` becomes a status with an ErrorInfo reason in ``_boundary`` and
nowhere else.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from banksim._bank import Bank, BankSim
from banksim._errors import BankError, abort
from banksim._faults import FAULT_KEYS, BankState, Faults
from banksim._ledger import ChannelTotals
from banksim._model import Channel, DeclineReason, OrderKind, OrderStatus, channel_of
from banksim.v1 import bank_pb2 as pb
from banksim.v1 import bank_pb2_grpc


def _check_enums() -> None:
    """The domain enums carry the proto's numbers, so values cross the boundary unchanged."""
    for domain, proto, prefix in (
        (OrderStatus, pb.OrderStatus, "ORDER_STATUS_"),
        (OrderKind, pb.OrderKind, "ORDER_KIND_"),
        (DeclineReason, pb.DeclineReason, "DECLINE_REASON_"),
        (Channel, pb.Channel, "CHANNEL_"),
    ):
        for member in domain:
            assert proto.Value(prefix + member.name) == member.value, member


_check_enums()


# protoc's .pyi types an enum field as the proto enum class, whose values are plain ints
# at run time; the numbers are the domain's (_check_enums), so a cast is the conversion.
def _status(status: OrderStatus) -> pb.OrderStatus:
    return cast(pb.OrderStatus, status.value)


def _kind(kind: OrderKind) -> pb.OrderKind:
    return cast(pb.OrderKind, kind.value)


def _reason(reason: DeclineReason) -> pb.DeclineReason:
    return cast(pb.DeclineReason, reason.value)


def _channel(channel: Channel) -> pb.Channel:
    return cast(pb.Channel, channel.value)

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _boundary(
    method: Callable[[_S, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
    """Maps a ``BankError`` raised by ``method`` to its rich status."""

    @functools.wraps(method)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await method(self, request, context)
        except BankError as err:
            await abort(context, err)

    return wrapper


class BankService(bank_pb2_grpc.BankServiceServicer):
    def __init__(self, sim: BankSim) -> None:
        self._sim = sim

    @_boundary
    async def Debit(self, request: pb.DebitRequest, context: Any) -> pb.DebitResponse:
        answer = await self._sim.move(OrderKind.DEBIT, request.order_id, request.card_id,
                                      request.amount_fen, context.time_remaining,
                                      channel_of(request.channel))
        return pb.DebitResponse(order_id=answer.order_id, status=_status(answer.status),
                                decline_reason=_reason(answer.decline_reason),
                                bank_id=answer.bank_id)

    @_boundary
    async def Credit(self, request: pb.CreditRequest, context: Any) -> pb.CreditResponse:
        answer = await self._sim.move(OrderKind.CREDIT, request.order_id, request.card_id,
                                      request.amount_fen, context.time_remaining,
                                      channel_of(request.channel))
        return pb.CreditResponse(order_id=answer.order_id, status=_status(answer.status),
                                 decline_reason=_reason(answer.decline_reason),
                                 bank_id=answer.bank_id)

    @_boundary
    async def QueryOrder(
        self, request: pb.QueryOrderRequest, context: Any
    ) -> pb.QueryOrderResponse:
        found = await self._sim.query(request.order_id, context.time_remaining,
                                      channel_of(request.channel))
        if found is None:
            return pb.QueryOrderResponse(order_id=request.order_id,
                                         status=_status(OrderStatus.NOT_FOUND))
        return pb.QueryOrderResponse(
            order_id=request.order_id, status=_status(found.status), kind=_kind(found.kind),
            card_id=found.card_id, amount_fen=found.amount_fen, bank_id=found.bank_id,
            channel=_channel(found.channel),
        )

    @_boundary
    async def VoidOrder(self, request: pb.VoidOrderRequest, context: Any) -> pb.VoidOrderResponse:
        status = await self._sim.void(request.order_id, context.time_remaining,
                                      channel_of(request.channel))
        return pb.VoidOrderResponse(order_id=request.order_id, status=_status(status))

    @_boundary
    async def Refund(self, request: pb.RefundRequest, context: Any) -> pb.RefundResponse:
        status = await self._sim.refund(request.order_id, context.time_remaining,
                                        channel_of(request.channel))
        return pb.RefundResponse(order_id=request.order_id, status=_status(status))


class BankAdminService(bank_pb2_grpc.BankAdminServiceServicer):
    def __init__(self, sim: BankSim) -> None:
        self._sim = sim

    @_boundary
    async def SetFaults(self, request: pb.SetFaultsRequest, context: Any) -> pb.SetFaultsResponse:
        faults = Faults(**{key: getattr(request.faults, key) for key in FAULT_KEYS},
                        down=request.down)
        # Unspecified means every channel here (not direct): what callers before channels meant.
        channel = channel_of(request.channel) if request.channel else None
        banks = self._sim.set_faults(request.bank_id, faults, channel)
        money = self._sim.channel_totals()
        return pb.SetFaultsResponse(banks=[self._bank_stats(b, money) for b in banks])

    @_boundary
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        snap = await self._sim.snapshot()
        commits, ops = self._sim.ledger_commits
        return pb.GetStatsResponse(
            banks=[self._bank_stats(b, snap.by_channel) for b in self._sim.banks.values()],
            total_debited_fen=snap.debited_fen, total_credited_fen=snap.credited_fen,
            total_refunded_fen=snap.refunded_fen, merchant_balance_fen=snap.merchant_balance_fen,
            opened_card_fen=snap.opened_fen, card_balance_fen=snap.card_balance_fen,
            cards_opened=snap.cards_opened, orders=snap.orders, books_balance=snap.books_balance,
            ledger_commits=commits, ledger_ops=ops,
        )

    @_boundary
    async def GetCard(self, request: pb.GetCardRequest, context: Any) -> pb.GetCardResponse:
        bank_id, opened, balance_fen = self._sim.card(request.card_id)
        return pb.GetCardResponse(card_id=request.card_id, bank_id=bank_id, opened=opened,
                                  balance_fen=balance_fen)

    def _bank_stats(
        self, bank: Bank, money: dict[tuple[str, Channel], ChannelTotals]
    ) -> pb.BankStats:
        """The bank's totals over its channels, and each channel on its own with the money
        ``money`` (the ledger's per-channel totals) holds for it."""
        now = time.monotonic()
        per_channel = [self._counts(state, now) for state in bank.channels.values()]
        totals = {key: sum(c[key] for c in per_channel) for key in per_channel[0]}
        totals["collapsed"] = any(c["collapsed"] for c in per_channel)
        totals["peak_tps"] = bank.meter.peak_tps(now)
        first = next(iter(bank.channels.values()))
        return pb.BankStats(
            bank_id=bank.bank_id, faults=_fault_config(first.faults), **totals,
            channels=[pb.ChannelStats(channel=_channel(state.channel), down=state.faults.down,
                                      faults=_fault_config(state.faults), **counts,
                                      **_money(money.get((bank.bank_id, state.channel))))
                      for state, counts in zip(bank.channels.values(), per_channel, strict=True)],
        )

    def _counts(self, state: BankState, now: float) -> dict[str, Any]:
        """One channel's counters under their proto names (BankStats' and ChannelStats')."""
        c = state.counters
        return {
            "requests": c.requests, "debits_settled": c.debits_settled,
            "credits_settled": c.credits_settled, "declines": c.declines, "refunds": c.refunds,
            "voids": c.voids, "faults_injected": c.faults_injected,
            "rejected_over_capacity": c.rejected_over_capacity,
            "collapsed": state.collapsed(now), "peak_tps": state.peak_tps(now),
            "collapses": c.collapses, "held_while_collapsed": c.held_while_collapsed,
            "declines_injected": c.declines_injected, "timeouts_injected": c.timeouts_injected,
            "lost_responses": c.lost_responses, "late_debits_scheduled": c.late_debits_scheduled,
            "late_debits_applied": c.late_debits_applied,
            "late_debits_dropped": c.late_debits_dropped,
            "late_debits_pending": self._sim.late_pending(state),
            "refused_while_down": c.refused_while_down,
        }


def _money(totals: ChannelTotals | None) -> dict[str, Any]:
    """One channel's money totals under their ChannelStats names (zero if it moved none)."""
    t = totals or ChannelTotals()
    return {"debited_fen": t.debited_fen, "credited_fen": t.credited_fen,
            "refunded_fen": t.refunded_fen, "merchant_balance_fen": t.merchant_balance_fen}


def _fault_config(faults: Faults) -> pb.FaultConfig:
    return pb.FaultConfig(**{key: getattr(faults, key) for key in FAULT_KEYS})
