"""Fixed-width little-endian records for the ledger (Cython implementation).

Layouts (struct notation):
    envelope  <qqqqHHBBH  total_fen, remaining_fen, created_at_ms, expires_at_ms,
                          count, claimed, kind, status, flags   (40 bytes)
              then count x <i shares (int32 fen)
    grab      <qqHBB4x16s amount_fen, grabbed_at_ms, share_index, flags
                          (bit 0 = credited), reserved byte (0), 16-byte
                          request digest                       (40 bytes)
    transfer  <qqBBBB     amount_fen, created_at_ms, kind, len(debit_account),
                          len(credit_account), len(ref)         (20 bytes)
              then the three byte strings

Data is checked before it is written (ValueError) and again after it is read
back (MalformedRecordError, a ValueError).  Readers accept any bytes-like
object (bytes, bytearray, memoryview: LMDB hands out either).  Integer
arguments outside int64 raise OverflowError, non-integers TypeError.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_FromLong
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from hotpath._cdefs cimport (
    HB_DEBUG,
    as_i64,
    hb_add_overflows,
    hb_get_u16,
    hb_get_u32,
    hb_get_u64,
    hb_put_u16,
    hb_put_u32,
    hb_put_u64,
)

from hotpath._errors import record_error

ENVELOPE_HEADER_SIZE = ENV_HEADER_SIZE
GRAB_RECORD_SIZE = GRAB_SIZE
TRANSFER_HEADER_SIZE = XFER_HEADER_SIZE

cdef int64_t _SHARE_MAX_FEN = 2147483647

# RecordCheck -> the problem name record_error() knows.
cdef tuple _PROBLEMS = (
    None, "short", "length", "count", "claimed", "remaining", "share", "share_sum",
    "amount", "reserved", "sold_out", "over_remaining",
)


cdef int raise_check(RecordCheck check, str record, Py_ssize_t n) except -1:
    raise record_error(_PROBLEMS[<int>check], record, n)


cdef inline bytes _as_bytes(object buf):
    # Readers work on bytes; any other bytes-like object (LMDB may hand out
    # memoryviews) is copied once, which for records of at most a few hundred
    # bytes is cheaper than holding a buffer view across a try/finally.
    if type(buf) is bytes:
        return <bytes>buf
    return bytes(memoryview(buf))


cdef inline bytes _need_bytes(str name, object value):
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return <bytes>value


cdef inline int _need_range(str name, int64_t value, int64_t lo, int64_t hi) except -1:
    if value < lo or value > hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return 0


# ---------------------------------------------------------------- int64 and money

def pack_i64(v):
    """8 bytes, little-endian signed (`<q`)."""
    return _pack_i64(as_i64(v))


cdef bytes _pack_i64(int64_t v):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    hb_put_u64(<unsigned char *>PyBytes_AS_STRING(out), <uint64_t>v)
    return out


def unpack_i64(buf):
    """Inverse of pack_i64; the buffer must be exactly 8 bytes."""
    cdef bytes b = _as_bytes(buf)
    if PyBytes_GET_SIZE(b) != 8:
        raise_check(RECORD_LENGTH, "i64", PyBytes_GET_SIZE(b))
    return <int64_t>hb_get_u64(<const unsigned char *>PyBytes_AS_STRING(b))


def add_fen(a, b):
    """a + b in int64, raising OverflowError instead of wrapping."""
    cdef int64_t x = as_i64(a), y = as_i64(b), total
    if hb_add_overflows(x, y, &total):
        raise OverflowError(f"{x} + {y} fen overflows int64")
    return total


def debit_ok(balance_fen, amount_fen):
    """True if a debit of amount_fen (> 0) is covered by balance_fen."""
    cdef int64_t balance = as_i64(balance_fen), amount = as_i64(amount_fen)
    return amount > 0 and balance >= amount


# ---------------------------------------------------------------- envelope

cdef RecordCheck decode_envelope_header(const unsigned char *p, Py_ssize_t n,
                                        EnvelopeHeader *h) noexcept nogil:
    if n < ENV_HEADER_SIZE:
        return RECORD_SHORT
    h.total_fen = <int64_t>hb_get_u64(p + ENV_TOTAL)
    h.remaining_fen = <int64_t>hb_get_u64(p + ENV_REMAINING)
    h.created_at_ms = <int64_t>hb_get_u64(p + ENV_CREATED)
    h.expires_at_ms = <int64_t>hb_get_u64(p + ENV_EXPIRES)
    h.count = hb_get_u16(p + ENV_COUNT)
    h.claimed = hb_get_u16(p + ENV_CLAIMED)
    h.kind = p[ENV_KIND]
    h.status = p[ENV_STATUS]
    h.flags = hb_get_u16(p + ENV_FLAGS)
    if h.count == 0:
        return RECORD_COUNT
    if n != ENV_HEADER_SIZE + ENV_SHARE_SIZE * <Py_ssize_t>h.count:
        return RECORD_LENGTH
    if h.claimed > h.count:
        return RECORD_CLAIMED
    if h.remaining_fen < 0 or h.remaining_fen > h.total_fen:
        return RECORD_REMAINING
    return RECORD_OK


cdef RecordCheck check_envelope_shares(const unsigned char *p,
                                       const EnvelopeHeader *h) noexcept nogil:
    cdef int64_t total = 0
    cdef int32_t share
    cdef Py_ssize_t i
    for i in range(h.count):
        share = <int32_t>hb_get_u32(p + ENV_HEADER_SIZE + ENV_SHARE_SIZE * i)
        if share < 1:
            return RECORD_SHARE
        total += share
    if total != h.total_fen:
        return RECORD_SHARE_SUM
    return RECORD_OK


cdef void encode_envelope_header(unsigned char *p, const EnvelopeHeader *h) noexcept nogil:
    hb_put_u64(p + ENV_TOTAL, <uint64_t>h.total_fen)
    hb_put_u64(p + ENV_REMAINING, <uint64_t>h.remaining_fen)
    hb_put_u64(p + ENV_CREATED, <uint64_t>h.created_at_ms)
    hb_put_u64(p + ENV_EXPIRES, <uint64_t>h.expires_at_ms)
    hb_put_u16(p + ENV_COUNT, h.count)
    hb_put_u16(p + ENV_CLAIMED, h.claimed)
    p[ENV_KIND] = h.kind
    p[ENV_STATUS] = h.status
    hb_put_u16(p + ENV_FLAGS, h.flags)


cdef RecordCheck claim_share_into(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                  uint8_t status_sold_out, Py_ssize_t *index,
                                  int64_t *amount_fen) noexcept nogil:
    # dst must have room for n bytes; it is written only if the claim succeeds.
    cdef EnvelopeHeader h
    cdef RecordCheck check = decode_envelope_header(src, n, &h)
    cdef int64_t share
    if check != RECORD_OK:
        return check
    if h.claimed >= h.count:
        return RECORD_SOLD_OUT
    share = <int32_t>hb_get_u32(src + ENV_HEADER_SIZE + ENV_SHARE_SIZE * h.claimed)
    if share < 1:
        return RECORD_SHARE
    if share > h.remaining_fen:
        return RECORD_OVER_REMAINING
    memcpy(dst, src, n)
    index[0] = h.claimed
    amount_fen[0] = share
    h.claimed += 1
    h.remaining_fen -= share
    if h.claimed == h.count:
        h.status = status_sold_out
    hb_put_u64(dst + ENV_REMAINING, <uint64_t>h.remaining_fen)
    hb_put_u16(dst + ENV_CLAIMED, h.claimed)
    dst[ENV_STATUS] = h.status
    return RECORD_OK


def pack_envelope(total_fen, remaining_fen, created_at_ms, expires_at_ms, count, claimed,
                  kind, status, flags, shares):
    """Envelope record: the 40-byte header then count int32 shares.

    Checked before writing: count 1..65535, claimed 0..count, kind and status
    0..255, flags 0..65535, remaining_fen 0..total_fen, exactly count shares,
    each 1..2**31-1 fen, summing to total_fen.
    """
    return _pack_envelope(as_i64(total_fen), as_i64(remaining_fen), as_i64(created_at_ms),
                          as_i64(expires_at_ms), as_i64(count), as_i64(claimed),
                          as_i64(kind), as_i64(status), as_i64(flags), shares)


cdef bytes _pack_envelope(int64_t total_fen, int64_t remaining_fen, int64_t created_at_ms,
                          int64_t expires_at_ms, int64_t count, int64_t claimed, int64_t kind,
                          int64_t status, int64_t flags, object shares):
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
    cdef Py_ssize_t n = ENV_HEADER_SIZE + ENV_SHARE_SIZE * count
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    cdef int64_t share, total = 0
    cdef Py_ssize_t i
    for i in range(count):
        share = as_i64(shares[i])
        if share < 1 or share > _SHARE_MAX_FEN:
            raise ValueError(f"share {i} is {share} fen, outside 1..{_SHARE_MAX_FEN}")
        total += share
        hb_put_u32(p + ENV_HEADER_SIZE + ENV_SHARE_SIZE * i, <uint32_t>share)
    if total != total_fen:
        raise ValueError(f"shares sum to {total} fen, not total_fen {total_fen}")
    cdef EnvelopeHeader h
    h.total_fen = total_fen
    h.remaining_fen = remaining_fen
    h.created_at_ms = created_at_ms
    h.expires_at_ms = expires_at_ms
    h.count = <uint16_t>count
    h.claimed = <uint16_t>claimed
    h.kind = <uint8_t>kind
    h.status = <uint8_t>status
    h.flags = <uint16_t>flags
    encode_envelope_header(p, &h)
    if HB_DEBUG:
        assert decode_envelope_header(p, n, &h) == RECORD_OK
        assert check_envelope_shares(p, &h) == RECORD_OK
    return out


def unpack_envelope(buf):
    """(total_fen, remaining_fen, created_at_ms, expires_at_ms, count, claimed,
    kind, status, flags, shares_tuple), after checking the record."""
    cdef bytes b = _as_bytes(buf)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    cdef EnvelopeHeader h
    cdef RecordCheck check = decode_envelope_header(p, PyBytes_GET_SIZE(b), &h)
    if check == RECORD_OK:
        check = check_envelope_shares(p, &h)
    if check != RECORD_OK:
        raise_check(check, "envelope", PyBytes_GET_SIZE(b))
    cdef tuple shares = PyTuple_New(h.count)
    cdef object item
    cdef Py_ssize_t i
    for i in range(h.count):
        item = PyLong_FromLong(<int32_t>hb_get_u32(p + ENV_HEADER_SIZE + ENV_SHARE_SIZE * i))
        Py_INCREF(item)   # PyTuple_SET_ITEM steals a reference
        PyTuple_SET_ITEM(shares, i, item)
    return (h.total_fen, h.remaining_fen, h.created_at_ms, h.expires_at_ms,
            h.count, h.claimed, h.kind, h.status, h.flags, shares)


def envelope_header(buf):
    """The envelope record's 9 header fields, without reading the shares."""
    cdef bytes b = _as_bytes(buf)
    cdef EnvelopeHeader h
    cdef RecordCheck check = decode_envelope_header(
        <const unsigned char *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), &h)
    if check != RECORD_OK:
        raise_check(check, "envelope", PyBytes_GET_SIZE(b))
    return (h.total_fen, h.remaining_fen, h.created_at_ms, h.expires_at_ms,
            h.count, h.claimed, h.kind, h.status, h.flags)


