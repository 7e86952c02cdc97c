"""The simulation's bank: the bank simulator's rules and faults, in memory, on virtual time.

It answers the calls the gateway's bank link answers (``debit``, ``credit``, ``query``,
``void``, ``refund``, ``totals``), in the link's terms (:class:`BankAnswer`,
:class:`OrderStatus`, :class:`BankUnclear`, :class:`BankBusy`), with the rules of
``banksim`` (see ``banksim/_bank.py`` and ``banksim/_ledger.py``):

- a repeat of an order id answers from the record; a voided id declines
  ``BANK_ORDER_VOIDED``; the same id with another payload declines ``BANK_ORDER_ID_REUSED``;
- void locks an unknown or declined id; a settled or refunded one answers its status;
- refund returns a settled debit to its card, once.

Faults, drawn from the run's seeded generator, one draw per call:

- ``busy``: refused before acting (:class:`BankBusy`);
- ``timeout``: held for the caller's deadline, then unclear; nothing happens;
- ``decline``: a new order is recorded DECLINED;
- ``lost_response``: a new order is applied, then the answer is lost (unclear);
- ``late_debit``: a new debit is unclear at once and applied ``late_s`` later unless
  voided first; a bank restart drops the late debits still waiting;
- ``down``: every call is unclear at once (the connection is refused).

Money faults roll only for an order id the bank has not recorded, as in ``banksim``.
A call runs as the bank's own task: a gateway process that dies mid-call does not stop
the bank from acting on what it was sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

from gateway.payments.bank import BankAnswer, BankBusy, BankTotals, BankUnclear, OrderStatus

DEBIT, CREDIT = "debit", "credit"


class BankRefused(Exception):
    """A definite refusal of a malformed call (the gRPC bank's FAILED_PRECONDITION)."""


@dataclasses.dataclass(frozen=True)
class Faults:
    """Per-call probabilities, the bank's latency and whether it is down."""

    busy: float = 0.0
    timeout: float = 0.0
    decline: float = 0.0
    lost_response: float = 0.0
    late_debit: float = 0.0
    down: bool = False
    latency_s: float = 0.02
    late_s: float = 4.0

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v != getattr(_CLEAN, k)}


_CLEAN = Faults()


@dataclasses.dataclass
class Order:
    kind: str
    status: OrderStatus
    card_id: str
    amount_fen: int
    reason: str = ""


class SimBank:
    """One bank for every card id; ``opening_fen`` is each card's first balance."""

    def __init__(self, rng: random.Random, *, opening_fen: int, timeout_s: float) -> None:
        self.rng = rng
        self.faults = _CLEAN
        self.opening_fen = opening_fen
        self.timeout_s = timeout_s
        self.orders: dict[str, Order] = {}
        self.cards: dict[str, int] = {}
        self.debited = self.credited = self.refunded = 0
        self.injected: dict[str, int] = {}
        self._late: dict[str, tuple[Order, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- what the gateway calls ------------------------------------------------------

    async def debit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer:
        return await self._call(self._move, order_id, Order(DEBIT, OrderStatus.SETTLED,
                                                             card_id, amount_fen))

    async def credit(self, order_id: str, card_id: str, amount_fen: int) -> BankAnswer:
        return await self._call(self._move, order_id, Order(CREDIT, OrderStatus.SETTLED,
                                                             card_id, amount_fen))

    async def query(self, order_id: str) -> OrderStatus:
        return await self._call(self._query, order_id)

    async def void(self, order_id: str) -> OrderStatus:
        return await self._call(self._void, order_id)

    async def refund(self, order_id: str) -> OrderStatus:
        return await self._call(self._refund, order_id)

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

    # -- one call ----------------------------------------------------------------------

    async def _call(self, act, order_id: str, *args):
        task = asyncio.ensure_future(self._serve(act, order_id, *args))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may have died before it could

    def _count(self, fault: str) -> None:
        self.injected[fault] = self.injected.get(fault, 0) + 1

    async def _serve(self, act, order_id: str, *args):
        f = self.faults
        if f.down:
            self._count("down")
            await asyncio.sleep(0.001)
            raise BankUnclear("UNAVAILABLE: connection refused")
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
        return act(order_id, *args, roll=roll)

    def _money_fault(self, roll: float, kind: str) -> str:
        f = self.faults
        for name, p in (("decline", f.decline), ("lost_response", f.lost_response),
                        ("late_debit", f.late_debit if kind == DEBIT else 0.0)):
            if roll < p:
                return name
            roll -= p
        return ""

    def _move(self, order_id: str, new: Order, *, roll: float) -> BankAnswer:
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

    def _query(self, order_id: str, *, roll: float) -> OrderStatus:
        return self.status(order_id)

    def _void(self, order_id: str, *, roll: float) -> OrderStatus:
        late = self._late.pop(order_id, None)
        if late is not None:
            late[1].cancel()
        found = self.orders.get(order_id)
        if found is None:
            pending = late[0] if late is not None else Order("", OrderStatus.VOIDED, "", 0)
            pending.status = OrderStatus.VOIDED
            self.orders[order_id] = pending
            return OrderStatus.VOIDED
        if found.status == OrderStatus.DECLINED:
            found.status = OrderStatus.VOIDED
            return OrderStatus.VOIDED
        return found.status

    def _refund(self, order_id: str, *, roll: float) -> OrderStatus:
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
