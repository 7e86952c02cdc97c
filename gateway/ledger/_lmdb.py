"""The LMDB ledger: an embedded, durable implementation of :class:`Ledger`.

Layout (named databases; keys are bytes, numbers little-endian fixed width
unless said otherwise, packed by ``hotpath``):

==============  ===========================================  =====================
database        key                                          value
==============  ===========================================  =====================
accounts        ``w:`` wallet / ``p:`` pending credit /      int64 balance
                ``e:`` envelope escrow / ``c:`` bank clearing
transfers       transfer id (unique, never overwritten)      amount, time, kind,
                                                             debit, credit, ref
envelopes       envelope id                                  header + pre-split shares
env_meta        envelope id                                  JSON: sender, greeting,
                                                             best luck, payment
grabs           envelope id ``/`` user id                    amount, time, share
                                                             index, flags, digest
idem            ``send\\0`` user ``\\0`` request id            fingerprint + result
payments        payment id                                   JSON payment intent
wallet_tx       user ``\\0`` big-endian seq                   kind, amount, time, ids
bus:credit      big-endian seq                               grab key (outbox)
expiry          big-endian expiry ms + envelope id           empty
resolve         big-endian due ms + payment id               empty (resolver's queue)
notifications   user ``\\0`` big-endian seq                  kind, amount, time, ids,
                                                             message
meta            name                                         counters
==============  ===========================================  =====================

Every write goes through the process's one :class:`GroupCommitWriter`; the
operations below (``_op_*``) run on its thread inside a shared transaction,
check everything first and only then write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from pathlib import Path

import lmdb
import structlog

import hotpath
from gateway import errors
from gateway.ledger._contract import (
    ENV_ACTIVE,
    ENV_EXPIRED,
    ENV_FAILED,
    ENV_PAY_UNKNOWN,
    ENV_PAYING,
    ENV_REFUNDED,
    ENV_SOLD_OUT,
    CardEnvelope,
    EnvelopeView,
    GrabOutcome,
    GrabResult,
    GrabView,
    Ledger,
    Notice,
    Payment,
    PaymentStatus,
    SendResult,
    TxKind,
    WalletEntry,
    new_envelope_id,
)
from gateway.ledger._writer import GroupCommitWriter

log = structlog.get_logger(__name__)

_DBS = (
    "accounts", "transfers", "envelopes", "env_meta", "grabs", "idem", "payments",
    "wallet_tx", "bus:credit", "expiry", "meta", "notifications", "resolve",
)
_SEQ = b"seq"
_BE64 = struct.Struct(">Q")
_WTX = struct.Struct("<Bqq")  # kind, signed amount, created_at_ms
_NOTE = struct.Struct("<Bqq")  # kind, amount_fen, created_at_ms
_CREDITED = 1
PAY_BALANCE = 2  # hongbao.v1.PayMethod numbers
# hongbao.v1.NotificationKind numbers.
NOTE_SUCCEEDED, NOTE_UNKNOWN, NOTE_LOCKED, NOTE_REFUNDED, NOTE_EXPIRED_REFUND, NOTE_CREDITED = (
    1, 2, 3, 4, 5, 6)
PAY_CARD = 3


def wallet_account(user: bytes) -> bytes:
    return b"w:" + user


def pending_account(user: bytes) -> bytes:
    return b"p:" + user


def escrow_account(env: bytes) -> bytes:
    return b"e:" + env


def clearing_account(bank: bytes) -> bytes:
    return b"c:" + bank


def hold_account(payment: bytes) -> bytes:
    """Money of a withdrawal in flight: out of the wallet, not yet at the bank."""
    return b"h:" + payment


def payment_id_for(user_id: str, kind: str, request_id: str) -> str:
    """Deterministic, so a retry after a crash reuses the bank order id (the bank dedups it)."""
    digest = hashlib.blake2b(f"{kind}\0{user_id}\0{request_id}".encode(), digest_size=10)
    return "pay_" + digest.hexdigest()


def request_digest(request_id: str) -> bytes:
    return hashlib.blake2b(request_id.encode(), digest_size=16).digest()


class _Batch:
    """The state of one group commit: the transaction plus write-back caches.

    Accounts and envelopes touched by several requests of a batch are read
    once and written once, at :meth:`flush`.
    """

    __slots__ = ("accounts", "accounts_db", "best_luck", "dbs", "envelopes", "now_ms", "seq",
                 "seq0", "transfers_db", "txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict, now_ms: int) -> None:
        self.txn = txn
        self.dbs = dbs
        self.accounts_db = dbs["accounts"]
        self.transfers_db = dbs["transfers"]
        self.now_ms = now_ms
        self.accounts: dict[bytes, int] = {}
        self.envelopes: dict[bytes, bytes] = {}
        self.best_luck: list[bytes] = []
        self.seq = -1
        self.seq0 = -1

    def account(self, acct: bytes) -> int:
        bal = self.accounts.get(acct)
        if bal is None:
            raw = self.txn.get(acct, db=self.accounts_db)
            bal = 0 if raw is None else hotpath.unpack_i64(raw)
        return bal

    def envelope(self, env: bytes) -> bytes | None:
        buf = self.envelopes.get(env)
        if buf is None:
            buf = self.txn.get(env, db=self.dbs["envelopes"])
        return buf

    def next_seq(self) -> int:
        if self.seq < 0:
            raw = self.txn.get(_SEQ, db=self.dbs["meta"])
            self.seq = self.seq0 = 0 if raw is None else hotpath.unpack_i64(raw)
        self.seq += 1
        return self.seq

    def move(self, tid: bytes, debit: bytes, credit: bytes, amount: int, kind: int,
             ref: bytes) -> None:
        """One double-entry transfer. Callers have checked funds: a shortfall is a bug."""
        assert amount > 0, amount
        debit_bal = self.account(debit) - amount
        assert debit_bal >= 0 or debit.startswith(b"c:"), (debit, debit_bal)
        credit_bal = hotpath.add_fen(self.account(credit), amount)
        record = hotpath.pack_transfer(amount, self.now_ms, kind, debit, credit, ref)
        fresh = self.txn.put(tid, record, db=self.transfers_db, overwrite=False)
        assert fresh, f"transfer {tid!r} applied twice"
        self.accounts[debit] = debit_bal
        self.accounts[credit] = credit_bal

    def wallet_entry(self, user: bytes, kind: int, signed_fen: int, tid: bytes,
                     ref: bytes) -> None:
        key = user + b"\0" + _BE64.pack(self.next_seq())
        value = _WTX.pack(kind, signed_fen, self.now_ms) + bytes([len(tid)]) + tid + ref
        self.txn.put(key, value, db=self.dbs["wallet_tx"])

    def notify(self, user: bytes, kind: int, amount_fen: int, payment_id: str = "",
               envelope_id: str = "", message: str = "") -> None:
        """Appends an event to the user's notification feed (its id: the sequence number)."""
        key = user + b"\0" + _BE64.pack(self.next_seq())
        parts = [p.encode() for p in (payment_id, envelope_id, message)]
        value = _NOTE.pack(kind, amount_fen, self.now_ms) + b"\0".join(parts)
        self.txn.put(key, value, db=self.dbs["notifications"])

    def publish(self, topic: str, payload: bytes) -> None:
        # Sequence numbers only grow, so each message goes at the end (MDB_APPEND).
        self.txn.put(_BE64.pack(self.next_seq()), payload, db=self.dbs["bus:" + topic],
                     append=True)

    def flush(self) -> None:
        accounts_db = self.dbs["accounts"]
        for acct, bal in self.accounts.items():
            self.txn.put(acct, hotpath.pack_i64(bal), db=accounts_db)
        envelopes_db = self.dbs["envelopes"]
        for env, buf in self.envelopes.items():
            self.txn.put(env, buf, db=envelopes_db)
        for env in self.best_luck:
            _name_best_luck(self, env)
        if self.seq != self.seq0:
            self.txn.put(_SEQ, hotpath.pack_i64(self.seq), db=self.dbs["meta"])


