"""The simulation's bank: the bank simulator's rules and faults, in memory, on virtual time.

It answers the calls the gateway's bank link answers (``debit``, ``credit``, ``query``,
``void``, ``refund``, ``totals``), in the link's terms (:class:`BankAnswer`,
:class:`OrderStatus`, :class:`BankUnclear`, :class:`BankBusy`, :class:`ChannelDown`),
with the rules of ``banksim`` (see ``banksim/_bank.py`` and ``banksim/_ledger.py``):

- a repeat of an order id answers from the record; a voided id declines
  ``BANK_ORDER_VOIDED``; the same id with another payload declines ``BANK_ORDER_ID_REUSED``;
- void locks an unknown or declined id; a settled or refunded one answers its status;
- refund returns a settled debit to its card, once.

Channels: every call names the channel it comes through (``direct`` or ``clearing``;
none: direct); the money is one ledger. An order id belongs to the channel it was first
recorded through (or its waiting late debit's, or, voided unknown, the void's); the same
id through another channel is refused before anything, WRONG_CHANNEL
(:class:`BankRefused`), and moves nothing: the gateway sent one order through two
channels, a defect the simulation's checks report (every such refusal is kept in
``wrong_channel``). A channel set down (``Faults.down_channels``) refuses every call
through it before that (:class:`ChannelDown`): a Debit or Credit always (it reaches the
card's bank), a QueryOrder, VoidOrder or Refund when the id is known; an id the bank
never saw has no bank, so those pass the channel gate, a down one included (NOT_FOUND,
or the void locks it on the channel named). The ownership is checked again when the
call acts, after its latency, for a first call through the other channel landing
meanwhile (as banksim checks it again in the ledger's write).

Faults, drawn from the run's seeded generator, one draw per call, alike on every channel
(only ``down_channels`` tells the channels apart):

- ``busy``: refused before acting (:class:`BankBusy`);
- ``timeout``: held for the caller's deadline, then unclear; nothing happens;
- ``decline``: a new order is recorded DECLINED;
- ``lost_response``: a new order is applied, then the answer is lost (unclear);
- ``late_debit``: a new debit is unclear at once and applied ``late_s`` later unless
  voided first; a bank restart drops the late debits still waiting;
- ``down``: every call on every channel is unclear at once (the connection is refused);
- ``down_channels``: those channels refuse as above (:class:`ChannelDown`).

Money faults roll only for an order id the bank has not recorded, as in ``banksim``.
Unlike ``banksim``, the per-call draw (busy, timeout, latency) also applies to a call
about an id the bank never saw: a stricter bank, never a laxer one.
A call runs as the bank's own task: a gateway process that dies mid-call does not stop
the bank from acting on what it was sent.

:class:`SimPayer` stands in for the payment butler (``gateway.payments.butler``), the
payer the card payments call (``gateway.usecases.cards.Payer``); see its docstring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable

import structlog

from gateway.payments.bank import (
    CHANNELS,
    DIRECT,
    BankAnswer,
    BankBusy,
    BankTotals,
    BankUnclear,
    ChannelDown,
    OrderStatus,
)

log = structlog.get_logger(__name__)

DEBIT, CREDIT = "debit", "credit"


class BankRefused(Exception):
    """A definite refusal of a malformed call (the gRPC bank's FAILED_PRECONDITION)."""


@dataclasses.dataclass(frozen=True)
class Faults:
    """Per-call probabilities, the bank's latency, whether it is down, and which of its
    channels are down."""

    busy: float = 0.0
    timeout: float = 0.0
    decline: float = 0.0
    lost_response: float = 0.0
    late_debit: float = 0.0
    down: bool = False
    latency_s: float = 0.02
    late_s: float = 4.0
    down_channels: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items() if v != getattr(_CLEAN, k)}

    @classmethod
    def from_json(cls, d: dict) -> Faults:
        """What :meth:`to_json` wrote (a plan saved before channels has no ``down_channels``)."""
        return cls(**{**d, "down_channels": tuple(d.get("down_channels", ()))})


