"""How the money rules' records are laid out in bytes, for every backend alike.

Envelope, grab and transfer records are packed by ``hotpath`` (fixed-width
binary, on the hot path); the rest are here. A backend stores the bytes and
never looks inside them.
"""

from __future__ import annotations

import json
import struct

from gateway.domain.model import (
    CreditKind,
    Notice,
    Payment,
    PaymentKind,
    PaymentStatus,
    RemoteCredit,
    SendResult,
    TxKind,
    UnlockResult,
    WalletEntry,
)

GRAB_CREDITED = 1  # grab record flag: its credit reached the wallet

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
        "n": p.attempts,
    }, separators=_COMPACT).encode()


def unpack_payment(raw: bytes) -> tuple[Payment, bytes, int]:
    """The payment, its request fingerprint and its due time in the resolver's queue."""
    d = json.loads(raw)
    p = Payment(d["id"], d["u"], PaymentKind(d["k"]), d["c"], d["bk"], d["a"],
                PaymentStatus(d["s"]), d["r"], d["t0"], d["t1"], d.get("e", ""), d.get("n", 0))
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