def _name_best_luck(b: _Batch, env: bytes) -> None:
    """Names the sold-out envelope's best luck: the largest share, earliest on ties."""
    best = None
    prefix = env + b"/"
    cur = b.txn.cursor(db=b.dbs["grabs"])
    if cur.set_range(prefix):
        for key, raw in cur:
            if not key.startswith(prefix):
                break
            amount, _at, index, _flags, _digest = hotpath.unpack_grab(raw)
            rank = (amount, -index)
            if best is None or rank > best[0]:
                best = (rank, key[len(prefix):])
    assert best is not None, env
    meta_db = b.dbs["env_meta"]
    meta = json.loads(b.txn.get(env, db=meta_db))
    meta["b"] = best[1].decode()
    b.txn.put(env, json.dumps(meta, separators=(",", ":")).encode(), db=meta_db)


# -- operations (run on the writer thread) ------------------------------------

def _op_send(b: _Batch, user: bytes, rid: bytes, fingerprint: bytes, env_id: bytes,
             total_fen: int, count: int, kind: int, greeting: str, expires_in_s: int,
             shares: list[int]) -> SendResult:
    idem_key = b"send\0" + user + b"\0" + rid
    raw = b.txn.get(idem_key, db=b.dbs["idem"])
    if raw is not None:
        if raw[:16] != fingerprint:
            raise errors.InvalidArgument(
                "REQUEST_ID_REUSED", "request_id was used before with another payload")
        saved = _decode_send(raw[16:])
        live = hotpath.envelope_header(b.envelope(saved.envelope_id.encode()))[7]
        return dataclasses.replace(saved, status=live)
    wallet = wallet_account(user)
    if not hotpath.debit_ok(b.account(wallet), total_fen):
        raise errors.FailedPrecondition(
            "INSUFFICIENT_BALANCE", "the wallet does not cover the envelope",
            balance_fen=str(b.account(wallet)), needed_fen=str(total_fen))
    assert sum(shares) == total_fen and len(shares) == count
    expires_at_ms = b.now_ms + expires_in_s * 1000
    b.envelopes[env_id] = hotpath.pack_envelope(
        total_fen, total_fen, b.now_ms, expires_at_ms, count, 0, kind, ENV_ACTIVE, 0, shares)
    meta = {"s": user.decode(), "g": greeting, "b": "", "p": "", "v": PAY_BALANCE}
    b.txn.put(env_id, json.dumps(meta, separators=(",", ":")).encode(), db=b.dbs["env_meta"])
    tid = b"s:" + env_id
    b.move(tid, wallet, escrow_account(env_id), total_fen, TxKind.ENVELOPE_SENT, env_id)
    b.wallet_entry(user, TxKind.ENVELOPE_SENT, -total_fen, tid, env_id)
    b.txn.put(_BE64.pack(expires_at_ms) + env_id, b"", db=b.dbs["expiry"])
    result = SendResult(env_id.decode(), ENV_ACTIVE, PAY_BALANCE, "")
    b.txn.put(idem_key, fingerprint + _encode_send(result), db=b.dbs["idem"])
    return result


