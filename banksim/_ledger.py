"""The bank's books in LMDB: cards, orders and the merchant (gateway) account.

Double entry inside the bank: a Debit moves money card -> merchant, a Credit
merchant -> card, a Refund merchant -> card for a settled debit. Opening a card
brings its opening balance into the books, so at every commit

    sum(card balances) + merchant balance == money the cards opened with

where the merchant balance is debited - credited - refunded. ``snapshot``
recounts both sides from one read transaction.

Per-channel totals: besides the bank-wide debited, credited and refunded
totals, the ledger keeps them per bank and channel (a refund counts on the bank
and channel of the debit it returns), each moved in the same write transaction
as its bank-wide total, so over every bank and channel they sum to it at every
commit and survive a crash with it. A ledger of schema 1 (written before these
totals existed) gets them at open: ``_check_schema`` recounts them from the
order records (an order written before channels existed decodes as direct) in
one write transaction with the schema bump to 2, and refuses to open if the
recount disagrees with the bank-wide totals. Recounting from the orders, rather
than putting the whole bank-wide totals under direct, is right for a schema-1
ledger that already holds clearing orders too. A schema-1 simulator refuses a
schema-2 ledger, so it can never move money without the per-channel totals.

Writes: one writer thread owns every write transaction (a write transaction
never crosses threads). Requests queue up (bounded) and the writer takes as
many as are waiting, up to ``MAX_BATCH``, into one transaction and one fsync
(group commit). Each request runs in a child transaction so a refused one
leaves no trace while its neighbours commit. On ``MapFullError`` the writer
aborts the batch, doubles the map and runs the batch again.

Reads run on the caller's thread in their own short read transactions; a map
resize waits for them and holds new ones back (LMDB requires that no
transaction be open in the process while the map is resized).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lmdb
import structlog

from banksim._errors import BankError, FailedPrecondition, ResourceExhausted, Unavailable
from banksim._model import (
    INT64_MAX,
    Answer,
    Channel,
    DeclineReason,
    OrderKind,
    OrderRecord,
    OrderStatus,
    check_channel,
)

log = structlog.get_logger("banksim.ledger")

MAX_BATCH = 256
QUEUE_MAX = 8192
MAX_MAP_SIZE = 64 << 30
MAX_READERS = 126
MAX_DBS = 8
_STOP_TIMEOUT_S = 10.0
SCHEMA = b"2"
# Before per-channel totals: upgraded at open (see the module docstring).
_SCHEMA_NO_CHANNEL_TOTALS = b"1"

_INT64 = struct.Struct(">q")

# Keys in the totals database.
DEBITED = b"debited_fen"
CREDITED = b"credited_fen"
REFUNDED = b"refunded_fen"
OPENED = b"opened_fen"
CARDS = b"cards_opened"
ORDERS = b"orders"
# Per-channel totals: CHANNEL_TOTALS + b"<bank_id>/<channel label>/" + DEBITED, CREDITED or
# REFUNDED (bank ids and labels hold no "/").
CHANNEL_TOTALS = b"channel/"
_MONEY_KEYS = (DEBITED, CREDITED, REFUNDED)


def _channel_key(bank_id: str, channel: Channel, key: bytes) -> bytes:
    return CHANNEL_TOTALS + f"{bank_id}/{channel.label}/".encode("ascii") + key


def _money_of(record: OrderRecord) -> list[tuple[bytes, int]]:
    """The totals an order record has moved, as (total key, amount) pairs."""
    if record.kind == OrderKind.CREDIT and record.status == OrderStatus.SETTLED:
        return [(CREDITED, record.amount_fen)]
    if record.kind != OrderKind.DEBIT:
        return []
    if record.status == OrderStatus.SETTLED:
        return [(DEBITED, record.amount_fen)]
    if record.status == OrderStatus.REFUNDED:
        return [(DEBITED, record.amount_fen), (REFUNDED, record.amount_fen)]
    return []  # declined or voided: no money moved


@dataclass(frozen=True, slots=True)
class Payload:
    """A money order as asked: what a Debit or Credit names."""

    kind: OrderKind
    card_id: str
    amount_fen: int
    channel: Channel = Channel.DIRECT


@dataclass(frozen=True, slots=True)
class ChannelTotals:
    """Money the merchant account moved through one channel (of one bank, or summed)."""

    debited_fen: int = 0
    credited_fen: int = 0
    refunded_fen: int = 0

    @property
    def merchant_balance_fen(self) -> int:
        return self.debited_fen - self.credited_fen - self.refunded_fen

    def __add__(self, other: ChannelTotals) -> ChannelTotals:
        return ChannelTotals(self.debited_fen + other.debited_fen,
                             self.credited_fen + other.credited_fen,
                             self.refunded_fen + other.refunded_fen)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The ledger's totals and recounted card balances, all from one read transaction.

    ``by_channel`` holds the per-channel totals of every (bank id, channel) that has moved
    money; ``channels_add_up`` says they sum to the bank-wide totals.
    """

    debited_fen: int
    credited_fen: int
    refunded_fen: int
    opened_fen: int
    cards_opened: int
    orders: int
    card_balance_fen: int
    cards_counted: int
    by_channel: dict[tuple[str, Channel], ChannelTotals]

    @property
    def merchant_balance_fen(self) -> int:
        return self.debited_fen - self.credited_fen - self.refunded_fen

    def channel(self, channel: Channel, bank_id: str | None = None) -> ChannelTotals:
        """The totals of ``channel`` at one bank, or over every bank when ``bank_id`` is None."""
        return sum((t for (b, ch), t in self.by_channel.items()
                    if ch == channel and bank_id in (None, b)), ChannelTotals())

    @property
    def channels_add_up(self) -> bool:
        total = sum(self.by_channel.values(), ChannelTotals())
        return total == ChannelTotals(self.debited_fen, self.credited_fen, self.refunded_fen)

    @property
    def books_balance(self) -> bool:
        return (
            self.card_balance_fen + self.merchant_balance_fen == self.opened_fen
            and self.cards_counted == self.cards_opened
        )


