# C-level contract of hotpath._gate: the per-envelope gate state and the
# lock-free operations on it.  Every function here is safe to call without
# the GIL from many threads at once, as long as the caller keeps the owning
# _TrackedEnvelope alive (the struct lives inside it).

from libc.stdint cimport int64_t, uint64_t

cdef enum GateAnswer:
    ANSWER_SOLD_OUT = -1    # sticky sold-out flag is set
    ANSWER_ALREADY = -2     # this user's hash is already marked
    ANSWER_UNTRACKED = -3   # the gate knows nothing about the envelope

cdef enum MarkResult:
    MARK_ADDED = 0
    MARK_PRESENT = 1
    MARK_TABLE_FULL = 2     # no empty slot left: treat the user as new

cdef enum:
    GATE_MIN_CAPACITY = 8
    GATE_MAX_COUNT = 65535  # count is a uint16 in the envelope record

cdef extern from *:
    """
    #define HB_SLOT_EMPTY 0ULL
    #define HB_SLOT_TOMBSTONE 0xFFFFFFFFFFFFFFFFULL
    """
    const uint64_t HB_SLOT_EMPTY       # never written by a user
    const uint64_t HB_SLOT_TOMBSTONE   # a released mark; probing continues past it

cdef struct EnvelopeGate:
    int64_t count
    int64_t reserved   # atomic: provisional slots handed out (minus releases)
    int64_t sold_out   # atomic: 0, or 1 once sold out (never reset)
    uint64_t mask      # table capacity - 1; capacity is a power of two >= 2*count
    uint64_t *table    # atomic slots: EMPTY, TOMBSTONE or a user hash

cdef uint64_t user_hash(const unsigned char *key, Py_ssize_t n) noexcept nogil
cdef MarkResult mark_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil
cdef bint has_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil
cdef bint release_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil
cdef int64_t admit_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil
cdef void raise_reserved(EnvelopeGate *gate, int64_t claimed) noexcept nogil

cdef class _TrackedEnvelope:
    cdef EnvelopeGate gate
    cdef readonly bytes key
    cdef int busy               # admit_many calls probing the table without the GIL
    cdef int drop_table_if_sold_out(self) except -1

cdef class GrabGate:
    cdef dict _envelopes        # envelope key -> _TrackedEnvelope
    cdef object _order          # deque of _TrackedEnvelope, oldest first (may hold stale ones)
    cdef readonly Py_ssize_t max_envelopes
    cdef EnvelopeGate *_find(self, bytes envelope_key) noexcept
    cdef int _evict(self) except -1
    cdef int _track(self, bytes envelope_key, int64_t count, int64_t claimed, bint sold_out,
                    object users) except -1