def _encode_send(r: SendResult) -> bytes:
    return json.dumps([r.envelope_id, r.status, r.paid_via, r.payment_id]).encode()


def _decode_send(raw: bytes) -> SendResult:
    env_id, status, paid_via, payment_id = json.loads(raw)
    return SendResult(env_id, status, paid_via, payment_id)


def _replay_grab(b: _Batch, env: bytes, raw: bytes, digest: bytes) -> GrabResult:
    amount, _at, _index, flags, stored = hotpath.unpack_grab(raw)
    header = hotpath.envelope_header(b.envelope(env))
    remaining = header[4] - header[5]
    if stored != digest:
        return GrabResult(GrabOutcome.ALREADY_GRABBED, 0, remaining)
    return GrabResult(GrabOutcome.GRABBED, amount, remaining, bool(flags & _CREDITED))


def _op_grab(b: _Batch, env: bytes, user: bytes, digest: bytes) -> GrabResult:
    gkey = env + b"/" + user
    txn = b.txn
    grabs_db = b.dbs["grabs"]
    buf = b.envelopes.get(env) or txn.get(env, db=b.dbs["envelopes"])
    if buf is None:
        raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
    _total, _rem, _created, expires_at_ms, count, claimed, _kind, status, _f = (
        hotpath.envelope_header(buf))
    if status not in (ENV_ACTIVE, ENV_SOLD_OUT, ENV_EXPIRED):
        raise errors.FailedPrecondition(
            "ENVELOPE_NOT_PAID", "the envelope's payment has not gone through")
    if status == ENV_EXPIRED or b.now_ms >= expires_at_ms or claimed >= count:
        raw = txn.get(gkey, db=grabs_db)
        if raw is not None:
            return _replay_grab(b, env, raw, digest)
        if claimed >= count:
            return GrabResult(GrabOutcome.SOLD_OUT, 0, 0)
        return GrabResult(GrabOutcome.EXPIRED, 0, count - claimed)
    new_buf, index, amount = hotpath.claim_share(buf, ENV_SOLD_OUT)
    # The insert doubles as the one-share-per-user check: it refuses an existing key.
    if not txn.put(gkey, hotpath.pack_grab(amount, b.now_ms, index, 0, digest), db=grabs_db,
                   overwrite=False):
        return _replay_grab(b, env, txn.get(gkey, db=grabs_db), digest)
    b.envelopes[env] = new_buf
    b.move(b"g:" + env + b":" + str(index).encode(), b"e:" + env, b"p:" + user, amount,
           TxKind.GRAB, gkey)
    b.publish("credit", gkey)
    if index + 1 == count:
        b.best_luck.append(env)
    return GrabResult(GrabOutcome.GRABBED, amount, count - index - 1, False)


