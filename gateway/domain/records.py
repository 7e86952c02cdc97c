"""How the money rules' records are laid out in bytes, for every backend alike.

Envelope, grab and transfer records are packed by ``hotpath`` (fixed-width
binary, on the hot path); the rest are here. A backend stores the bytes and
never looks inside them.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

from gateway.domain import keys
from gateway.domain.model import (
    CreditKind,
    Notice,
    Payment,
    PaymentKind,
    PaymentStatus,
    RemoteCredit,
    SendResult,
    SlotExport,
    TxKind,
    UnlockResult,
    WalletEntry,
)

GRAB_CREDITED = 1  # grab record flag: its credit reached the wallet
# Grab record flag: imported with its envelope by a slot handoff; its g:/c: transfers are in
# the old owner's journal, so the audit checks it against the escrow and shares only.
GRAB_IMPORTED = 2
# Envelope header flag: imported by a slot handoff (its send, grabs and any expiry refund
# before the move are in the old owner's journal).
ENV_IMPORTED = 1

# A remote credit: the amount, then home, transfer id, user and reference id, \0-separated;
# a photo income adds its kind and photo id (a grab's record is as it was before photo
# credits, so records already queued read back as grabs).
_XCREDIT = struct.Struct("<q")

_WTX = struct.Struct("<Bqq")  # kind, signed amount, created_at_ms
_NOTE = struct.Struct("<Bqq")  # kind, amount_fen, created_at_ms
_COMPACT = (",", ":")


def pack_wallet_entry(kind: int, signed_fen: int, at_ms: int, tid: bytes, ref: bytes) -> bytes:
    return _WTX.pack(kind, signed_fen, at_ms) + bytes([len(tid)]) + tid + ref


def unpack_wallet_entry(raw: bytes) -> WalletEntry:
    kind, amount, at_ms = _WTX.unpack_from(raw)
    tlen = raw[_WTX.size]
    tid = raw[_WTX.size + 1:_WTX.size + 1 + tlen].decode()
    ref = raw[_WTX.size + 1 + tlen:].decode()
    return WalletEntry(tid, TxKind(kind), amount, ref, at_ms)


def pack_notice(kind: int, amount_fen: int, at_ms: int, payment_id: str, envelope_id: str,
                message: str) -> bytes:
    parts = [p.encode() for p in (payment_id, envelope_id, message)]
    return _NOTE.pack(kind, amount_fen, at_ms) + b"\0".join(parts)


def unpack_notice(event_id: int, raw: bytes) -> Notice:
    kind, amount, at_ms = _NOTE.unpack_from(raw)
    payment_id, envelope_id, message = raw[_NOTE.size:].decode().split("\0", 2)
    return Notice(event_id, kind, payment_id, envelope_id, amount, message, at_ms)


def pack_env_meta(sender: str, greeting: str, best_luck: str, payment_id: str,
                  paid_via: int) -> bytes:
    return json.dumps({"s": sender, "g": greeting, "b": best_luck, "p": payment_id,
                       "v": int(paid_via)}, separators=_COMPACT).encode()


def unpack_env_meta(raw: bytes) -> dict:
    """``s`` sender, ``g`` greeting, ``b`` best luck, ``p`` payment id, ``v`` paid via."""
    return json.loads(raw)


def with_best_luck(raw: bytes, user_id: str) -> bytes:
    meta = json.loads(raw)
    meta["b"] = user_id
    return json.dumps(meta, separators=_COMPACT).encode()


def pack_send_result(fp: bytes, r: SendResult) -> bytes:
    """An idempotency record: the request's fingerprint, then its first result."""
    assert len(fp) == 16, fp
    return fp + json.dumps([r.envelope_id, int(r.status), int(r.paid_via),
                            r.payment_id]).encode()


def unpack_send_result(raw: bytes) -> tuple[bytes, SendResult]:
    env_id, status, paid_via, payment_id = json.loads(raw[16:])
    return raw[:16], SendResult(env_id, status, paid_via, payment_id)


