"""Fixed-width little-endian records (pure-Python twin of _records.pyx).

Same layouts, checks, exceptions and messages; see _records.pyx for the
layouts.
"""

import struct

from hotpath._errors import record_error
from hotpath._pure_split import _i64

ENVELOPE_HEADER_SIZE = 40
GRAB_RECORD_SIZE = 40
TRANSFER_HEADER_SIZE = 20

_I64 = struct.Struct("<q")
_ENVELOPE = struct.Struct("<qqqqHHBBH")
_SHARE = struct.Struct("<i")
_GRAB = struct.Struct("<qqHBB4s16s")   # the 4x padding read as bytes, to check it
_TRANSFER = struct.Struct("<qqBBBB")
_SHARE_MAX_FEN = 2147483647
_I64_MAX = (1 << 63) - 1
_FIELD_MAX = 255
# offsets of the fields claim_share rewrites
_REMAINING_AT = 8
_CLAIMED_AT = 34
_STATUS_AT = 37


def _need_range(name, value, lo, hi):
    if value < lo or value > hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")


def _need_bytes(name, value):
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def pack_i64(v):
    """8 bytes, little-endian signed (`<q`)."""
    return _I64.pack(_i64(v))


def unpack_i64(buf):
    """Inverse of pack_i64; the buffer must be exactly 8 bytes."""
    view = memoryview(buf)
    if view.nbytes != 8:
        raise record_error("length", "i64", view.nbytes)
    return _I64.unpack(view)[0]


def add_fen(a, b):
    """a + b in int64, raising OverflowError instead of wrapping."""
    a, b = _i64(a), _i64(b)
    total = a + b
    if not -_I64_MAX - 1 <= total <= _I64_MAX:
        raise OverflowError(f"{a} + {b} fen overflows int64")
    return total


def debit_ok(balance_fen, amount_fen):
    """True if a debit of amount_fen (> 0) is covered by balance_fen."""
    balance_fen, amount_fen = _i64(balance_fen), _i64(amount_fen)
    return amount_fen > 0 and balance_fen >= amount_fen


def _decode_envelope_header(view):
    n = view.nbytes
    if n < ENVELOPE_HEADER_SIZE:
        raise record_error("short", "envelope", n)
    header = _ENVELOPE.unpack_from(view)
    total_fen, remaining_fen, _, _, count, claimed = header[:6]
    if count == 0:
        raise record_error("count", "envelope", n)
    if n != ENVELOPE_HEADER_SIZE + 4 * count:
        raise record_error("length", "envelope", n)
    if claimed > count:
        raise record_error("claimed", "envelope", n)
    if remaining_fen < 0 or remaining_fen > total_fen:
        raise record_error("remaining", "envelope", n)
    return header


def pack_envelope(total_fen, remaining_fen, created_at_ms, expires_at_ms, count, claimed,
                  kind, status, flags, shares):
    """Envelope record: the 40-byte header then count int32 shares (checked first)."""
    total_fen, remaining_fen = _i64(total_fen), _i64(remaining_fen)
    created_at_ms, expires_at_ms = _i64(created_at_ms), _i64(expires_at_ms)
    count, claimed, kind, status, flags = map(_i64, (count, claimed, kind, status, flags))
    _need_range("count", count, 1, 65535)
    _need_range("claimed", claimed, 0, count)
    _need_range("kind", kind, 0, 255)
    _need_range("status", status, 0, 255)
    _need_range("flags", flags, 0, 65535)
    _need_range("remaining_fen", remaining_fen, 0, total_fen)
    if not isinstance(shares, (list, tuple)):
        shares = tuple(shares)
    if len(shares) != count:
        raise ValueError(f"got {len(shares)} shares for count {count}")
    total = 0
    for i, share in enumerate(shares):
        share = _i64(share)
        if share < 1 or share > _SHARE_MAX_FEN:
            raise ValueError(f"share {i} is {share} fen, outside 1..{_SHARE_MAX_FEN}")
        total += share
    if total != total_fen:
        raise ValueError(f"shares sum to {total} fen, not total_fen {total_fen}")
    return _ENVELOPE.pack(total_fen, remaining_fen, created_at_ms, expires_at_ms, count,
                          claimed, kind, status, flags) + struct.pack(f"<{count}i", *shares)


def unpack_envelope(buf):
    """(total_fen, remaining_fen, created_at_ms, expires_at_ms, count, claimed,
    kind, status, flags, shares_tuple), after checking the record."""
    view = memoryview(buf).cast("B")
    header = _decode_envelope_header(view)
    count = header[4]
    shares = struct.unpack_from(f"<{count}i", view, ENVELOPE_HEADER_SIZE)
    if min(shares) < 1:
        raise record_error("share", "envelope", view.nbytes)
    if sum(shares) != header[0]:
        raise record_error("share_sum", "envelope", view.nbytes)
    return (*header, shares)