def _op_grab_many(b: _Batch, items: list[tuple[bytes, bytes, bytes]]) -> list:
    """Several grabs in one request (BatchGrab): each answers on its own."""
    out = []
    for env, user, digest in items:
        try:
            out.append(_op_grab(b, env, user, digest))
        except errors.GatewayError as err:
            out.append(err)
    return out


def _op_apply_credits(b: _Batch, limit: int) -> int:
    """Moves pending credits into wallets, exactly once per grab (idempotent by grab id)."""
    bus = b.dbs["bus:credit"]
    grabs_db = b.dbs["grabs"]
    taken: list[tuple[bytes, bytes]] = []
    cur = b.txn.cursor(db=bus)
    for key, gkey in cur:
        taken.append((key, gkey))
        if len(taken) >= limit:
            break
    applied = 0
    for key, gkey in taken:
        b.txn.delete(key, db=bus)
        raw = b.txn.get(gkey, db=grabs_db)
        assert raw is not None, gkey
        amount, at_ms, index, flags, digest = hotpath.unpack_grab(raw)
        if flags & _CREDITED:
            continue  # delivered twice: already applied
        env, user = gkey.split(b"/", 1)
        tid = b"c:" + env + b":" + str(index).encode()
        b.move(tid, pending_account(user), wallet_account(user), amount,
               TxKind.ENVELOPE_CREDIT, gkey)
        b.wallet_entry(user, TxKind.ENVELOPE_CREDIT, amount, tid, env)
        b.notify(user, NOTE_CREDITED, amount, envelope_id=env.decode(),
                 message="a red envelope share reached your wallet")
        b.txn.put(gkey, hotpath.pack_grab(amount, at_ms, index, flags | _CREDITED, digest),
                  db=grabs_db)
        applied += 1
    return applied


def _op_expire_due(b: _Batch, limit: int) -> int:
    """Returns unclaimed escrow of envelopes past their expiry to the sender, exactly once."""
    expiry_db = b.dbs["expiry"]
    due: list[bytes] = []
    cur = b.txn.cursor(db=expiry_db)
    for key in cur.iternext(keys=True, values=False):
        if _BE64.unpack(key[:8])[0] > b.now_ms or len(due) >= limit:
            break
        due.append(key)
    refunded = 0
    for key in due:
        b.txn.delete(key, db=expiry_db)
        env = key[8:]
        buf = b.envelope(env)
        (total, remaining_fen, created, expires, count, claimed, kind, status, flags,
         shares) = hotpath.unpack_envelope(buf)
        if status != ENV_ACTIVE:
            continue  # sold out (nothing left) or already expired
        unclaimed = sum(shares[claimed:])
        b.envelopes[env] = hotpath.pack_envelope(
            total, remaining_fen, created, expires, count, claimed, kind, ENV_EXPIRED, flags,
            shares)
        if unclaimed == 0:
            continue
        sender = json.loads(b.txn.get(env, db=b.dbs["env_meta"]))["s"].encode()
        tid = b"x:" + env
        b.move(tid, escrow_account(env), wallet_account(sender), unclaimed,
               TxKind.EXPIRY_REFUND, env)
        b.wallet_entry(sender, TxKind.EXPIRY_REFUND, unclaimed, tid, env)
        b.notify(sender, NOTE_EXPIRED_REFUND, unclaimed, envelope_id=env.decode(),
                 message=f"{count - claimed} unclaimed shares came back to your wallet")
        refunded += 1
    return refunded


def _encode_payment(p: Payment, fingerprint: bytes, due_ms: int = 0) -> bytes:
    return json.dumps({
        "id": p.payment_id, "u": p.user_id, "k": p.kind, "c": p.card_id, "bk": p.bank_id,
        "a": p.amount_fen, "s": int(p.status), "r": p.reason, "t0": p.created_at_ms,
        "t1": p.updated_at_ms, "fp": fingerprint.hex(), "e": p.envelope_id, "due": due_ms,
        "n": p.attempts,
    }, separators=(",", ":")).encode()


def _decode_payment(raw: bytes) -> tuple[Payment, bytes, int]:
    d = json.loads(raw)
    p = Payment(d["id"], d["u"], d["k"], d["c"], d["bk"], d["a"], PaymentStatus(d["s"]),
                d["r"], d["t0"], d["t1"], d.get("e", ""), d.get("n", 0))
    return p, bytes.fromhex(d["fp"]), d.get("due", 0)


