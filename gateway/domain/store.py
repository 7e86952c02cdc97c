"""The storage protocol the money rules run on, and the books kept over it.

A backend provides :class:`Tx`: get, put, delete and scan of bytes in named
tables (``gateway.domain.keys.TABLES``), all inside one transaction. That is
all it provides; what the bytes mean is decided here and in ``rules``.

:class:`Books` is one write transaction as the money rules see it: accounts
and envelopes touched by several requests of a group commit are read once and
written once (:meth:`Books.flush`), every movement is a double-entry transfer
with a unique id, and the feeds (wallet entries, notifications, the credit
outbox) share one growing sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import hotpath
from gateway.domain import keys, records
from gateway.domain.model import NOTICE_TEXT, NoticeKind, RemoteCredit

_be64 = keys.be64


class Tx(Protocol):
    """One transaction of a backend. Writes are only allowed in a write transaction.

    Implementations MUST keep keys of a table in byte order, make every write of
    a write transaction visible to later reads of the same transaction, and
    commit all of a write transaction or none of it.
    """

    def get(self, table: str, key: bytes) -> bytes | None:
        """The value under ``key``, or None."""

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True,
            append: bool = False) -> bool:
        """Stores ``value``; with ``overwrite=False`` refuses (returns False) an existing key.

        ``append`` promises the key sorts after every key of the table (a
        backend may use it to write faster); it is a hint, not a check.
        """

    def delete(self, table: str, key: bytes) -> bool:
        """Removes ``key``; False if it was not there."""

    def scan(self, table: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs from the first key >= ``start``, ascending.

        The caller stops when it has seen enough; it may not write to the same
        table while iterating.
        """

    def scan_back(self, table: str, before: bytes | None = None
                  ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs below ``before`` (or from the last key), descending."""

    def count(self, table: str) -> int:
        """How many keys the table holds."""


def scan_prefix(tx: Tx, table: str, prefix: bytes, start: bytes | None = None
                ) -> Iterator[tuple[bytes, bytes]]:
    """The pairs whose key starts with ``prefix`` (from ``start`` if given), ascending."""
    for key, value in tx.scan(table, prefix if start is None else start):
        if not key.startswith(prefix):
            return
        yield key, value


class Books:
    """The state of one write transaction, as the money rules use it."""

    __slots__ = ("accounts", "away", "best_luck", "envelopes", "now_ms", "seq", "seq0", "tx")

    def __init__(self, tx: Tx, now_ms: int,
                 away: Callable[[bytes], bytes | None] | None = None) -> None:
        self.tx = tx
        self.now_ms = now_ms
        # Cluster mode: the SET a user's wallet lives on when it is not this one, else None.
        self.away = away
        self.accounts: dict[bytes, int] = {}  # write-back cache
        self.envelopes: dict[bytes, bytes] = {}  # write-back cache
        self.best_luck: list[bytes] = []  # envelopes sold out in this transaction
        self.seq = -1
        self.seq0 = -1

    def account(self, acct: bytes) -> int:
        bal = self.accounts.get(acct)
        if bal is None:
            raw = self.tx.get(keys.ACCOUNTS, acct)
            bal = 0 if raw is None else hotpath.unpack_i64(raw)
        return bal

    def envelope(self, env: bytes) -> bytes | None:
        buf = self.envelopes.get(env)
        if buf is None:
            buf = self.tx.get(keys.ENVELOPES, env)
        return buf

    def next_seq(self) -> int:
        if self.seq < 0:
            raw = self.tx.get(keys.META, keys.SEQ)
            self.seq = self.seq0 = 0 if raw is None else hotpath.unpack_i64(raw)
        self.seq += 1
        return self.seq

    def seq_past(self, seq: int) -> None:
        """Takes the sequence past ``seq`` (entries imported with their own numbers)."""
        if self.seq < 0:
            self.next_seq()
            self.seq -= 1
        self.seq = max(self.seq, seq)

    def drop_envelope(self, env: bytes) -> bytes | None:
        """The envelope as this transaction has it, taken out of the write-back cache (its
        best luck named first if it sold out here), so flush writes nothing for it: the
        caller deletes or replaces it."""
        if env in self.best_luck:
            self.best_luck = [e for e in self.best_luck if e != env]
            buf = self.envelopes.pop(env, None)
            if buf is not None:
                self.tx.put(keys.ENVELOPES, env, buf)
            self._name_best_luck(env)
        return self.envelopes.pop(env, None) or self.tx.get(keys.ENVELOPES, env)

    def move(self, tid: bytes, debit: bytes, credit: bytes, amount: int, kind: int,
             ref: bytes) -> None:
        """One double-entry transfer. Callers have checked funds: a shortfall is a bug."""
        assert amount > 0, amount
        debit_bal = self.account(debit) - amount
        assert debit_bal >= 0 or keys.may_go_negative(debit), (debit, debit_bal)
        credit_bal = hotpath.add_fen(self.account(credit), amount)
        record = hotpath.pack_transfer(amount, self.now_ms, kind, debit, credit, ref)
        fresh = self.tx.put(keys.TRANSFERS, tid, record, overwrite=False)
        assert fresh, f"transfer {tid!r} applied twice"
        self.accounts[debit] = debit_bal
        self.accounts[credit] = credit_bal

    def wallet_entry(self, user: bytes, kind: int, signed_fen: int, tid: bytes,
                     ref: bytes) -> None:
        self.tx.put(keys.WALLET_TX, keys.user_seq_key(user, self.next_seq()),
                    records.pack_wallet_entry(kind, signed_fen, self.now_ms, tid, ref))

    def notify(self, user: bytes, kind: NoticeKind, amount_fen: int, *, payment_id: str = "",
               envelope_id: str = "", message: str = "") -> None:
        """Appends an event to the user's feed (its id: the sequence number)."""
        text = message or NOTICE_TEXT[kind]
        self.tx.put(keys.NOTIFICATIONS, keys.user_seq_key(user, self.next_seq()),
                    records.pack_notice(kind, amount_fen, self.now_ms, payment_id,
                                        envelope_id, text))

    def publish_credit(self, gkey: bytes) -> None:
        """Queues a grab for crediting; sequence numbers only grow, so it goes at the end."""
        self.tx.put(keys.CREDIT_OUTBOX, _be64(self.next_seq()), gkey, append=True)

    def publish_remote_credit(self, credit: RemoteCredit) -> None:
        """Queues a credit for the relay to another SET (cluster mode)."""
        self.tx.put(keys.XCREDIT_OUTBOX, _be64(self.next_seq()), records.pack_xcredit(credit),
                    append=True)

    def flush(self) -> None:
        """Writes the cached accounts and envelopes back; names best luck of sold-out ones."""
        for acct, bal in self.accounts.items():
            self.tx.put(keys.ACCOUNTS, acct, hotpath.pack_i64(bal))
        for env, buf in self.envelopes.items():
            self.tx.put(keys.ENVELOPES, env, buf)
        for env in self.best_luck:
            self._name_best_luck(env)
        if self.seq != self.seq0:
            self.tx.put(keys.META, keys.SEQ, hotpath.pack_i64(self.seq))

    def _name_best_luck(self, env: bytes) -> None:
        """The sold-out envelope's best luck: the largest share, earliest on ties."""
        best = None
        prefix = keys.grabs_prefix(env)
        for key, raw in scan_prefix(self.tx, keys.GRABS, prefix):
            amount, _at, index, _flags, _digest = hotpath.unpack_grab(raw)
            rank = (amount, -index)
            if best is None or rank > best[0]:
                best = (rank, key[len(prefix):])
        assert best is not None, env
        meta = self.tx.get(keys.ENV_META, env)
        assert meta is not None, env
        self.tx.put(keys.ENV_META, env, records.with_best_luck(meta, best[1].decode()))

