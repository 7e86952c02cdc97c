"""The LMDB backend: the ledger on an embedded, durable LMDB environment.

It stores bytes and nothing more: each table of ``gateway.domain.keys`` is a
named LMDB database, :class:`LmdbTx` maps the storage protocol onto an LMDB
transaction, and every write goes through the process's one
:class:`~gateway.ledger._writer.GroupCommitWriter`. What the bytes mean, and
every rule that moves money, is in ``gateway.domain``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import structlog

from gateway.domain import keys
from gateway.domain.store import Books
from gateway.ledger._contract import BooksLedger
from gateway.ledger._writer import GroupCommitWriter

log = structlog.get_logger(__name__)

T = TypeVar("T")
_MAX_DBS = len(keys.TABLES) + 8


class LmdbTx:
    """The storage protocol (``gateway.domain.store.Tx``) on one LMDB transaction."""

    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    # py-lmdb returns bytes, not buffers, as the transactions are opened with
    # buffers=False (its default); the stubs allow both.
    def get(self, table: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._dbs[table])  # type: ignore[return-value]

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True,
            append: bool = False) -> bool:
        if overwrite and not append:  # the common case, without py-lmdb parsing two flags
            return self._txn.put(key, value, db=self._dbs[table])
        return self._txn.put(key, value, db=self._dbs[table], overwrite=overwrite,
                             append=append)

    def delete(self, table: str, key: bytes) -> bool:
        return self._txn.delete(key, db=self._dbs[table])

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cur = self._txn.cursor(db=self._dbs[table])
        found = cur.set_range(start) if start else cur.first()
        if found:
            yield from cur.iternext()  # type: ignore[misc]

    def scan_back(self, table: str, before: bytes | None = None
                  ) -> Iterator[tuple[bytes, bytes]]:
        cur = self._txn.cursor(db=self._dbs[table])
        if before is None:
            found = cur.last()
        else:
            # The first key at or past `before`, then one back: the newest below it.
            found = cur.prev() if cur.set_range(before) else cur.last()
        if found:
            yield from cur.iterprev()  # type: ignore[misc]

    def drop_table(self, table: str) -> None:
        """Deletes a whole table (offline_write only: tests that make a ledger look like
        one written before the table existed)."""
        self._txn.drop(self._dbs[table], delete=True)

    def count(self, table: str) -> int:
        return self._txn.stat(self._dbs[table])["entries"]


class _OlderTx(LmdbTx):
    """A read transaction of a ledger written before some tables existed (a read-only
    snapshot's ``None`` handles): those tables read as empty. Kept apart from
    :class:`LmdbTx`, so the writer's and the workers' reads pay no check for it."""

    def get(self, table: str, key: bytes) -> bytes | None:
        return None if self._dbs[table] is None else super().get(table, key)

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        return iter(()) if self._dbs[table] is None else super().scan(table, start)

    def scan_back(self, table: str, before: bytes | None = None
                  ) -> Iterator[tuple[bytes, bytes]]:
        return iter(()) if self._dbs[table] is None else super().scan_back(table, before)

    def count(self, table: str) -> int:
        return 0 if self._dbs[table] is None else super().count(table)


class LedgerCorrupt(Exception):
    """The ledger's files cannot be served: not LMDB, damaged, or shorter than their pages."""


def _open(path: Path, *, readonly: bool, durable: bool = True, map_size_bytes: int = 0,
          max_readers: int = 1024) -> tuple[lmdb.Environment, dict[str, Any]]:
    # Options passed explicitly, not by default: sync/metasync make each
    # commit durable; writemap stays off so a stray pointer cannot corrupt
    # the file; readahead off suits a random-access working set.
    opts: dict[str, Any] = {"max_dbs": _MAX_DBS, "max_readers": max_readers, "lock": True,
                            "subdir": True, "readahead": False}
    try:
        if readonly:
            env = lmdb.open(str(path), readonly=True, **opts)
        else:
            env = lmdb.open(str(path), map_size=map_size_bytes, sync=durable,
                            metasync=durable, writemap=False, **opts)
    except lmdb.Error as exc:  # not LMDB, damaged, another version, unreadable
        raise LedgerCorrupt(f"the ledger in {path} cannot be opened: {exc}") from None
    _check_size(env, path)
    # Opened outside any transaction of ours: py-lmdb then commits the
    # handle's own read transaction, which keeps the handles valid afterwards.
    try:
        dbs = {name: _open_table(env, name, readonly) for name in keys.TABLES}
    except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
        env.close()
        raise LedgerCorrupt(f"the ledger in {path} is damaged: {exc}") from None
    return env, dbs


def _open_table(env: lmdb.Environment, name: str, readonly: bool) -> Any:
    """A table's handle; None for one a read-only open does not find: a ledger written by
    a version from before that table existed (its first writable open creates it), read
    as empty, so ``hongbao reconcile`` still reads a stopped older ledger."""
    try:
        return env.open_db(name.encode(), create=not readonly)
    except lmdb.NotFoundError:
        if not readonly:
            raise
        return None


def _check_size(env: lmdb.Environment, path: Path) -> None:
    """A data file shorter than the pages its meta page says are in use was truncated
    (a copy cut short, a full disk during a restore): serving it would read past its end."""
    data = path / "data.mdb"
    if not data.exists():
        return
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data.stat().st_size
    if size < need:
        env.close()
        raise LedgerCorrupt(f"the ledger in {path} is truncated: data.mdb holds {size} bytes, "
                            f"its pages need {need}")


def check_ledger(data_dir: str | os.PathLike) -> None:
    """Raises LedgerCorrupt if ``data_dir`` holds a ledger that cannot be served (a fresh
    directory passes): what ``hongbao serve`` runs before it starts a worker."""
    path = Path(data_dir) / "ledger"
    data = path / "data.mdb"
    if data.exists():
        # Zero bytes is a ledger cut to nothing, not a fresh one (a fresh one has no file):
        # LMDB would quietly start it over, empty.
        if data.stat().st_size == 0:
            raise LedgerCorrupt(f"the ledger in {path} is truncated: data.mdb is empty")
        try:
            env, _dbs = _open(path, readonly=True)
        except lmdb.NotFoundError:
            return  # a ledger another process is creating: its tables are not committed yet
        env.close()


class _LmdbReads:
    """Consistent reads of an open environment: one short read transaction per query."""

    env: lmdb.Environment
    dbs: dict[str, Any]
    _tx: type[LmdbTx] = LmdbTx

    def read(self, query: Callable[..., T], *args: Any) -> T:
        try:
            with self.env.begin() as txn:
                return query(self._tx(txn, self.dbs), *args)
        except lmdb.MapResizedError:
            # Another process grew the map past this one's: adopt the new size (LMDB's
            # set_mapsize(0)) and read again. Like the writer's own growth, this relies on
            # this process's transactions being short.
            self.env.set_mapsize(0)
            with self.env.begin() as txn:
                return query(self._tx(txn, self.dbs), *args)


class LmdbLedger(_LmdbReads, BooksLedger):
    """The ledger in ``data_dir/ledger``, written through one group-commit writer."""

    def __init__(self, data_dir: str | os.PathLike, *, durable: bool = True,
                 map_size_bytes: int = 1 << 30, max_readers: int = 1024,
                 max_batch: int = 2048, max_wait_s: float = 0.0,
                 queue_limit: int = 100_000,
                 clock_ms: Callable[[], int] | None = None) -> None:
        """``clock_ms`` (default: wall time) is the rules' notion of now, as in MemoryLedger."""
        path = Path(data_dir) / "ledger"
        path.mkdir(parents=True, exist_ok=True)
        self.env, self.dbs = _open(path, readonly=False, durable=durable,
                                   map_size_bytes=map_size_bytes, max_readers=max_readers)
        stale = self.env.reader_check()
        if stale:
            log.warning("lmdb_stale_readers_cleared", count=stale)
        if not durable:
            log.warning("durability_relaxed",
                        detail="commits are not fsynced: a power loss can lose "
                               "acknowledged writes (a process crash cannot)")
        self.durable = durable
        dbs = self.dbs
        self._writer = GroupCommitWriter(
            self.env, lambda txn, now_ms: Books(LmdbTx(txn, dbs), now_ms, self._away),
            max_batch=max_batch, max_wait_s=max_wait_s, queue_limit=queue_limit,
            clock_ms=clock_ms)
        self._clock_ms = self._writer._clock_ms

    async def write(self, rule: Callable[..., T], *args: Any) -> T:
        return await self._writer.submit(rule, *args)

    def _writer_stats(self) -> tuple[int, int, int, int, float, float, float, float]:
        w = self._writer
        return (w.depth, w.batches, w.requests, w.batch_size_max, w.apply_s_total,
                w.commit_s_total, w.queue_wait_s_total, w.cpu_s_total)

    def _now_ms(self) -> int:
        return self._clock_ms()

    @property
    def map_size_bytes(self) -> int:
        return self.env.info()["map_size"]

    def close(self) -> None:
        self._writer.close()
        self.env.close()


@contextlib.contextmanager
def offline_write(data_dir: str | os.PathLike) -> Iterator[LmdbTx]:
    """One write transaction on the ledger of a *stopped* gateway, committed on success.

    For repair tools and for the tests that plant damage in a copy of real books to
    prove reconcile finds it. It bypasses the money rules entirely: nothing in the
    gateway itself uses it, and it must never run beside a live worker.
    """
    path = Path(data_dir) / "ledger"
    if not (path / "data.mdb").exists():
        raise FileNotFoundError(f"no ledger in {data_dir}")
    env, dbs = _open(path, readonly=False, map_size_bytes=0)
    try:
        with env.begin(write=True) as txn:
            yield LmdbTx(txn, dbs)
    finally:
        env.close()


class LmdbSnapshot(_LmdbReads):
    """A read-only view of a ledger directory, for reconcile beside a live gateway."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        path = Path(data_dir) / "ledger"
        if not (path / "data.mdb").exists():
            raise FileNotFoundError(f"no ledger in {data_dir}")
        self.env, self.dbs = _open(path, readonly=True)
        if None in self.dbs.values():
            self._tx = _OlderTx

    def close(self) -> None:
        self.env.close()