def _load_payment(b: _Batch, payment_id: str) -> tuple[Payment, bytes, int]:
    raw = b.txn.get(payment_id.encode(), db=b.dbs["payments"])
    if raw is None:
        raise errors.NotFound("PAYMENT_NOT_FOUND", "no such payment")
    return _decode_payment(raw)


def _save_payment(b: _Batch, p: Payment, fp: bytes, old_due_ms: int, due_ms: int) -> None:
    """Writes the payment and keeps its entry in the resolver's due index in step."""
    pid = p.payment_id.encode()
    resolve_db = b.dbs["resolve"]
    if old_due_ms:
        b.txn.delete(_BE64.pack(old_due_ms) + pid, db=resolve_db)
    if due_ms:
        b.txn.put(_BE64.pack(due_ms) + pid, b"", db=resolve_db)
    b.txn.put(pid, _encode_payment(p, fp, due_ms), db=b.dbs["payments"])


def _set_envelope_status(b: _Batch, env: bytes, status: int) -> None:
    (total, remaining_fen, created, expires, count, claimed, kind, _old, flags,
     shares) = hotpath.unpack_envelope(b.envelope(env))
    b.envelopes[env] = hotpath.pack_envelope(total, remaining_fen, created, expires, count,
                                             claimed, kind, status, flags, shares)


def _op_begin_payment(b: _Batch, payment: Payment, fingerprint: bytes, due_in_ms: int,
                      envelope: CardEnvelope | None) -> tuple[Payment, bool]:
    """Saves a payment intent before the bank is called (or returns the saved one).

    A withdrawal holds its amount at once (wallet -> ``h:<payment>``), so the
    wallet cannot spend it twice while the bank works. A card-paid envelope is
    created PAYING (not grabbable) with its shares already split.
    """
    key = payment.payment_id.encode()
    raw = b.txn.get(key, db=b.dbs["payments"])
    if raw is not None:
        saved, saved_fp, _due = _decode_payment(raw)
        if saved_fp != fingerprint:
            raise errors.InvalidArgument(
                "REQUEST_ID_REUSED", "request_id was used before with another payload")
        return saved, False
    user = payment.user_id.encode()
    if payment.kind == "withdraw":
        if not hotpath.debit_ok(b.account(wallet_account(user)), payment.amount_fen):
            raise errors.FailedPrecondition(
                "INSUFFICIENT_BALANCE", "the wallet does not cover the withdrawal",
                balance_fen=str(b.account(wallet_account(user))))
        tid = b"w:" + key
        b.move(tid, wallet_account(user), hold_account(key), payment.amount_fen,
               TxKind.WITHDRAW, key)
        b.wallet_entry(user, TxKind.WITHDRAW, -payment.amount_fen, tid, key)
    if envelope is not None:
        e = envelope
        env_id = e.envelope_id.encode()
        expires_at_ms = b.now_ms + e.expires_in_s * 1000
        b.envelopes[env_id] = hotpath.pack_envelope(
            payment.amount_fen, payment.amount_fen, b.now_ms, expires_at_ms, e.count, 0, e.kind,
            ENV_PAYING, 0, e.shares)
        meta = {"s": user.decode(), "g": e.greeting, "b": "", "p": payment.payment_id,
                "v": PAY_CARD}
        b.txn.put(env_id, json.dumps(meta, separators=(",", ":")).encode(),
                  db=b.dbs["env_meta"])
        result = SendResult(e.envelope_id, ENV_PAYING, PAY_CARD, payment.payment_id)
        b.txn.put(b"send\0" + user + b"\0" + e.request_id.encode(),
                  e.send_fingerprint + _encode_send(result), db=b.dbs["idem"])
    payment = dataclasses.replace(payment, created_at_ms=b.now_ms, updated_at_ms=b.now_ms)
    _save_payment(b, payment, fingerprint, 0, b.now_ms + due_in_ms)
    return payment, True