def claim_share(buf, status_sold_out):
    """Take the next share: (new_buf, share_index, amount_fen).

    share[claimed] is taken, claimed goes up by one, remaining_fen down by the
    share, and status becomes status_sold_out with the last share.  Raises
    EnvelopeSoldOutError (a ValueError) if every share is already claimed.
    """
    cdef int64_t sold_out_status = as_i64(status_sold_out)
    if sold_out_status < 0 or sold_out_status > 255:
        raise ValueError(f"status_sold_out must be in 0..255, got {sold_out_status}")
    cdef bytes b = _as_bytes(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef Py_ssize_t index = 0
    cdef int64_t amount_fen = 0
    cdef RecordCheck check = claim_share_into(
        <const unsigned char *>PyBytes_AS_STRING(b), n, <unsigned char *>PyBytes_AS_STRING(out),
        <uint8_t>sold_out_status, &index, &amount_fen)
    if check != RECORD_OK:
        raise_check(check, "envelope", n)
    return (out, index, amount_fen)


# ---------------------------------------------------------------- grab

def pack_grab(amount_fen, grabbed_at_ms, share_index, flags, request_digest):
    """Grab record (40 bytes); flags bit 0 = credited; the reserved byte is 0."""
    return _pack_grab(as_i64(amount_fen), as_i64(grabbed_at_ms), as_i64(share_index),
                      as_i64(flags), _need_bytes("request_digest", request_digest))


cdef bytes _pack_grab(int64_t amount_fen, int64_t grabbed_at_ms, int64_t share_index,
                      int64_t flags, bytes request_digest):
    _need_range("amount_fen", amount_fen, 1, 0x7FFFFFFFFFFFFFFF)
    _need_range("share_index", share_index, 0, 65535)
    _need_range("flags", flags, 0, 255)
    if PyBytes_GET_SIZE(request_digest) != GRAB_DIGEST_SIZE:
        raise ValueError(f"request_digest must be {GRAB_DIGEST_SIZE} bytes, "
                         f"got {PyBytes_GET_SIZE(request_digest)}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, GRAB_SIZE)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    hb_put_u64(p + GRAB_AMOUNT, <uint64_t>amount_fen)
    hb_put_u64(p + GRAB_AT, <uint64_t>grabbed_at_ms)
    hb_put_u16(p + GRAB_SHARE_INDEX, <uint16_t>share_index)
    p[GRAB_FLAGS] = <uint8_t>flags
    p[GRAB_KIND] = 0
    hb_put_u32(p + GRAB_PAD, 0)
    memcpy(p + GRAB_DIGEST, PyBytes_AS_STRING(request_digest), GRAB_DIGEST_SIZE)
    return out


def unpack_grab(buf):
    """(amount_fen, grabbed_at_ms, share_index, flags, request_digest), checked."""
    cdef bytes b = _as_bytes(buf)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    if n != GRAB_SIZE:
        raise_check(RECORD_LENGTH, "grab", n)
    cdef int64_t amount_fen = <int64_t>hb_get_u64(p + GRAB_AMOUNT)
    if amount_fen < 1:
        raise_check(RECORD_AMOUNT, "grab", n)
    if p[GRAB_KIND] != 0 or hb_get_u32(p + GRAB_PAD) != 0:
        raise_check(RECORD_RESERVED, "grab", n)
    return (amount_fen, <int64_t>hb_get_u64(p + GRAB_AT), hb_get_u16(p + GRAB_SHARE_INDEX), p[GRAB_FLAGS],
            PyBytes_FromStringAndSize(<const char *>p + GRAB_DIGEST, GRAB_DIGEST_SIZE))


# ---------------------------------------------------------------- transfer

cdef inline int _need_field(str name, bytes value) except -1:
    if PyBytes_GET_SIZE(value) > XFER_FIELD_MAX:
        raise ValueError(f"{name} is {PyBytes_GET_SIZE(value)} bytes, over {XFER_FIELD_MAX}")
    return 0


def pack_transfer(amount_fen, created_at_ms, kind, debit_account, credit_account, ref):
    """Transfer record: 20-byte header then debit, credit and ref (each <= 255 bytes)."""
    return _pack_transfer(as_i64(amount_fen), as_i64(created_at_ms), as_i64(kind),
                          _need_bytes("debit_account", debit_account),
                          _need_bytes("credit_account", credit_account),
                          _need_bytes("ref", ref))


cdef bytes _pack_transfer(int64_t amount_fen, int64_t created_at_ms, int64_t kind,
                          bytes debit_account, bytes credit_account, bytes ref):
    _need_range("amount_fen", amount_fen, 1, 0x7FFFFFFFFFFFFFFF)
    _need_range("kind", kind, 0, 255)
    _need_field("debit_account", debit_account)
    _need_field("credit_account", credit_account)
    _need_field("ref", ref)
    cdef Py_ssize_t nd = PyBytes_GET_SIZE(debit_account)
    cdef Py_ssize_t nc = PyBytes_GET_SIZE(credit_account)
    cdef Py_ssize_t nr = PyBytes_GET_SIZE(ref)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, XFER_HEADER_SIZE + nd + nc + nr)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    hb_put_u64(p + XFER_AMOUNT, <uint64_t>amount_fen)
    hb_put_u64(p + XFER_CREATED, <uint64_t>created_at_ms)
    p[XFER_KIND] = <uint8_t>kind
    p[XFER_DEBIT_LEN] = <uint8_t>nd
    p[XFER_CREDIT_LEN] = <uint8_t>nc
    p[XFER_REF_LEN] = <uint8_t>nr
    p += XFER_HEADER_SIZE
    memcpy(p, PyBytes_AS_STRING(debit_account), nd)
    memcpy(p + nd, PyBytes_AS_STRING(credit_account), nc)
    memcpy(p + nd + nc, PyBytes_AS_STRING(ref), nr)
    return out


def unpack_transfer(buf):
    """(amount_fen, created_at_ms, kind, debit_account, credit_account, ref), checked."""
    cdef bytes b = _as_bytes(buf)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    if n < XFER_HEADER_SIZE:
        raise_check(RECORD_SHORT, "transfer", n)
    cdef Py_ssize_t nd = p[XFER_DEBIT_LEN], nc = p[XFER_CREDIT_LEN], nr = p[XFER_REF_LEN]
    if n != XFER_HEADER_SIZE + nd + nc + nr:
        raise_check(RECORD_LENGTH, "transfer", n)
    cdef int64_t amount_fen = <int64_t>hb_get_u64(p + XFER_AMOUNT)
    if amount_fen < 1:
        raise_check(RECORD_AMOUNT, "transfer", n)
    cdef const char *body = <const char *>p + XFER_HEADER_SIZE
    return (amount_fen, <int64_t>hb_get_u64(p + XFER_CREATED), p[XFER_KIND],
            PyBytes_FromStringAndSize(body, nd),
            PyBytes_FromStringAndSize(body + nd, nc),
            PyBytes_FromStringAndSize(body + nd + nc, nr))
