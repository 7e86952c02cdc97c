"""Splitting an envelope's total into shares (Cython implementation).

Randomness.  A LUCKY split draws from xoshiro256** (Blackman and Vigna), a
small, fast generator with 256 bits of state.  The state comes from the seed
bytes through splitmix64:

    x = len(seed)
    for each 8-byte little-endian chunk c of seed (the last one zero-padded):
        x = mix64((x ^ c) + GOLDEN)        (mod 2**64)
    s0..s3 = the next four outputs of splitmix64 started at x

where GOLDEN = 0x9E3779B97F4A7C15 and mix64 is the splitmix64 finaliser.
With no seed, 32 bytes come from os.urandom, so a split cannot be predicted;
an explicit seed reproduces the split exactly, in this module and in the
pure-Python twin alike.  (xoshiro256** is fast, not cryptographic: the
unpredictability comes from the fresh 256-bit kernel seed per envelope, and
the shares are fixed at payment time, so no output is exposed before then.)

Uniform draws in [lo, hi] take the top bits of a 64-bit output and reject
values past the range (bitmask rejection), so there is no modulo bias and no
division; a one-value range consumes no draw.

Money is integer fen throughout; no float is involved.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int64_t, uint64_t

from hotpath._cdefs cimport HB_DEBUG, as_i64

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

from os import urandom as _urandom

MAX_COUNT = C_MAX_COUNT
DEFAULT_MAX_SHARE_FEN = C_DEFAULT_MAX_SHARE_FEN

cdef enum:
    # Shares held on the stack; larger envelopes use the heap.
    _STACK_SHARES = 128
    # From this many shares the split releases the GIL: below it, releasing
    # and re-taking the GIL costs more than the loop it would free.
    _NOGIL_SHARES = 4096

cdef uint64_t _GOLDEN = 0x9E3779B97F4A7C15ULL


cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _rotl(uint64_t x, int k) noexcept nogil:
    return (x << k) | (x >> (64 - k))


cdef void rng_seed(Xoshiro256 *rng, const unsigned char *seed, Py_ssize_t n) noexcept nogil:
    cdef uint64_t x = <uint64_t>n
    cdef uint64_t chunk
    cdef Py_ssize_t i = 0, j
    while i < n:
        chunk = 0
        j = 0
        while j < 8 and i + j < n:
            chunk |= (<uint64_t>seed[i + j]) << (8 * j)
            j += 1
        x = _mix64((x ^ chunk) + _GOLDEN)
        i += 8
    x += _GOLDEN
    rng.s0 = _mix64(x)
    x += _GOLDEN
    rng.s1 = _mix64(x)
    x += _GOLDEN
    rng.s2 = _mix64(x)
    x += _GOLDEN
    rng.s3 = _mix64(x)


cdef uint64_t rng_next(Xoshiro256 *rng) noexcept nogil:
    cdef uint64_t result = _rotl(rng.s1 * 5, 7) * 9
    cdef uint64_t t = rng.s1 << 17
    rng.s2 ^= rng.s0
    rng.s3 ^= rng.s1
    rng.s1 ^= rng.s2
    rng.s0 ^= rng.s3
    rng.s2 ^= t
    rng.s3 = _rotl(rng.s3, 45)
    return result


cdef int64_t rng_between(Xoshiro256 *rng, int64_t lo, int64_t hi) noexcept nogil:
    # Callers guarantee lo <= hi.
    cdef uint64_t span = <uint64_t>(hi - lo)   # number of values - 1
    cdef uint64_t r
    cdef int shift
    if span == 0:
        return lo
    shift = __builtin_clzll(span)   # keep exactly bit_length(span) top bits
    while True:
        r = rng_next(rng) >> shift
        if r <= span:
            return lo + <int64_t>r



cdef void lucky_fill(Xoshiro256 *rng, int64_t total_fen, Py_ssize_t count,
                     int64_t max_share_fen, int64_t *out) noexcept nogil:
    cdef int64_t remaining = total_fen
    cdef int64_t left, lo, hi, share
    cdef Py_ssize_t i
    for i in range(count - 1):
        left = count - i
        # Base range [1, 2*remaining/left], clamped so the shares still to
        # come can each get at least 1 fen and at most max_share_fen.
        lo = remaining - max_share_fen * (left - 1)
        if lo < 1:
            lo = 1
        hi = 2 * remaining // left
        if hi > max_share_fen:
            hi = max_share_fen
        if hi > remaining - (left - 1):
            hi = remaining - (left - 1)
        if hi < lo:
            hi = lo
        share = rng_between(rng, lo, hi)
        out[i] = share
        remaining -= share
    out[count - 1] = remaining


cdef int check_split_args(int64_t total_fen, Py_ssize_t count, int64_t max_share_fen,
                          Py_ssize_t max_count) except -1:
    if max_count < 1 or max_count > C_MAX_COUNT_LIMIT:
        raise ValueError(f"max_count must be in 1..{C_MAX_COUNT_LIMIT}, got {max_count}")
    if count < 1 or count > max_count:
        raise ValueError(f"count must be in 1..{max_count}, got {count}")
    if max_share_fen < 1 or max_share_fen > C_SHARE_LIMIT_FEN:
        raise ValueError(
            f"max_share_fen must be in 1..{C_SHARE_LIMIT_FEN}, got {max_share_fen}")
    if total_fen < count:
        raise ValueError(
            f"total_fen {total_fen} is below count {count}: every share needs at least 1 fen")
    # No overflow: max_share_fen < 2**31 and count < 2**16.
    if total_fen > max_share_fen * count:
        raise ValueError(
            f"total_fen {total_fen} exceeds max_share_fen {max_share_fen} x count {count}: "
            f"some share would be over the cap")
    return 0


cdef int _verify(const int64_t *shares, Py_ssize_t count, int64_t total_fen,
                 int64_t max_share_fen) except -1:
    # Debug builds only: the split's contract, checked on every result.
    cdef int64_t total = 0
    cdef Py_ssize_t i
    for i in range(count):
        assert 1 <= shares[i] <= max_share_fen, "share out of bounds"
        total += shares[i]
    assert total == total_fen, "shares do not sum to total_fen"
    return 0


cdef list _to_list(const int64_t *shares, Py_ssize_t count):
    cdef list result = PyList_New(count)
    cdef object item
    cdef Py_ssize_t i
    for i in range(count):
        item = PyLong_FromLongLong(shares[i])
        Py_INCREF(item)   # PyList_SET_ITEM steals a reference
        PyList_SET_ITEM(result, i, item)
    return result


def split_lucky(total_fen, Py_ssize_t count, max_share_fen=C_DEFAULT_MAX_SHARE_FEN,
                bytes seed=None, *, Py_ssize_t max_count=C_MAX_COUNT):
    """Split total_fen into count random shares by the double-mean rule.

    Each share but the last is uniform in [1, 2*remaining/left], clamped so
    that every later share can still be between 1 and max_share_fen; the last
    takes the rest.  seed=None draws 32 bytes from os.urandom; the same seed
    gives the same shares here and in the pure-Python twin.
    """
    cdef int64_t total = as_i64(total_fen), cap = as_i64(max_share_fen)
    check_split_args(total, count, cap, max_count)
    if seed is None:
        seed = _urandom(C_SEED_BYTES)
    cdef Xoshiro256 rng
    rng_seed(&rng, <const unsigned char *>PyBytes_AS_STRING(seed), PyBytes_GET_SIZE(seed))

    cdef int64_t stack_shares[_STACK_SHARES]
    cdef int64_t *shares = stack_shares
    if count > _STACK_SHARES:
        shares = <int64_t *>PyMem_Malloc(count * sizeof(int64_t))
        if shares == NULL:
            raise MemoryError()
    try:
        if count >= _NOGIL_SHARES:
            with nogil:
                lucky_fill(&rng, total, count, cap, shares)
        else:
            lucky_fill(&rng, total, count, cap, shares)
        if HB_DEBUG:
            _verify(shares, count, total, cap)
        return _to_list(shares, count)
    finally:
        if shares != stack_shares:
            PyMem_Free(shares)


def split_normal(total_fen, Py_ssize_t count, max_share_fen=C_DEFAULT_MAX_SHARE_FEN, *,
                 Py_ssize_t max_count=C_MAX_COUNT):
    """Split total_fen into count equal shares; total_fen must divide evenly."""
    cdef int64_t total = as_i64(total_fen)
    check_split_args(total, count, as_i64(max_share_fen), max_count)
    if total % count != 0:
        raise ValueError(f"total_fen {total} does not divide evenly into {count} shares")
    # One int object repeated: equal shares, and ints are immutable.
    return [total // count] * count