def _op_finish_payment(b: _Batch, payment_id: str, outcome: PaymentStatus, reason: str,
                       from_states: tuple[PaymentStatus, ...]) -> Payment:
    """Takes a payment to a final state, with its money, exactly once.

    Only from ``from_states``: the request handler finishes PENDING payments,
    the resolver UNKNOWN ones; whichever comes second sees the other's result.
    """
    p, fp, due = _load_payment(b, payment_id)
    if p.status not in from_states:
        return p
    pid = payment_id.encode()
    user = p.user_id.encode()
    clearing = clearing_account(p.bank_id.encode())
    env = p.envelope_id.encode()
    note = None
    if outcome == PaymentStatus.SUCCEEDED:
        if p.kind == "top_up":
            tid = b"t:" + pid
            b.move(tid, clearing, wallet_account(user), p.amount_fen, TxKind.TOP_UP, pid)
            b.wallet_entry(user, TxKind.TOP_UP, p.amount_fen, tid, pid)
        elif p.kind == "envelope":
            b.move(b"t:" + pid, clearing, escrow_account(env), p.amount_fen,
                   TxKind.ENVELOPE_SENT, env)
            _set_envelope_status(b, env, ENV_ACTIVE)
            expires_at_ms = hotpath.envelope_header(b.envelope(env))[3]
            b.txn.put(_BE64.pack(expires_at_ms) + env, b"", db=b.dbs["expiry"])
        else:
            b.move(b"o:" + pid, hold_account(pid), clearing, p.amount_fen, TxKind.WITHDRAW, pid)
        note = (NOTE_SUCCEEDED, "the payment went through")
    else:
        assert outcome in (PaymentStatus.FAILED, PaymentStatus.REFUNDED), outcome
        if p.kind == "withdraw":
            tid = b"r:" + pid
            b.move(tid, hold_account(pid), wallet_account(user), p.amount_fen,
                   TxKind.WITHDRAW_REVERSAL, pid)
            b.wallet_entry(user, TxKind.WITHDRAW_REVERSAL, p.amount_fen, tid, pid)
        if p.kind == "envelope":
            _set_envelope_status(b, env, ENV_REFUNDED if outcome == PaymentStatus.REFUNDED
                                 else ENV_FAILED)
        if outcome == PaymentStatus.REFUNDED:
            note = (NOTE_REFUNDED, "the bank took the money and has returned it to your card")
        elif reason == "LOCKED":
            note = (NOTE_LOCKED, "the bank order is locked: it can never be charged")
    done = dataclasses.replace(p, status=outcome, reason=reason, updated_at_ms=b.now_ms)
    _save_payment(b, done, fp, due, 0)
    if note is not None:
        b.notify(user, note[0], p.amount_fen, payment_id=payment_id,
                 envelope_id=p.envelope_id, message=note[1])
    return done


def _op_payment_unknown(b: _Batch, payment_id: str, resolve_in_ms: int, reason: str) -> Payment:
    """The bank gave no clear answer: UNKNOWN, notified, and due for the resolver."""
    p, fp, due = _load_payment(b, payment_id)
    if p.status not in (PaymentStatus.PENDING, PaymentStatus.UNKNOWN):
        return p
    first = p.status == PaymentStatus.PENDING
    unknown = dataclasses.replace(p, status=PaymentStatus.UNKNOWN, reason=reason,
                                  updated_at_ms=b.now_ms,
                                  attempts=p.attempts + (0 if first else 1))
    _save_payment(b, unknown, fp, due, b.now_ms + resolve_in_ms)
    if first:
        if p.kind == "envelope":
            _set_envelope_status(b, p.envelope_id.encode(), ENV_PAY_UNKNOWN)
        b.notify(p.user_id.encode(), NOTE_UNKNOWN, p.amount_fen, payment_id=payment_id,
                 envelope_id=p.envelope_id,
                 message="the bank's answer is unclear; we are checking and will tell you")
    return unknown