def pack_unlock(fp: bytes, r: UnlockResult, owner_id: str, photo_id: str,
                home: str | None = None) -> bytes:
    """A paid unlock's idempotency record: the fingerprint, then result, owner and photo,
    and the owner's SET when their wallet lived on another one (cluster mode)."""
    assert len(fp) == 16 and not r.free, (fp, r)
    fields: list[object] = [r.payment_id, r.amount_fen, owner_id, photo_id]
    if home is not None:
        fields.append(home)
    return fp + json.dumps(fields, separators=_COMPACT).encode()


def unpack_unlock(raw: bytes) -> tuple[bytes, UnlockResult, str, str]:
    """The fingerprint, the result, the owner and the photo of an unlock record."""
    payment_id, amount_fen, owner_id, photo_id = json.loads(raw[16:])[:4]
    return raw[:16], UnlockResult(payment_id, amount_fen, False), owner_id, photo_id


def unlock_home(raw: bytes) -> str | None:
    """The SET an unlock record paid the owner on, or None: their wallet was on this one."""
    fields = json.loads(raw[16:])
    return fields[4] if len(fields) > 4 else None


def pack_payment(p: Payment, fingerprint: bytes, due_ms: int = 0) -> bytes:
    return json.dumps({
        "id": p.payment_id, "u": p.user_id, "k": str(p.kind), "c": p.card_id, "bk": p.bank_id,
        "a": p.amount_fen, "s": int(p.status), "r": p.reason, "t0": p.created_at_ms,
        "t1": p.updated_at_ms, "fp": fingerprint.hex(), "e": p.envelope_id, "due": due_ms,
        "n": p.attempts, "ch": p.channel,
    }, separators=_COMPACT).encode()


def unpack_payment(raw: bytes) -> tuple[Payment, bytes, int]:
    """The payment, its request fingerprint and its due time in the resolver's queue."""
    d = json.loads(raw)
    p = Payment(d["id"], d["u"], PaymentKind(d["k"]), d["c"], d["bk"], d["a"],
                PaymentStatus(d["s"]), d["r"], d["t0"], d["t1"], d.get("e", ""), d.get("n", 0),
                d.get("ch", "direct"))  # a payment saved before channels went direct
    return p, bytes.fromhex(d["fp"]), d.get("due", 0)


def pack_xcredit(c: RemoteCredit) -> bytes:
    parts = [c.home, c.transfer_id, c.user_id, c.reference_id]
    if c.kind != CreditKind.GRAB:
        parts += [str(c.kind), c.photo_id]
    return _XCREDIT.pack(c.amount_fen) + "\0".join(parts).encode()


def unpack_xcredit(seq: int, raw: bytes) -> RemoteCredit:
    (amount,) = _XCREDIT.unpack_from(raw)
    home, tid, user, ref, *rest = raw[_XCREDIT.size:].decode().split("\0")
    if not rest:
        return RemoteCredit(home, tid, user, amount, ref, seq=seq)
    kind, photo = rest
    return RemoteCredit(home, tid, user, amount, ref, CreditKind(kind), photo, seq)


def mark_payment_imported(raw: bytes, from_set: str) -> bytes:
    """A payment record carried by a slot handoff: its money is in ``from_set``'s books."""
    d = json.loads(raw)
    d["m"] = from_set
    return json.dumps(d, separators=_COMPACT).encode()


def payment_imported(raw: bytes) -> bool:
    return b'"m":' in raw and "m" in json.loads(raw)


def mark_unlock_imported(raw: bytes, from_set: str) -> bytes:
    """An unlock record carried by a slot handoff: the owner's SET (or null) at index 4,
    the old owner at index 5; its transfer is in ``from_set``'s journal."""
    fields = json.loads(raw[16:])
    if len(fields) == 4:
        fields.append(None)
    return raw[:16] + json.dumps([*fields[:5], from_set], separators=_COMPACT).encode()


def unlock_imported(raw: bytes) -> bool:
    return len(json.loads(raw[16:])) > 5