class _MapGuard:
    """Many readers or one map resize, never both (a resize invalidates open transactions)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def resizing(self) -> Iterator[None]:
        with self._cond:
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _Failed:
    """A refused operation inside a batch: its child transaction was aborted."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_Op = Callable[[lmdb.Transaction], Any]
_STOP = object()


def _int(raw: bytes | memoryview | None) -> int:
    if raw is None:
        return 0
    assert len(raw) == _INT64.size, f"int64 value of {len(raw)} bytes"
    return int(_INT64.unpack(raw)[0])


class Ledger:
    """The bank's LMDB ledger. Writes are async (group commit); reads are synchronous."""

    def __init__(self, path: str, *, opening_fen: int, map_size: int) -> None:
        assert 0 <= opening_fen <= INT64_MAX
        self._opening_fen = opening_fen
        os.makedirs(path, exist_ok=True)
        self._env = lmdb.open(
            path, map_size=map_size, max_dbs=MAX_DBS, max_readers=MAX_READERS,
            sync=True, metasync=True, writemap=False, max_spare_txns=1, lock=True,
        )
        stale = self._env.reader_check()
        self._map_size = map_size
        self._cards = self._env.open_db(b"cards")
        self._orders = self._env.open_db(b"orders")
        self._totals = self._env.open_db(b"totals")
        self._meta = self._env.open_db(b"meta")
        try:
            self._check_schema()
        except BaseException:
            self._env.close()
            raise
        self._guard = _MapGuard()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_MAX)
        self._stopped = False
        self.commits = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._run, name="banksim-ledger-writer", daemon=True)
        self._thread.start()
        log.info("ledger_open", path=path, map_size=map_size, stale_readers_cleared=stale)

    def _check_schema(self) -> None:
        """Stamps a new ledger; upgrades one of schema 1 by recounting its per-channel totals."""
        with self._env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self._meta)
            if found == SCHEMA:
                return
            if found not in (None, _SCHEMA_NO_CHANNEL_TOTALS):
                raise RuntimeError(f"ledger schema {found!r}, expected {SCHEMA!r}")
            self._recount_channel_totals(txn)
            txn.put(b"schema", SCHEMA, db=self._meta)

    def _recount_channel_totals(self, txn: lmdb.Transaction) -> None:
        """Writes the per-channel totals from the order records (O(orders)); RuntimeError if
        they do not sum to the bank-wide totals."""
        sums: dict[bytes, int] = {}
        orders = 0
        for _, raw in txn.cursor(db=self._orders):
            record = OrderRecord.decode(raw)
            orders += 1
            for key, amount in _money_of(record):
                channel_key = _channel_key(record.bank_id, record.channel, key)
                sums[channel_key] = sums.get(channel_key, 0) + amount
        for key in _MONEY_KEYS:
            recounted = sum(v for k, v in sums.items() if k.endswith(b"/" + key))
            booked = _int(txn.get(key, db=self._totals))
            if recounted != booked:
                raise RuntimeError(f"ledger {key.decode()} is {booked} but its orders sum to "
                                   f"{recounted}")
        for channel_key, value in sums.items():
            txn.put(channel_key, _INT64.pack(value), db=self._totals)
        log.info("ledger_channel_totals_recounted", orders=orders, keys=len(sums))

    # -- the writer ---------------------------------------------------------------------------

    async def _write(self, op: _Op) -> Any:
        if self._stopped:
            raise Unavailable("BANK_SHUTTING_DOWN")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            self._queue.put_nowait((op, loop, fut))
        except queue.Full:
            raise ResourceExhausted("LEDGER_BUSY", "ledger write queue full") from None
        return await fut

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is _STOP
            items = [item for item in batch if item is not _STOP]
            if items:
                self._commit_and_answer(items)
            if stop:
                return

    def _commit_and_answer(self, items: list[tuple[_Op, asyncio.AbstractEventLoop, Any]]) -> None:
        try:
            results: list[Any] = self._commit([op for op, _, _ in items])
        except Exception as exc:  # a programmer error or a dead disk: every op in the batch fails
            log.exception("ledger_batch_failed", ops=len(items))
            results = [_Failed(exc)] * len(items)
        for (_, loop, fut), result in zip(items, results, strict=True):
            with contextlib.suppress(RuntimeError):  # the loop already closed at shutdown
                loop.call_soon_threadsafe(_resolve, fut, result)

    def _commit(self, ops: list[_Op]) -> list[Any]:
        while True:
            txn = self._env.begin(write=True)
            try:
                results = [self._run_one(txn, op) for op in ops]
                txn.commit()
            except lmdb.MapFullError:
                with contextlib.suppress(lmdb.Error):
                    txn.abort()
                self._grow()
                continue
            except BaseException:
                with contextlib.suppress(lmdb.Error):
                    txn.abort()
                raise
            self.commits += 1
            self.ops += len(ops)
            return results

    def _run_one(self, parent: lmdb.Transaction, op: _Op) -> Any:
        child = self._env.begin(write=True, parent=parent)
        try:
            result = op(child)
        except BankError as err:
            child.abort()
            return _Failed(err)
        except BaseException:
            child.abort()
            raise
        child.commit()
        return result

    def _grow(self) -> None:
        new_size = self._map_size * 2
        if new_size > MAX_MAP_SIZE:
            raise Unavailable("LEDGER_FULL", f"ledger map would pass {MAX_MAP_SIZE} bytes")
        with self._guard.resizing():
            self._env.set_mapsize(new_size)
        log.info("ledger_map_grown", old_size=self._map_size, new_size=new_size)
        self._map_size = new_size

    def close(self) -> None:
        """Stops the writer after the writes already queued, then closes the environment."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put(_STOP, timeout=_STOP_TIMEOUT_S)
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("ledger_writer_stuck")
            return
        self._env.close()
        log.info("ledger_closed", commits=self.commits, ops=self.ops)

    # -- building blocks, inside a write transaction ------------------------------------------

    def _add(self, txn: lmdb.Transaction, key: bytes, delta: int) -> None:
        value = _int(txn.get(key, db=self._totals)) + delta
        assert -INT64_MAX <= value <= INT64_MAX, (key, value)
        txn.put(key, _INT64.pack(value), db=self._totals)

    def _book(self, txn: lmdb.Transaction, key: bytes, record: OrderRecord) -> None:
        """Adds the order's amount to the bank-wide total ``key`` and to its bank's and
        channel's, in the one transaction."""
        self._add(txn, key, record.amount_fen)
        self._add(txn, _channel_key(record.bank_id, record.channel, key), record.amount_fen)

    def _card_balance(self, txn: lmdb.Transaction, card_id: str) -> int:
        """The card's balance, opening the card (and bringing its money into the books) if new."""
        key = card_id.encode("ascii")
        raw = txn.get(key, db=self._cards)
        if raw is not None:
            balance = _int(raw)
            assert balance >= 0, (card_id, balance)
            return balance
        txn.put(key, _INT64.pack(self._opening_fen), db=self._cards)
        self._add(txn, OPENED, self._opening_fen)
        self._add(txn, CARDS, 1)
        return self._opening_fen

    def _set_balance(self, txn: lmdb.Transaction, card_id: str, balance: int) -> None:
        assert 0 <= balance <= INT64_MAX, (card_id, balance)
        txn.put(card_id.encode("ascii"), _INT64.pack(balance), db=self._cards)

    def _get(self, txn: lmdb.Transaction, order_id: str) -> OrderRecord | None:
        raw = txn.get(order_id.encode("ascii"), db=self._orders)
        return None if raw is None else OrderRecord.decode(raw)

    def _put(self, txn: lmdb.Transaction, order_id: str, record: OrderRecord, *, new: bool) -> None:
        txn.put(order_id.encode("ascii"), record.encode(), db=self._orders)
        if new:
            self._add(txn, ORDERS, 1)

    # -- operations ---------------------------------------------------------------------------

    async def move(self, order_id: str, payload: Payload, *, inject_decline: bool) -> Answer:
        """Debit or Credit ``order_id``, idempotently; ``inject_decline`` refuses a new id."""
        return await self._write(lambda txn: self._move(txn, order_id, payload, inject_decline))

    def _move(
        self, txn: lmdb.Transaction, order_id: str, p: Payload, inject_decline: bool
    ) -> Answer:
        bank_id = p.card_id.partition("-")[0]
        found = self._get(txn, order_id)
        if found is not None:
            # Checked here too, in the write, for two first calls racing through both channels.
            check_channel(order_id, found.channel, p.channel)
            if found.status == OrderStatus.VOIDED:
                return Answer(order_id, OrderStatus.DECLINED, DeclineReason.ORDER_VOIDED, bank_id,
                              fresh=False)
            if not found.same_payload(p.kind, p.card_id, p.amount_fen):
                return Answer(order_id, OrderStatus.DECLINED, DeclineReason.ORDER_ID_REUSED,
                              bank_id, fresh=False)
            return Answer(order_id, found.status, found.decline_reason, bank_id, fresh=False)

        status, reason = OrderStatus.SETTLED, DeclineReason.UNSPECIFIED
        if inject_decline:
            status, reason = OrderStatus.DECLINED, DeclineReason.DECLINED
        elif p.kind == OrderKind.DEBIT:
            balance = self._card_balance(txn, p.card_id)
            if balance < p.amount_fen:
                status, reason = OrderStatus.DECLINED, DeclineReason.INSUFFICIENT_FUNDS
            else:
                self._set_balance(txn, p.card_id, balance - p.amount_fen)
        else:
            balance = self._card_balance(txn, p.card_id)
            if balance > INT64_MAX - p.amount_fen:
                raise FailedPrecondition("CARD_BALANCE_LIMIT", "card balance would pass int64")
            # The merchant account may go negative: the bank does not police what the
            # gateway pays out; the gateway's own books guard it and reconcile compares.
            self._set_balance(txn, p.card_id, balance + p.amount_fen)
        now_ns = time.time_ns()
        record = OrderRecord(p.kind, status, reason, p.card_id, p.amount_fen, now_ns, now_ns,
                             p.channel)
        for key, _ in _money_of(record):  # a settled debit or credit: one total
            self._book(txn, key, record)
        self._put(txn, order_id, record, new=True)
        return Answer(order_id, status, reason, bank_id, fresh=True)

    async def void(
        self, order_id: str, pending: Payload | None, channel: Channel = Channel.DIRECT
    ) -> tuple[OrderStatus, bool]:
        """Locks ``order_id`` unless it settled; returns its status and whether this call locked it.

        ``pending`` is a late debit not yet applied: the voided record keeps its payload. An
        unknown id is locked on ``channel``; a known one must belong to it (WRONG_CHANNEL).
        """
        return await self._write(lambda txn: self._void(txn, order_id, pending, channel))

    def _void(
        self, txn: lmdb.Transaction, order_id: str, pending: Payload | None, channel: Channel
    ) -> tuple[OrderStatus, bool]:
        now_ns = time.time_ns()
        found = self._get(txn, order_id)
        if found is None:
            kind, card_id, amount_fen = (
                (pending.kind, pending.card_id, pending.amount_fen) if pending
                else (OrderKind.UNSPECIFIED, "", 0)
            )
            check_channel(order_id, pending.channel if pending else channel, channel)
            record = OrderRecord(kind, OrderStatus.VOIDED, DeclineReason.UNSPECIFIED, card_id,
                                 amount_fen, now_ns, now_ns, channel)
            self._put(txn, order_id, record, new=True)
            return OrderStatus.VOIDED, True
        check_channel(order_id, found.channel, channel)
        if found.status == OrderStatus.DECLINED:
            record = OrderRecord(found.kind, OrderStatus.VOIDED, found.decline_reason,
                                 found.card_id, found.amount_fen, found.created_ns, now_ns,
                                 found.channel)
            self._put(txn, order_id, record, new=False)
            return OrderStatus.VOIDED, True
        return found.status, False

    async def refund(
        self, order_id: str, channel: Channel = Channel.DIRECT
    ) -> tuple[OrderRecord, bool]:
        """Returns a settled debit to its card; the record and whether this call refunded it."""
        return await self._write(lambda txn: self._refund(txn, order_id, channel))

    def _refund(
        self, txn: lmdb.Transaction, order_id: str, channel: Channel
    ) -> tuple[OrderRecord, bool]:
        found = self._get(txn, order_id)
        if found is not None:
            check_channel(order_id, found.channel, channel)
        refundable = (OrderStatus.SETTLED, OrderStatus.REFUNDED)
        if found is None or found.kind != OrderKind.DEBIT or found.status not in refundable:
            status = "NOT_FOUND" if found is None else found.status.name
            raise FailedPrecondition("NOT_REFUNDABLE", f"order is {status}, not a settled debit")
        if found.status == OrderStatus.REFUNDED:
            return found, False
        raw = txn.get(found.card_id.encode("ascii"), db=self._cards)
        assert raw is not None, f"settled debit {order_id} on an unopened card"
        balance = _int(raw)
        if balance > INT64_MAX - found.amount_fen:
            raise FailedPrecondition("CARD_BALANCE_LIMIT", "card balance would pass int64")
        self._set_balance(txn, found.card_id, balance + found.amount_fen)
        record = OrderRecord(found.kind, OrderStatus.REFUNDED, DeclineReason.UNSPECIFIED,
                             found.card_id, found.amount_fen, found.created_ns, time.time_ns(),
                             found.channel)
        self._book(txn, REFUNDED, record)
        self._put(txn, order_id, record, new=False)
        return record, True

    # -- reads --------------------------------------------------------------------------------

    def order(self, order_id: str) -> OrderRecord | None:
        with self._guard.reading(), self._env.begin() as txn:
            return self._get(txn, order_id)

    def card(self, card_id: str) -> tuple[bool, int]:
        """Whether the card is open, and its balance (or the balance it would open with)."""
        with self._guard.reading(), self._env.begin() as txn:
            raw = txn.get(card_id.encode("ascii"), db=self._cards)
        return (False, self._opening_fen) if raw is None else (True, _int(raw))

    def channel_totals(self) -> dict[tuple[str, Channel], ChannelTotals]:
        """The per-channel totals by (bank id, channel), from one read transaction."""
        with self._guard.reading(), self._env.begin() as txn:
            return self._channel_totals(txn)

    def _channel_totals(self, txn: lmdb.Transaction) -> dict[tuple[str, Channel], ChannelTotals]:
        found: dict[tuple[str, Channel], dict[str, int]] = {}
        cursor = txn.cursor(db=self._totals)
        if cursor.set_range(CHANNEL_TOTALS):
            for raw_key, raw in cursor:
                key = bytes(raw_key)
                if not key.startswith(CHANNEL_TOTALS):
                    break
                bank_id, label, name = key[len(CHANNEL_TOTALS):].decode("ascii").split("/")
                found.setdefault((bank_id, Channel[label.upper()]), {})[name] = _int(raw)
        return {where: ChannelTotals(**totals) for where, totals in sorted(found.items())}

    def snapshot(self) -> Snapshot:
        """Totals plus every card balance recounted, from one read transaction (O(cards))."""
        with self._guard.reading(), self._env.begin() as txn:
            total = count = 0
            for _, raw in txn.cursor(db=self._cards):
                balance = _int(raw)
                assert balance >= 0
                total += balance
                count += 1
            get = lambda key: _int(txn.get(key, db=self._totals))  # noqa: E731
            return Snapshot(
                debited_fen=get(DEBITED), credited_fen=get(CREDITED), refunded_fen=get(REFUNDED),
                opened_fen=get(OPENED), cards_opened=get(CARDS), orders=get(ORDERS),
                card_balance_fen=total, cards_counted=count,
                by_channel=self._channel_totals(txn),
            )


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():  # the caller went away; the write stands regardless
        return
    if isinstance(result, _Failed):
        fut.set_exception(result.error)
    else:
        fut.set_result(result)