class LmdbLedger(Ledger):
    """The ledger on an embedded LMDB environment in ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike, *, durable: bool = True,
                 map_size_bytes: int = 1 << 30, max_readers: int = 1024,
                 max_batch: int = 2048, max_wait_s: float = 0.0,
                 queue_limit: int = 100_000) -> None:
        path = Path(data_dir) / "ledger"
        path.mkdir(parents=True, exist_ok=True)
        # Options passed explicitly, not by default: sync/metasync make each
        # commit durable; writemap stays off so a stray pointer cannot
        # corrupt the file; readahead off suits a random-access working set.
        self.env = lmdb.open(
            str(path), map_size=map_size_bytes, max_dbs=len(_DBS) + 8,
            max_readers=max_readers, sync=durable, metasync=durable, writemap=False,
            readahead=False, lock=True, subdir=True,
        )
        stale = self.env.reader_check()
        if stale:
            log.warning("lmdb_stale_readers_cleared", count=stale)
        if not durable:
            log.warning("durability_relaxed",
                        detail="commits are not fsynced: a power loss can lose "
                               "acknowledged writes (a process crash cannot)")
        self.durable = durable
        self.dbs = {name: self.env.open_db(name.encode()) for name in _DBS}
        self.writer = GroupCommitWriter(
            self.env, lambda txn, now_ms: _Batch(txn, self.dbs, now_ms),
            max_batch=max_batch, max_wait_s=max_wait_s, queue_limit=queue_limit)

    def close(self) -> None:
        self.writer.close()
        self.env.close()

    # -- writes ---------------------------------------------------------------

    async def send_from_balance(self, user_id, request_id, fingerprint, *, total_fen, count,
                                kind, greeting, expires_in_s, shares) -> SendResult:
        return await self.writer.submit(
            _op_send, user_id.encode(), request_id.encode(), fingerprint,
            new_envelope_id().encode(), total_fen, count, kind, greeting, expires_in_s, shares)

    async def grab(self, user_id, envelope_id, request_id) -> GrabResult:
        return await self.writer.submit(
            _op_grab, envelope_id.encode(), user_id.encode(), request_digest(request_id))

    async def grab_many(self, items: list[tuple[str, str, str]]) -> list:
        """(user, envelope, request id) grabs as one writer request; a result or an error each."""
        packed = [(e.encode(), u.encode(), request_digest(r)) for u, e, r in items]
        return await self.writer.submit(_op_grab_many, packed)

    async def begin_payment(self, payment, fingerprint, due_in_ms, envelope=None):
        return await self.writer.submit(_op_begin_payment, payment, fingerprint, due_in_ms,
                                        envelope)

    async def finish_payment(self, payment_id: str, outcome: PaymentStatus, reason: str = "",
                             from_states: tuple = (PaymentStatus.PENDING,)) -> Payment:
        return await self.writer.submit(_op_finish_payment, payment_id, outcome, reason,
                                        from_states)

    async def payment_unknown(self, payment_id: str, resolve_in_ms: int,
                              reason: str = "") -> Payment:
        return await self.writer.submit(_op_payment_unknown, payment_id, resolve_in_ms, reason)

    def due_payments(self, limit: int) -> list[str]:
        """Payment ids whose resolve time has come, oldest first."""
        now_ms = time.time_ns() // 1_000_000
        out = []
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.dbs["resolve"]).iternext(keys=True, values=False):
                if _BE64.unpack(key[:8])[0] > now_ms or len(out) >= limit:
                    break
                out.append(key[8:].decode())
        return out

    async def expire_due(self, limit: int) -> int:
        """Refunds up to ``limit`` expired envelopes' unclaimed money; returns how many."""
        return await self.writer.submit(_op_expire_due, limit)

    async def apply_credits(self, limit) -> int:
        return await self.writer.submit(_op_apply_credits, limit)

    # -- reads (any thread; each in its own short read transaction) ------------

    def find_grab(self, user_id, envelope_id):
        env = envelope_id.encode()
        with self.env.begin() as txn:
            raw = txn.get(env + b"/" + user_id.encode(), db=self.dbs["grabs"])
            if raw is None:
                return None
            header = hotpath.envelope_header(txn.get(env, db=self.dbs["envelopes"]))
        amount, at_ms, index, flags, digest = hotpath.unpack_grab(raw)
        view = GrabView(user_id, amount, at_ms, index, bool(flags & _CREDITED))
        return view, digest, header[4] - header[5]

    def envelope_state(self, envelope_id: str) -> tuple[int, int, int, int] | None:
        """(count, claimed, status, expires_at_ms) of an envelope, or None."""
        with self.env.begin() as txn:
            buf = txn.get(envelope_id.encode(), db=self.dbs["envelopes"])
        if buf is None:
            return None
        h = hotpath.envelope_header(buf)
        return h[4], h[5], h[7], h[3]

    def grabbers(self, envelope_id: str) -> list[bytes]:
        """The user ids (bytes) that hold a share of the envelope."""
        prefix = envelope_id.encode() + b"/"
        users = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["grabs"])
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    users.append(key[len(prefix):])
        return users

    def get_envelope(self, envelope_id) -> EnvelopeView:
        env = envelope_id.encode()
        prefix = env + b"/"
        grabs = []
        with self.env.begin() as txn:
            buf = txn.get(env, db=self.dbs["envelopes"])
            if buf is None:
                raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
            meta = json.loads(txn.get(env, db=self.dbs["env_meta"]))
            cur = txn.cursor(db=self.dbs["grabs"])
            if cur.set_range(prefix):
                for key, raw in cur:
                    if not key.startswith(prefix):
                        break
                    amount, at_ms, index, flags, _d = hotpath.unpack_grab(raw)
                    grabs.append(GrabView(key[len(prefix):].decode(), amount, at_ms, index,
                                          bool(flags & _CREDITED)))
        (total, remaining_fen, created, expires, count, claimed, kind, status, _flags,
         _shares) = hotpath.unpack_envelope(buf)
        grabs.sort(key=lambda g: g.share_index)
        return EnvelopeView(envelope_id, meta["s"], total, count, kind, status, remaining_fen,
                            count - claimed, meta["g"], created, expires, tuple(grabs),
                            meta["b"])

    def balance(self, user_id) -> tuple[int, int]:
        user = user_id.encode()
        with self.env.begin() as txn:
            w = txn.get(wallet_account(user), db=self.dbs["accounts"])
            p = txn.get(pending_account(user), db=self.dbs["accounts"])
        return (0 if w is None else hotpath.unpack_i64(w),
                0 if p is None else hotpath.unpack_i64(p))

    def list_transactions(self, user_id, page_size, before_seq):
        user = user_id.encode() + b"\0"
        upper = user + _BE64.pack((1 << 64) - 1 if before_seq is None else before_seq)
        entries: list[WalletEntry] = []
        last_seq = None
        next_cursor = None
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["wallet_tx"])
            # The first key at or past `upper`, then one back: the newest below it.
            found = cur.prev() if cur.set_range(upper) else cur.last()
            while found:
                key, raw = cur.item()
                if not key.startswith(user):
                    break
                if len(entries) == page_size:
                    next_cursor = last_seq
                    break
                last_seq = _BE64.unpack(key[len(user):])[0]
                kind, amount, at_ms = _WTX.unpack_from(raw)
                tlen = raw[_WTX.size]
                tid = raw[_WTX.size + 1:_WTX.size + 1 + tlen].decode()
                ref = raw[_WTX.size + 1 + tlen:].decode()
                entries.append(WalletEntry(tid, TxKind(kind), amount, ref, at_ms))
                found = cur.prev()
        return entries, next_cursor

    def get_payment(self, payment_id: str) -> Payment | None:
        with self.env.begin() as txn:
            raw = txn.get(payment_id.encode(), db=self.dbs["payments"])
        return None if raw is None else _decode_payment(raw)[0]

    def send_result(self, user_id: str, request_id: str, fingerprint: bytes
                    ) -> SendResult | None:
        """The first result of a SendEnvelope request id, with the envelope's live status."""
        with self.env.begin() as txn:
            raw = txn.get(b"send\0" + user_id.encode() + b"\0" + request_id.encode(),
                          db=self.dbs["idem"])
            if raw is None:
                return None
            if raw[:16] != fingerprint:
                raise errors.InvalidArgument(
                    "REQUEST_ID_REUSED", "request_id was used before with another payload")
            saved = _decode_send(raw[16:])
            buf = txn.get(saved.envelope_id.encode(), db=self.dbs["envelopes"])
        return dataclasses.replace(saved, status=hotpath.envelope_header(buf)[7])

    def notifications(self, user_id: str, after_event_id: int, limit: int) -> list[Notice]:
        """The user's events with ids above ``after_event_id``, oldest first."""
        prefix = user_id.encode() + b"\0"
        out: list[Notice] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["notifications"])
            if not cur.set_range(prefix + _BE64.pack(min(after_event_id + 1, (1 << 64) - 1))):
                return out
            for key, raw in cur:
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                kind, amount, at_ms = _NOTE.unpack_from(raw)
                payment_id, envelope_id, message = raw[_NOTE.size:].decode().split("\0", 2)
                out.append(Notice(_BE64.unpack(key[len(prefix):])[0], kind, payment_id,
                                  envelope_id, amount, message, at_ms))
        return out

    @property
    def queue_depth(self) -> int:
        return self.writer.depth

    def credit_backlog(self) -> int:
        """Grabs waiting for their credit to land in a wallet."""
        with self.env.begin() as txn:
            return txn.stat(self.dbs["bus:credit"])["entries"]


class LedgerSnapshot:
    """A read-only view of a ledger directory, for reconcile beside a live gateway."""

    def __init__(self, env: lmdb.Environment, dbs: dict) -> None:
        self.env = env
        self.dbs = dbs


def open_readonly(data_dir: str | os.PathLike) -> LedgerSnapshot:
    path = Path(data_dir) / "ledger"
    if not (path / "data.mdb").exists():
        raise FileNotFoundError(f"no ledger in {data_dir}")
    env = lmdb.open(str(path), readonly=True, max_dbs=len(_DBS) + 8, lock=True,
                    subdir=True, readahead=False, max_readers=1024)
    # Opened outside any transaction of ours: py-lmdb then commits the
    # handle's own read transaction, which keeps the handles valid afterwards.
    dbs = {name: env.open_db(name.encode(), create=False) for name in _DBS}
    return LedgerSnapshot(env, dbs)