def pack_export(fp: bytes, r: SlotExport) -> bytes:
    assert len(fp) == 16, fp
    return fp + json.dumps([r.move_id, r.chunks, r.wallets, r.wallet_fen, r.envelopes,
                            r.escrow_fen, r.records], separators=_COMPACT).encode()


def unpack_export(raw: bytes) -> tuple[bytes, SlotExport]:
    return raw[:16], SlotExport(*json.loads(raw[16:]))


# -- slot handoff chunks ----------------------------------------------------------------
# magic, chunk number, chunk count, money items, rows; then the move id and the new owner,
# each u16-length-prefixed; then each money item (transfer id, account: u16-prefixed; i64
# amount) and each row (u8 index into keys.MIGRATABLE, u16-prefixed key, u32-prefixed value).
_CHUNK_MAGIC = b"HBM1"
_CHUNK_HEAD = struct.Struct("<4sIIII")
_U8, _U16, _U32, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<q"))
CHUNK_MAX_BYTES = 256 * 1024


class Chunk(NamedTuple):
    move_id: bytes
    to_set: bytes
    n: int
    total: int
    money: list[tuple[bytes, bytes, int]]  # (transfer id, account, amount_fen)
    rows: list[tuple[str, bytes, bytes]]  # (table, key, value)


def money_size(tid: bytes, acct: bytes) -> int:
    return 2 + len(tid) + 2 + len(acct) + 8


def row_size(key: bytes, value: bytes) -> int:
    return 1 + 2 + len(key) + 4 + len(value)


def chunk_head_size(move_id: bytes, to_set: bytes) -> int:
    return _CHUNK_HEAD.size + 2 + len(move_id) + 2 + len(to_set)


def pack_chunk(c: Chunk) -> bytes:
    out = [_CHUNK_HEAD.pack(_CHUNK_MAGIC, c.n, c.total, len(c.money), len(c.rows))]
    for name in (c.move_id, c.to_set):
        out += [_U16.pack(len(name)), name]
    for tid, acct, amount in c.money:
        assert amount > 0, (tid, amount)
        out += [_U16.pack(len(tid)), tid, _U16.pack(len(acct)), acct, _I64.pack(amount)]
    for table, key, value in c.rows:
        out += [_U8.pack(keys.MIGRATABLE.index(table)), _U16.pack(len(key)), key,
                _U32.pack(len(value)), value]
    raw = b"".join(out)
    assert len(raw) <= CHUNK_MAX_BYTES, len(raw)
    return raw


def unpack_chunk(raw: bytes) -> Chunk:
    """A chunk, read back with every length checked; ValueError if it is not one."""
    try:
        return _unpack_chunk(raw)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"not a migration chunk: {exc}") from exc


def _unpack_chunk(raw: bytes) -> Chunk:
    magic, n, total, n_money, n_rows = _CHUNK_HEAD.unpack_from(raw)
    if magic != _CHUNK_MAGIC or not n < total:
        raise ValueError(f"not a migration chunk (magic {magic!r}, chunk {n} of {total})")
    at = _CHUNK_HEAD.size

    def take(size: struct.Struct) -> bytes:
        nonlocal at
        (length,) = size.unpack_from(raw, at)
        piece = raw[at + size.size:at + size.size + length]
        if len(piece) != length:
            raise ValueError("a field runs past the chunk's end")
        at += size.size + length
        return piece

    move_id, to_set = take(_U16), take(_U16)
    money = []
    for _ in range(n_money):
        tid, acct = take(_U16), take(_U16)
        money.append((tid, acct, _I64.unpack_from(raw, at)[0]))
        at += _I64.size
    rows = []
    for _ in range(n_rows):
        table = keys.MIGRATABLE[_U8.unpack_from(raw, at)[0]]
        at += 1
        rows.append((table, take(_U16), take(_U32)))
    if at != len(raw):
        raise ValueError(f"{len(raw) - at} bytes after the chunk's last row")
    return Chunk(move_id, to_set, n, total, money, rows)