def envelope_header(buf):
    """The envelope record's 9 header fields, without reading the shares."""
    return _decode_envelope_header(memoryview(buf).cast("B"))


def claim_share(buf, status_sold_out):
    """Take the next share: (new_buf, share_index, amount_fen); see _records.pyx."""
    status_sold_out = _i64(status_sold_out)
    if status_sold_out < 0 or status_sold_out > 255:
        raise ValueError(f"status_sold_out must be in 0..255, got {status_sold_out}")
    view = memoryview(buf).cast("B")
    n = view.nbytes
    _, remaining_fen, _, _, count, claimed, _, status, _ = _decode_envelope_header(view)
    if claimed >= count:
        raise record_error("sold_out", "envelope", n)
    (share,) = _SHARE.unpack_from(view, ENVELOPE_HEADER_SIZE + 4 * claimed)
    if share < 1:
        raise record_error("share", "envelope", n)
    if share > remaining_fen:
        raise record_error("over_remaining", "envelope", n)
    out = bytearray(view)
    claimed += 1
    if claimed == count:
        status = status_sold_out
    _I64.pack_into(out, _REMAINING_AT, remaining_fen - share)
    struct.pack_into("<H", out, _CLAIMED_AT, claimed)
    out[_STATUS_AT] = status
    return bytes(out), claimed - 1, share


def pack_grab(amount_fen, grabbed_at_ms, share_index, flags, request_digest):
    """Grab record (40 bytes); flags bit 0 = credited; the reserved byte is 0."""
    amount_fen, grabbed_at_ms = _i64(amount_fen), _i64(grabbed_at_ms)
    share_index, flags = _i64(share_index), _i64(flags)
    _need_bytes("request_digest", request_digest)
    _need_range("amount_fen", amount_fen, 1, _I64_MAX)
    _need_range("share_index", share_index, 0, 65535)
    _need_range("flags", flags, 0, 255)
    if len(request_digest) != 16:
        raise ValueError(f"request_digest must be 16 bytes, got {len(request_digest)}")
    return _GRAB.pack(amount_fen, grabbed_at_ms, share_index, flags, 0, bytes(4),
                      request_digest)


def unpack_grab(buf):
    """(amount_fen, grabbed_at_ms, share_index, flags, request_digest), checked."""
    view = memoryview(buf).cast("B")
    n = view.nbytes
    if n != GRAB_RECORD_SIZE:
        raise record_error("length", "grab", n)
    amount_fen, grabbed_at_ms, share_index, flags, kind, pad, digest = _GRAB.unpack(view)
    if amount_fen < 1:
        raise record_error("amount", "grab", n)
    if kind != 0 or pad != bytes(4):
        raise record_error("reserved", "grab", n)
    return amount_fen, grabbed_at_ms, share_index, flags, digest


def _need_field(name, value):
    if len(value) > _FIELD_MAX:
        raise ValueError(f"{name} is {len(value)} bytes, over {_FIELD_MAX}")


def pack_transfer(amount_fen, created_at_ms, kind, debit_account, credit_account, ref):
    """Transfer record: 20-byte header then debit, credit and ref (each <= 255 bytes)."""
    amount_fen, created_at_ms, kind = _i64(amount_fen), _i64(created_at_ms), _i64(kind)
    _need_bytes("debit_account", debit_account)
    _need_bytes("credit_account", credit_account)
    _need_bytes("ref", ref)
    _need_range("amount_fen", amount_fen, 1, _I64_MAX)
    _need_range("kind", kind, 0, 255)
    _need_field("debit_account", debit_account)
    _need_field("credit_account", credit_account)
    _need_field("ref", ref)
    return b"".join((
        _TRANSFER.pack(amount_fen, created_at_ms, kind, len(debit_account),
                       len(credit_account), len(ref)),
        debit_account, credit_account, ref,
    ))


def unpack_transfer(buf):
    """(amount_fen, created_at_ms, kind, debit_account, credit_account, ref), checked."""
    view = memoryview(buf).cast("B")
    n = view.nbytes
    if n < TRANSFER_HEADER_SIZE:
        raise record_error("short", "transfer", n)
    amount_fen, created_at_ms, kind, nd, nc, nr = _TRANSFER.unpack_from(view)
    if n != TRANSFER_HEADER_SIZE + nd + nc + nr:
        raise record_error("length", "transfer", n)
    if amount_fen < 1:
        raise record_error("amount", "transfer", n)
    body = bytes(view[TRANSFER_HEADER_SIZE:])
    return amount_fen, created_at_ms, kind, body[:nd], body[nd:nd + nc], body[nd + nc:]