_CLEAN = Faults()


@dataclasses.dataclass
class Order:
    kind: str
    status: OrderStatus
    card_id: str
    amount_fen: int
    reason: str = ""
    channel: str = DIRECT


class SimBank:
    """One bank for every card id; ``opening_fen`` is each card's first balance.

    ``on_wrong_channel``, when set, hears every WRONG_CHANNEL refusal as it happens.
    """

    def __init__(self, rng: random.Random, *, opening_fen: int, timeout_s: float) -> None:
        self.rng = rng
        self.faults = _CLEAN
        self.opening_fen = opening_fen
        self.timeout_s = timeout_s
        self.orders: dict[str, Order] = {}
        self.cards: dict[str, int] = {}
        self.debited = self.credited = self.refunded = 0
        self.injected: dict[str, int] = {}
        self.wrong_channel: list[str] = []
        self.on_wrong_channel: Callable[[str], None] | None = None
        # Money calls a payer moved to another channel (the payers die with their process).
        self.moved = 0
        self._late: dict[str, tuple[Order, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- what the gateway calls ------------------------------------------------------

    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT) -> BankAnswer:
        return await self._call(self._move, order_id, channel, Order(
            DEBIT, OrderStatus.SETTLED, card_id, amount_fen, channel=channel))

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT) -> BankAnswer:
        return await self._call(self._move, order_id, channel, Order(
            CREDIT, OrderStatus.SETTLED, card_id, amount_fen, channel=channel))

    async def query(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._call(self._query, order_id, channel)

    async def void(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._call(self._void, order_id, channel)

    async def refund(self, order_id: str, channel: str = DIRECT) -> OrderStatus:
        return await self._call(self._refund, order_id, channel)

    async def totals(self) -> BankTotals:
        return BankTotals(self.merchant_fen, self.debited, self.credited, self.refunded)

    async def close(self) -> None:
        return None

    # -- the simulation's controls ------------------------------------------------------

    @property
    def merchant_fen(self) -> int:
        return self.debited - self.credited - self.refunded

    def restart(self) -> None:
        """The bank process restarts: late debits still waiting are dropped, never applied."""
        for _order, timer in self._late.values():
            timer.cancel()
        self._late.clear()

    def card_balance(self, card_id: str) -> int:
        return self.cards.get(card_id, self.opening_fen)

    def status(self, order_id: str) -> OrderStatus:
        order = self.orders.get(order_id)
        return OrderStatus.NOT_FOUND if order is None else order.status

    def owner(self, order_id: str) -> str | None:
        """The channel the id belongs to: its record's, or its waiting late debit's."""
        found = self.orders.get(order_id)
        if found is not None:
            return found.channel
        late = self._late.get(order_id)
        return None if late is None else late[0].channel

    # -- one call ----------------------------------------------------------------------

    async def _call(self, act, order_id: str, channel: str, *args):
        task = asyncio.ensure_future(self._serve(act, order_id, channel, *args))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may have died before it could

    def _count(self, fault: str) -> None:
        self.injected[fault] = self.injected.get(fault, 0) + 1

    async def _serve(self, act, order_id: str, channel: str, *args):
        f = self.faults
        if f.down:
            self._count("down")
            await asyncio.sleep(0.001)
            raise BankUnclear("UNAVAILABLE: connection refused")
        if channel not in CHANNELS:
            raise BankRefused(f"UNKNOWN_CHANNEL: the {channel!r} channel is not served")
        if channel in f.down_channels and (act == self._move or self.owner(order_id)):
            self._count("channel_down")
            await asyncio.sleep(0.001)
            raise ChannelDown(f"CHANNEL_DOWN: the {channel} channel is down")
        self._check_channel(order_id, channel)
        roll = self.rng.random()
        if roll < f.busy:
            self._count("busy")
            await asyncio.sleep(0.001)
            raise BankBusy("BANK_OVER_CAPACITY")
        roll -= f.busy
        if roll < f.timeout:
            self._count("timeout")
            await asyncio.sleep(self.timeout_s)
            raise BankUnclear("DEADLINE_EXCEEDED")
        roll -= f.timeout
        await asyncio.sleep(f.latency_s * (0.5 + self.rng.random()))
        self._check_channel(order_id, channel)  # a first call through the other one landed
        return act(order_id, channel, *args, roll=roll)

    def _check_channel(self, order_id: str, channel: str) -> None:
        owner = self.owner(order_id)
        if owner is None or owner == channel:
            return
        what = f"order {order_id} belongs to the {owner} channel, not {channel}"
        self.wrong_channel.append(what)
        if self.on_wrong_channel is not None:
            self.on_wrong_channel(what)
        raise BankRefused(f"WRONG_CHANNEL: {what}")

    def _money_fault(self, roll: float, kind: str) -> str:
        f = self.faults
        for name, p in (("decline", f.decline), ("lost_response", f.lost_response),
                        ("late_debit", f.late_debit if kind == DEBIT else 0.0)):
            if roll < p:
                return name
            roll -= p
        return ""

    def _move(self, order_id: str, channel: str, new: Order, *, roll: float) -> BankAnswer:
        found = self.orders.get(order_id)
        late = self._late.pop(order_id, None)
        if late is not None:  # as in banksim: a repeat applies now, the late one is dropped
            late[1].cancel()
        if found is not None:
            if found.status == OrderStatus.VOIDED:
                return BankAnswer(False, OrderStatus.DECLINED, "BANK_ORDER_VOIDED")
            if (found.kind, found.card_id, found.amount_fen) != (
                    new.kind, new.card_id, new.amount_fen):
                return BankAnswer(False, OrderStatus.DECLINED, "BANK_ORDER_ID_REUSED")
            return BankAnswer(found.status == OrderStatus.SETTLED, found.status, found.reason)
        fault = "" if late is not None else self._money_fault(roll, new.kind)
        if fault:
            self._count(fault)
        if fault == "late_debit":
            timer = asyncio.get_running_loop().call_later(
                self.faults.late_s * (0.5 + self.rng.random()), self._apply_late, order_id)
            self._late[order_id] = (new, timer)
            raise BankUnclear("DEADLINE_EXCEEDED: the bank did not answer in time")
        if fault == "decline":
            new.status, new.reason = OrderStatus.DECLINED, "CARD_DECLINED"
        self._apply(order_id, new)
        if fault == "lost_response":
            raise BankUnclear("UNAVAILABLE: connection to the bank reset")
        return BankAnswer(new.status == OrderStatus.SETTLED, new.status, new.reason)

    def _apply(self, order_id: str, order: Order) -> None:
        balance = self.card_balance(order.card_id)
        if order.status == OrderStatus.SETTLED and order.kind == DEBIT:
            if balance < order.amount_fen:
                order.status, order.reason = OrderStatus.DECLINED, "CARD_INSUFFICIENT_FUNDS"
            else:
                self.cards[order.card_id] = balance - order.amount_fen
                self.debited += order.amount_fen
        elif order.status == OrderStatus.SETTLED:
            self.cards[order.card_id] = balance + order.amount_fen
            self.credited += order.amount_fen
        self.orders[order_id] = order

    def _apply_late(self, order_id: str) -> None:
        order, _timer = self._late.pop(order_id)
        if order_id not in self.orders:
            self._apply(order_id, order)

    def _query(self, order_id: str, channel: str, *, roll: float) -> OrderStatus:
        return self.status(order_id)

    def _void(self, order_id: str, channel: str, *, roll: float) -> OrderStatus:
        late = self._late.pop(order_id, None)
        if late is not None:
            late[1].cancel()
        found = self.orders.get(order_id)
        if found is None:
            pending = (late[0] if late is not None
                       else Order("", OrderStatus.VOIDED, "", 0, channel=channel))
            pending.status = OrderStatus.VOIDED
            self.orders[order_id] = pending
            return OrderStatus.VOIDED
        if found.status == OrderStatus.DECLINED:
            found.status = OrderStatus.VOIDED
            return OrderStatus.VOIDED
        return found.status

    def _refund(self, order_id: str, channel: str, *, roll: float) -> OrderStatus:
        found = self.orders.get(order_id)
        if found is None or found.kind != DEBIT or found.status not in (
                OrderStatus.SETTLED, OrderStatus.REFUNDED):
            raise BankRefused(f"NOT_REFUNDABLE: order {order_id} is "
                              f"{self.status(order_id).name}, not a settled debit")
        if found.status == OrderStatus.SETTLED:
            found.status = OrderStatus.REFUNDED
            self.cards[found.card_id] = self.card_balance(found.card_id) + found.amount_fen
            self.refunded += found.amount_fen
        return found.status


Switch = Callable[[str], Awaitable[None]]


class SimPayer:
    """The payment butler's twin: routes each new money call to a channel and moves one
    refused CHANNEL_DOWN to the next, as the butler does, with none of its admission.

    The twin knows only what the bank answered it, as the butler does (it never reads the
    bank's fault settings): a channel that answered CHANNEL_DOWN is passed over for
    ``cool_down_s`` (the butler's breaker, reduced to that). So:

    - :meth:`route` is ``preferred`` (by default the first channel, ``direct``) unless it
      is passed over, then the first channel not passed over; None when every channel is
      (the card payments then refuse BANK_CIRCUIT_OPEN, saving nothing);
    - a Debit or Credit answered :class:`ChannelDown` (definite: the bank recorded
      nothing) goes to the first channel not yet tried and not passed over, after awaiting
      ``switch(channel)``; with none left, or no ``switch``, the refusal is raised. Any
      other answer passes through unchanged: an unclear one never moves (the bank may hold
      the order on that channel), and a busy one stays too (the twin has no capacity of
      its own to steer by, so BANK_BUSY stands for the butler's refusal on every channel).

    One payer per process, as the butler; it counts every move in the bank's ``moved``.
    """

    def __init__(self, bank: SimBank, *, cool_down_s: float = 2.0,
                 channels: tuple[str, ...] = CHANNELS) -> None:
        self._bank = bank
        self._channels = channels
        self._cool_down_s = cool_down_s
        self._down_until: dict[str, float] = {}

    def route(self, bank_id: str, preferred: str | None = None) -> str | None:
        return self._next(preferred or self._channels[0], set())

    def usable(self, bank_id: str) -> bool:
        return self.route(bank_id) is not None

    async def debit(self, order_id: str, card_id: str, amount_fen: int,
                    channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        return await self._move(self._bank.debit, order_id, card_id, amount_fen, channel,
                                switch)

    async def credit(self, order_id: str, card_id: str, amount_fen: int,
                     channel: str = DIRECT, switch: Switch | None = None) -> BankAnswer:
        return await self._move(self._bank.credit, order_id, card_id, amount_fen, channel,
                                switch)

    def _next(self, preferred: str, tried: set[str]) -> str | None:
        now = asyncio.get_running_loop().time()
        up = [c for c in self._channels
              if c not in tried and self._down_until.get(c, -1.0) <= now]
        return preferred if preferred in up else (up[0] if up else None)

    async def _move(self, call: Callable[..., Awaitable[BankAnswer]], order_id: str,
                    card_id: str, amount_fen: int, channel: str,
                    switch: Switch | None) -> BankAnswer:
        tried: set[str] = set()
        while True:
            try:
                return await call(order_id, card_id, amount_fen, channel)
            except ChannelDown:
                tried.add(channel)
                now = asyncio.get_running_loop().time()
                self._down_until[channel] = now + self._cool_down_s
                following = self._next(channel, tried)
                if switch is None or following is None:
                    raise
            await switch(following)
            self._bank.moved += 1
            log.info("bank_channel_switch", order_id=order_id, came_from=channel, to=following)
            channel = following
