"""The simulated banks: the ledger behind a per-bank gate of capacity and faults.

Transport-agnostic: callers pass the call's remaining time as a callable and
get domain answers or ``BankError``s. Every BankService call goes through one
path: validate -> route to a bank -> admit (capacity, collapse) -> one fault
draw -> latency -> act. How each fault behaves:

- latency: sleeps uniform [0.5, 1.5] x latency_ms before acting.
- decline: a Debit/Credit of a new order id is recorded DECLINED (reason
  DECLINED), no money moves; a repeat answers the same.
- timeout: holds the call until the caller's deadline passes (at most
  HOLD_MAX_S), then DEADLINE_EXCEEDED; nothing happens.
- lost response: a Debit/Credit of a new id is applied durably, then the call
  fails UNAVAILABLE (reason BANK_UNAVAILABLE).
- late debit: a Debit of a new id fails DEADLINE_EXCEEDED (reason BANK_TIMEOUT)
  at once; after late_debit_delay_ms (uniform [0.5, 1.5] x) the debit is
  applied durably unless the id was voided or decided meanwhile. At most
  LATE_MAX wait at a time (past that the call fails the same way and nothing
  is scheduled). On shutdown every late debit whose timer has not fired is
  dropped: its order id stays unknown to the bank and can be voided later.
- capacity: a token bucket of capacity_tps per second (burst one second's
  worth); past it RESOURCE_EXHAUSTED reason BANK_OVER_CAPACITY. Rejections
  without a gap over OVERLOAD_GAP_S form a streak; a streak older than
  collapse_after_s collapses the bank: for collapse_for_s every call to it is
  held like a timeout. Then it recovers with a full bucket.

Money faults (decline, lost response, late debit) roll only for an order id the
bank has not recorded, so a repeat answers from the ledger and no fault decides
money twice. QueryOrder, VoidOrder and Refund route to the bank of the recorded
order (or of a waiting late debit); an id the bank never saw has no bank, so
those calls pass no gate.

Channels: every bank is reached through each served channel (direct, clearing),
and each channel has its own gate (all of the above, per channel) and counters;
the money is one ledger. A call names its channel (none: direct). An order id
belongs to the channel it first came through (recorded with the order, or with a
waiting late debit); the same id through another channel is refused before any
gate, FAILED_PRECONDITION WRONG_CHANNEL, and moves nothing. A channel set
``down`` refuses every call through it, UNAVAILABLE CHANNEL_DOWN, before that
(counted in its requests). An id the bank never saw has no bank, so a QueryOrder
or VoidOrder of it passes no gate, a down one included: NOT_FOUND, or locked on
the channel named.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from banksim._errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from banksim._faults import FAULT_FIELDS, Admission, BankState, Fault, Faults, PeakMeter
from banksim._ledger import ChannelTotals, Ledger, Payload, Snapshot
from banksim._model import (
    Answer,
    Channel,
    OrderKind,
    OrderRecord,
    OrderStatus,
    bank_of,
    check_amount,
    check_channel,
    check_order_id,
)

log = structlog.get_logger("banksim.bank")

HOLD_MAX_S = 30.0
# A held call ends a little after the caller's deadline, so the caller gives up first.
HOLD_PAST_DEADLINE_S = 0.05
LATE_MAX = 10_000
_CLOSE_TIMEOUT_S = 5.0

Remaining = Callable[[], float | None]


@dataclass(slots=True)
class _Late:
    payload: Payload
    bank: BankState
    timer: asyncio.TimerHandle


class Bank:
    """One simulated bank: a gate per channel it is reached through, and its own peak meter."""

    def __init__(self, bank_id: str, faults: dict[Channel, Faults], rng: random.Random,
                 now: float) -> None:
        assert faults, f"bank {bank_id} has no channel"
        self.bank_id = bank_id
        self.meter = PeakMeter(now)
        self.channels = {ch: BankState(bank_id, f.checked(), rng, now, ch, self.meter)
                         for ch, f in sorted(faults.items())}

    def gate(self, channel: Channel) -> BankState:
        """The channel's gate; INVALID_ARGUMENT UNKNOWN_CHANNEL if this simulator does not
        serve it."""
        state = self.channels.get(channel)
        if state is None:
            raise InvalidArgument("UNKNOWN_CHANNEL", f"the {channel.label} channel is not "
                                  "served", channel=channel.label)
        return state


class BankSim:
    """Every simulated bank, sharing one ledger and one random source."""

    def __init__(
        self, ledger: Ledger, banks: dict[str, dict[Channel, Faults]], rng: random.Random
    ) -> None:
        now = time.monotonic()
        self._ledger = ledger
        self._rng = rng
        self.banks = {b: Bank(b, f, rng, now) for b, f in banks.items()}
        self._bank_ids = frozenset(self.banks)
        self.channels = tuple(sorted({ch for f in banks.values() for ch in f}))
        self._late: dict[str, _Late] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    # -- the gate -----------------------------------------------------------------------------

    async def _enter(
        self, bank: BankState, remaining: Remaining, *, money: bool, late_allowed: bool = False
    ) -> Fault:
        now = time.monotonic()
        admission = bank.admit(now)
        if admission is Admission.HOLD:
            await self._hold(remaining)
        if admission is Admission.REJECT:
            raise ResourceExhausted("BANK_OVER_CAPACITY", "bank over capacity",
                                    bank_id=bank.bank_id)
        fault = bank.roll(money=money, late_allowed=late_allowed)
        latency_s = bank.latency_s()
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if fault is Fault.TIMEOUT:
            bank.counters.timeouts_injected += 1
            await self._hold(remaining)
        return fault

    async def _hold(self, remaining: Remaining) -> None:
        """Answers nothing until the caller's deadline has passed (bounded), then gives up.

        Shutdown ends a hold at once (UNAVAILABLE), so the server's grace period is not spent
        on calls that would never be answered.
        """
        left_s = remaining()
        hold_s = HOLD_MAX_S if left_s is None or not math.isfinite(left_s) else left_s
        hold_s = min(max(hold_s, 0.0) + HOLD_PAST_DEADLINE_S, HOLD_MAX_S)
        try:
            await asyncio.wait_for(self._closing.wait(), hold_s)
        except TimeoutError:
            raise DeadlineExceeded("BANK_TIMEOUT", "the bank did not answer") from None
        raise Unavailable("BANK_SHUTTING_DOWN", "the bank is shutting down")

    def begin_shutdown(self) -> None:
        """Releases every held call; called before the server's graceful stop."""
        self._closing.set()

    def _served(self, channel: Channel) -> None:
        if channel not in self.channels:
            raise InvalidArgument("UNKNOWN_CHANNEL", f"the {channel.label} channel is not "
                                  "served", channel=channel.label)

    def _route(
        self, order_id: str, channel: Channel
    ) -> tuple[OrderRecord | None, BankState | None]:
        """The recorded order and the gate of its bank on ``channel`` (None: no bank).

        UNAVAILABLE CHANNEL_DOWN if that gate is down; then WRONG_CHANNEL if the order
        belongs to another channel.
        """
        check_order_id(order_id)
        self._served(channel)
        found = self._ledger.order(order_id)
        late = self._late.get(order_id)
        if found is not None:
            owner, bank_id = found.channel, found.bank_id
        elif late is not None:
            owner, bank_id = late.payload.channel, late.bank.bank_id
        else:
            return None, None
        bank = self.banks.get(bank_id) if bank_id else None
        state = bank.gate(channel) if bank is not None else None
        if state is not None:
            state.refuse_if_down()
        check_channel(order_id, owner, channel)
        return found, state

    # -- BankService --------------------------------------------------------------------------

    async def move(
        self, kind: OrderKind, order_id: str, card_id: str, amount_fen: int, remaining: Remaining,
        channel: Channel = Channel.DIRECT,
    ) -> Answer:
        """Debit or Credit; see the module docstring for the faults on the way."""
        check_order_id(order_id)
        check_amount(amount_fen)
        bank = self.banks[bank_of(card_id, self._bank_ids)].gate(channel)
        bank.refuse_if_down()
        found = self._ledger.order(order_id)
        late = self._late.get(order_id)
        owner = found.channel if found is not None else (late.payload.channel if late else None)
        if owner is not None:
            check_channel(order_id, owner, channel)
        fault = await self._enter(bank, remaining, money=owner is None,
                                  late_allowed=kind == OrderKind.DEBIT)
        payload = Payload(kind, card_id, amount_fen, channel)
        if fault is Fault.LATE_DEBIT:
            self._schedule_late(order_id, payload, bank)
            raise DeadlineExceeded("BANK_TIMEOUT", "the bank did not answer in time")
        answer = await self._ledger.move(order_id, payload, inject_decline=fault is Fault.DECLINE)
        _count(bank, kind, answer)
        if fault is Fault.DECLINE and answer.fresh:
            bank.counters.declines_injected += 1
        if fault is Fault.LOST_RESPONSE:
            bank.counters.lost_responses += 1
            raise Unavailable("BANK_UNAVAILABLE", "connection to the bank reset")
        return answer

    async def query(
        self, order_id: str, remaining: Remaining, channel: Channel = Channel.DIRECT
    ) -> OrderRecord | None:
        """The recorded order, or None if the bank never saw the id."""
        found, bank = self._route(order_id, channel)
        if bank is None:
            return found
        await self._enter(bank, remaining, money=False)
        return self._ledger.order(order_id)  # read again: latency may have let a write land

    async def void(
        self, order_id: str, remaining: Remaining, channel: Channel = Channel.DIRECT
    ) -> OrderStatus:
        """Locks an unknown or declined id (VOIDED) on ``channel``; a settled one answers its
        status."""
        _, bank = self._route(order_id, channel)
        if bank is not None:
            await self._enter(bank, remaining, money=False)
        late = self._late.pop(order_id, None)
        if late is not None:
            late.timer.cancel()
            late.bank.counters.late_debits_dropped += 1
            log.info("late_debit_voided", order_id=order_id, bank_id=late.bank.bank_id)
        status, fresh = await self._ledger.void(order_id, late.payload if late else None, channel)
        if fresh and bank is not None:
            bank.counters.voids += 1
        return status

    async def refund(
        self, order_id: str, remaining: Remaining, channel: Channel = Channel.DIRECT
    ) -> OrderStatus:
        """Returns a settled debit to its card; FAILED_PRECONDITION NOT_REFUNDABLE otherwise."""
        _, bank = self._route(order_id, channel)
        if bank is not None:
            await self._enter(bank, remaining, money=False)
        record, fresh = await self._ledger.refund(order_id, channel)
        if fresh and bank is not None:
            bank.counters.refunds += 1
        return record.status

    # -- late debits --------------------------------------------------------------------------

    def _schedule_late(self, order_id: str, payload: Payload, bank: BankState) -> None:
        if len(self._late) >= LATE_MAX:
            log.warning("late_debits_full", order_id=order_id, limit=LATE_MAX)
            return
        delay_s = bank.late_delay_s()
        timer = asyncio.get_running_loop().call_later(delay_s, self._fire_late, order_id)
        self._late[order_id] = _Late(payload, bank, timer)
        bank.counters.late_debits_scheduled += 1

    def _fire_late(self, order_id: str) -> None:
        late = self._late.pop(order_id)
        task = asyncio.get_running_loop().create_task(self._apply_late(order_id, late))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_late(self, order_id: str, late: _Late) -> None:
        counters = late.bank.counters
        try:
            answer = await self._ledger.move(order_id, late.payload, inject_decline=False)
        except Exception as exc:  # the ledger refused or is closing: the late debit is lost
            counters.late_debits_dropped += 1
            log.warning("late_debit_dropped", order_id=order_id, error=str(exc))
            return
        if answer.fresh:
            counters.late_debits_applied += 1
            _count(late.bank, OrderKind.DEBIT, answer)
        else:
            counters.late_debits_dropped += 1
        log.info("late_debit", order_id=order_id, bank_id=late.bank.bank_id,
                 status=answer.status.name, applied=answer.fresh)

    async def close(self) -> None:
        """Drops every late debit still waiting (none applies) and lets firing ones finish."""
        for order_id, late in self._late.items():
            late.timer.cancel()
            late.bank.counters.late_debits_dropped += 1
            log.info("late_debit_dropped_at_shutdown", order_id=order_id)
        self._late.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_CLOSE_TIMEOUT_S)

    # -- admin --------------------------------------------------------------------------------

    def set_faults(
        self, bank_id: str, faults: Faults, channel: Channel | None = None
    ) -> list[Bank]:
        """Replaces the faults of one bank, or of every bank when ``bank_id`` is empty, on one
        channel, or on every channel when ``channel`` is None."""
        faults = faults.checked()
        if bank_id and bank_id not in self.banks:
            raise InvalidArgument("UNKNOWN_BANK", f"no bank {bank_id!r}", bank_id=bank_id)
        if channel is not None:
            self._served(channel)
        targets = [self.banks[bank_id]] if bank_id else list(self.banks.values())
        now = time.monotonic()
        for bank in targets:
            for state in bank.channels.values():
                if channel is None or state.channel == channel:
                    state.set_faults(faults, now)
                    log.info("faults_set", bank_id=bank.bank_id, channel=state.channel.label,
                             **_fields(faults))
        return targets

    def card(self, card_id: str) -> tuple[str, bool, int]:  # one ledger: no channel
        """The card's bank, whether it is open, and its balance (or opening balance)."""
        bank_id = bank_of(card_id, self._bank_ids)
        opened, balance_fen = self._ledger.card(card_id)
        return bank_id, opened, balance_fen

    async def snapshot(self) -> Snapshot:
        return await asyncio.to_thread(self._ledger.snapshot)

    def channel_totals(self) -> dict[tuple[str, Channel], ChannelTotals]:
        """The ledger's money totals by (bank id, channel); a cheap read (no card recount)."""
        return self._ledger.channel_totals()

    def late_pending(self, bank: BankState) -> int:
        return sum(1 for late in self._late.values() if late.bank is bank)

    @property
    def ledger_commits(self) -> tuple[int, int]:
        return self._ledger.commits, self._ledger.ops


def _count(bank: BankState, kind: OrderKind, answer: Answer) -> None:
    if not answer.fresh:
        return
    if answer.status == OrderStatus.DECLINED:
        bank.counters.declines += 1
    elif kind == OrderKind.DEBIT:
        bank.counters.debits_settled += 1
    else:
        bank.counters.credits_settled += 1


def _fields(faults: Faults) -> dict[str, float]:
    return {name: getattr(faults, name) for name in FAULT_FIELDS}


