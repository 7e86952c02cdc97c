"""The bank's books in LMDB: cards, orders and the merchant (gateway) account.

Double entry inside the bank: a Debit moves money card -> merchant, a Credit
merchant -> card, a Refund merchant -> card for a settled debit. Opening a card
brings its opening balance into the books, so at every commit

    sum(card balances) + merchant balance == money the cards opened with

where the merchant balance is debited - credited - refunded. ``snapshot``
recounts both sides from one read transaction.

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
SCHEMA = b"1"

_INT64 = struct.Struct(">q")

# Keys in the totals database.
DEBITED = b"debited_fen"
CREDITED = b"credited_fen"
REFUNDED = b"refunded_fen"
OPENED = b"opened_fen"
CARDS = b"cards_opened"
ORDERS = b"orders"


@dataclass(frozen=True, slots=True)
class Payload:
    """A money order as asked: what a Debit or Credit names."""

    kind: OrderKind
    card_id: str
    amount_fen: int
    channel: Channel = Channel.DIRECT


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The ledger's totals and recounted card balances, all from one read transaction."""

    debited_fen: int
    credited_fen: int
    refunded_fen: int
    opened_fen: int
    cards_opened: int
    orders: int
    card_balance_fen: int
    cards_counted: int

    @property
    def merchant_balance_fen(self) -> int:
        return self.debited_fen - self.credited_fen - self.refunded_fen

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
        self._check_schema()
        self._guard = _MapGuard()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_MAX)
        self._stopped = False
        self.commits = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._run, name="banksim-ledger-writer", daemon=True)
        self._thread.start()
        log.info("ledger_open", path=path, map_size=map_size, stale_readers_cleared=stale)

    def _check_schema(self) -> None:
        with self._env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self._meta)
            if found is None:
                txn.put(b"schema", SCHEMA, db=self._meta)
            elif found != SCHEMA:
                raise RuntimeError(f"ledger schema {found!r}, expected {SCHEMA!r}")

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
                self._add(txn, DEBITED, p.amount_fen)
        else:
            balance = self._card_balance(txn, p.card_id)
            if balance > INT64_MAX - p.amount_fen:
                raise FailedPrecondition("CARD_BALANCE_LIMIT", "card balance would pass int64")
            # The merchant account may go negative: the bank does not police what the
            # gateway pays out; the gateway's own books guard it and reconcile compares.
            self._set_balance(txn, p.card_id, balance + p.amount_fen)
            self._add(txn, CREDITED, p.amount_fen)
        now_ns = time.time_ns()
        record = OrderRecord(p.kind, status, reason, p.card_id, p.amount_fen, now_ns, now_ns,
                             p.channel)
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
        self._add(txn, REFUNDED, found.amount_fen)
        record = OrderRecord(found.kind, OrderStatus.REFUNDED, DeclineReason.UNSPECIFIED,
                             found.card_id, found.amount_fen, found.created_ns, time.time_ns(),
                             found.channel)
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
            )


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():  # the caller went away; the write stands regardless
        return
    if isinstance(result, _Failed):
        fut.set_exception(result.error)
    else:
        fut.set_result(result)
