# C-level contract of hotpath._split: the PRNG and the share generators.
# Other Cython modules may cimport these; all run without the GIL.

from libc.stdint cimport int64_t, uint64_t

cdef enum:
    C_MAX_COUNT = 100                # default bound on shares per envelope
    C_MAX_COUNT_LIMIT = 65535        # count is a uint16 in the envelope record
    C_DEFAULT_MAX_SHARE_FEN = 20000  # 200 yuan, the product default
    C_SHARE_LIMIT_FEN = 2147483647   # a share is an int32 in the envelope record
    C_SEED_BYTES = 32                # os.urandom bytes drawn when no seed is given

# xoshiro256** state; never all zero (seeded through splitmix64).
cdef struct Xoshiro256:
    uint64_t s0
    uint64_t s1
    uint64_t s2
    uint64_t s3

cdef void rng_seed(Xoshiro256 *rng, const unsigned char *seed, Py_ssize_t n) noexcept nogil
cdef uint64_t rng_next(Xoshiro256 *rng) noexcept nogil
cdef int64_t rng_between(Xoshiro256 *rng, int64_t lo, int64_t hi) noexcept nogil

# Fills out[0:count] by the double-mean rule; arguments must already be valid
# (check_split_args), so it cannot fail.
cdef void lucky_fill(Xoshiro256 *rng, int64_t total_fen, Py_ssize_t count,
                     int64_t max_share_fen, int64_t *out) noexcept nogil

cdef int check_split_args(int64_t total_fen, Py_ssize_t count, int64_t max_share_fen,
                          Py_ssize_t max_count) except -1
