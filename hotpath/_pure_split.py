"""Splitting an envelope's total into shares (pure-Python twin of _split.pyx).

The reference implementation: same PRNG (xoshiro256** seeded through
splitmix64, see _split.pyx for the exact derivation), same draws, same
validation and messages, so an explicit seed gives identical shares in both.
"""

import os
from operator import index as _index

MAX_COUNT = 100
DEFAULT_MAX_SHARE_FEN = 20000
_MAX_COUNT_LIMIT = 65535  # count is a uint16 in the envelope record
_SHARE_LIMIT_FEN = 2147483647  # a share is an int32 in the envelope record
_SEED_BYTES = 32

_M64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _i64(value):
    """Mirror Cython's int64 argument conversion: TypeError or OverflowError."""
    value = _index(value)
    if not _I64_MIN <= value <= _I64_MAX:
        raise OverflowError(f"{value} does not fit in int64")
    return value


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class _Xoshiro256:
    __slots__ = ("s0", "s1", "s2", "s3")

    def __init__(self, seed):
        x = len(seed)
        for i in range(0, len(seed), 8):
            chunk = int.from_bytes(seed[i:i + 8], "little")
            x = _mix64(((x ^ chunk) + _GOLDEN) & _M64)
        state = []
        for _ in range(4):
            x = (x + _GOLDEN) & _M64
            state.append(_mix64(x))
        self.s0, self.s1, self.s2, self.s3 = state

    def next(self):
        s0, s1, s2, s3 = self.s0, self.s1, self.s2, self.s3
        r = (s1 * 5) & _M64
        result = ((((r << 7) | (r >> 57)) & _M64) * 9) & _M64
        t = (s1 << 17) & _M64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = ((s3 << 45) | (s3 >> 19)) & _M64
        self.s0, self.s1, self.s2, self.s3 = s0, s1, s2, s3
        return result

    def between(self, lo, hi):
        span = hi - lo
        if span == 0:
            return lo
        shift = 64 - span.bit_length()
        while True:
            r = self.next() >> shift
            if r <= span:
                return lo + r


def _check_split_args(total_fen, count, max_share_fen, max_count):
    if max_count < 1 or max_count > _MAX_COUNT_LIMIT:
        raise ValueError(f"max_count must be in 1..{_MAX_COUNT_LIMIT}, got {max_count}")
    if count < 1 or count > max_count:
        raise ValueError(f"count must be in 1..{max_count}, got {count}")
    if max_share_fen < 1 or max_share_fen > _SHARE_LIMIT_FEN:
        raise ValueError(
            f"max_share_fen must be in 1..{_SHARE_LIMIT_FEN}, got {max_share_fen}")
    if total_fen < count:
        raise ValueError(
            f"total_fen {total_fen} is below count {count}: every share needs at least 1 fen")
    if total_fen > max_share_fen * count:
        raise ValueError(
            f"total_fen {total_fen} exceeds max_share_fen {max_share_fen} x count {count}: "
            f"some share would be over the cap")


def split_lucky(total_fen, count, max_share_fen=DEFAULT_MAX_SHARE_FEN, seed=None, *,
                max_count=MAX_COUNT):
    """Split total_fen into count random shares by the double-mean rule.

    Each share but the last is uniform in [1, 2*remaining/left], clamped so
    that every later share can still be between 1 and max_share_fen; the last
    takes the rest.  seed=None draws 32 bytes from os.urandom; the same seed
    gives the same shares here and in the Cython implementation.
    """
    total_fen, count = _i64(total_fen), _i64(count)
    max_share_fen, max_count = _i64(max_share_fen), _i64(max_count)
    if seed is not None and type(seed) is not bytes:
        raise TypeError(f"seed must be bytes or None, not {type(seed).__name__}")
    _check_split_args(total_fen, count, max_share_fen, max_count)
    rng = _Xoshiro256(os.urandom(_SEED_BYTES) if seed is None else seed)
    shares = []
    remaining = total_fen
    for i in range(count - 1):
        left = count - i
        lo = max(1, remaining - max_share_fen * (left - 1))
        hi = min(2 * remaining // left, max_share_fen, remaining - (left - 1))
        hi = max(hi, lo)
        share = rng.between(lo, hi)
        shares.append(share)
        remaining -= share
    shares.append(remaining)
    return shares


def split_normal(total_fen, count, max_share_fen=DEFAULT_MAX_SHARE_FEN, *,
                 max_count=MAX_COUNT):
    """Split total_fen into count equal shares; total_fen must divide evenly."""
    total_fen, count = _i64(total_fen), _i64(count)
    max_share_fen, max_count = _i64(max_share_fen), _i64(max_count)
    _check_split_args(total_fen, count, max_share_fen, max_count)
    if total_fen % count != 0:
        raise ValueError(
            f"total_fen {total_fen} does not divide evenly into {count} shares")
    return [total_fen // count] * count
