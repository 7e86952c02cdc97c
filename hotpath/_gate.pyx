"""The grab gate: a lock-free, in-memory filter in front of the LMDB writer.

It answers SOLD_OUT and ALREADY_GRABBED without a trip to the single writer,
and hands out provisional share slots with an atomic fetch-add.  It caches
only facts that never change back (an envelope is sold out; a user has
grabbed), so it stays correct when several worker processes each keep their
own gate for the same envelope: LMDB is the source of truth and the writer
assigns the real share from it.

Per envelope the state is a C struct (EnvelopeGate) with the share count, an
atomic `reserved` counter, an atomic sticky sold-out flag and an open-address
table of 64-bit user hashes, linear probing, inserted by compare-and-swap.
Once an envelope is sold out every admit answers SOLD_OUT without looking at
its users, so the table (16 B per share: 2 KiB for 100 shares) is freed and
the struct keeps only the flag: a gate full of finished envelopes costs their
dict entries, not their tables.  The table goes only under the GIL and only
while no admit_many is probing it without the GIL (``busy``).
Slots go EMPTY -> hash -> TOMBSTONE and never back, which is what makes the
lock-free insert correct: two admits of one user probe the same sequence and
race for the same first empty slot, so exactly one of them wins.

User keys are hashed with FNV-1a 64 plus a murmur3 finaliser.  Collisions are
harmless by design: a colliding user gets a false ALREADY, which the caller
re-checks against LMDB; a hash never makes the gate hand out money.

The key -> struct map is a dict guarded by the GIL; the struct operations use
C11/GCC atomics so they stay correct without the GIL (admit_many releases it
for large batches; other Cython code may cimport them).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free

from hotpath._cdefs cimport (
    HB_DEBUG,
    as_i64,
    hb_cas_i64,
    hb_cas_u64,
    hb_fetch_add_i64,
    hb_hash64,
    hb_load_i64,
    hb_load_u64,
    hb_store_i64,
)

from collections import deque

GATE_SOLD_OUT = ANSWER_SOLD_OUT
GATE_ALREADY = ANSWER_ALREADY
GATE_UNTRACKED = ANSWER_UNTRACKED

cdef enum:
    # admit_many releases the GIL from this many users; below it the
    # release/re-acquire costs more than the probing it frees.
    _NOGIL_BATCH = 64


cdef uint64_t user_hash(const unsigned char *key, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = hb_hash64(key, n)
    # The two reserved slot values are never user hashes.
    if h == HB_SLOT_EMPTY:
        return 1
    if h == HB_SLOT_TOMBSTONE:
        return HB_SLOT_TOMBSTONE - 1
    return h


cdef inline uint64_t _key_hash(bytes key) noexcept:
    return user_hash(<const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef MarkResult mark_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil:
    cdef uint64_t i = h & gate.mask
    cdef uint64_t probes, seen
    if gate.table == NULL:
        return MARK_TABLE_FULL   # sold out: nothing is kept
    for probes in range(gate.mask + 1):
        seen = hb_load_u64(&gate.table[i])
        if seen == HB_SLOT_EMPTY:
            if hb_cas_u64(&gate.table[i], HB_SLOT_EMPTY, h):
                return MARK_ADDED
            # Lost the race for this slot: if the winner was this same user,
            # the user is already in; otherwise keep probing.
            seen = hb_load_u64(&gate.table[i])
        if seen == h:
            return MARK_PRESENT
        i = (i + 1) & gate.mask
    return MARK_TABLE_FULL


cdef bint has_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil:
    cdef uint64_t i = h & gate.mask
    cdef uint64_t probes, seen
    if gate.table == NULL:
        return False
    for probes in range(gate.mask + 1):
        seen = hb_load_u64(&gate.table[i])
        if seen == h:
            return True
        if seen == HB_SLOT_EMPTY:
            return False
        i = (i + 1) & gate.mask
    return False


cdef bint release_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil:
    # Tombstone (not empty) the user's slot so later probes still walk past
    # it, then give the provisional slot back.  Only a removed mark gives a
    # slot back, so a repeated or stray release cannot drive `reserved` down.
    cdef uint64_t i = h & gate.mask
    cdef uint64_t probes, seen
    cdef int64_t reserved
    if gate.table == NULL:
        return False
    for probes in range(gate.mask + 1):
        seen = hb_load_u64(&gate.table[i])
        if seen == HB_SLOT_EMPTY:
            return False
        if seen == h:
            if not hb_cas_u64(&gate.table[i], h, HB_SLOT_TOMBSTONE):
                return False   # a concurrent release of the same user won
            while True:
                reserved = hb_load_i64(&gate.reserved)
                if reserved <= 0 or hb_cas_i64(&gate.reserved, reserved, reserved - 1):
                    return True
        i = (i + 1) & gate.mask
    return False


cdef int64_t admit_hash(EnvelopeGate *gate, uint64_t h) noexcept nogil:
    if hb_load_i64(&gate.sold_out):
        return ANSWER_SOLD_OUT
    if mark_hash(gate, h) == MARK_PRESENT:
        return ANSWER_ALREADY
    # MARK_ADDED, or MARK_TABLE_FULL (answered as a new user; the writer decides).
    return hb_fetch_add_i64(&gate.reserved, 1)


cdef void raise_reserved(EnvelopeGate *gate, int64_t claimed) noexcept nogil:
    cdef int64_t reserved
    while True:
        reserved = hb_load_i64(&gate.reserved)
        if reserved >= claimed or hb_cas_i64(&gate.reserved, reserved, claimed):
            return


cdef int _check_marked_once(EnvelopeGate *gate, uint64_t h) except -1:
    # Debug builds only: a user hash is live in at most one slot (the
    # invariant the lock-free insert relies on).  O(capacity) per call.
    cdef uint64_t i, seen = 0
    if gate.table == NULL:
        return 0
    for i in range(gate.mask + 1):
        if hb_load_u64(&gate.table[i]) == h:
            seen += 1
    assert seen <= 1, "user hash marked twice"
    return 0


cdef class _TrackedEnvelope:
    """Owns one envelope's EnvelopeGate struct and its hash table."""

    def __cinit__(self, bytes key not None, int64_t count):
        cdef uint64_t capacity = GATE_MIN_CAPACITY
        while capacity < <uint64_t>(2 * count):
            capacity <<= 1
        self.gate.table = <uint64_t *>calloc(capacity, sizeof(uint64_t))
        if self.gate.table == NULL:
            raise MemoryError()
        self.gate.mask = capacity - 1
        self.gate.count = count
        self.gate.reserved = 0
        self.gate.sold_out = 0
        self.busy = 0
        self.key = key

    cdef int drop_table_if_sold_out(self) except -1:
        # Under the GIL; an admit_many probing without it holds `busy` up.
        if self.busy == 0 and self.gate.table != NULL and hb_load_i64(&self.gate.sold_out):
            free(self.gate.table)
            self.gate.table = NULL
        return 0

    def __dealloc__(self):
        free(self.gate.table)


cdef class GrabGate:
    """Per-process cache of sticky grab facts with lock-free slot claims.

    admit() returns GATE_SOLD_OUT (-1), GATE_ALREADY (-2), GATE_UNTRACKED (-3)
    or the provisional slot, which may be >= count ("oversubscribed"; the
    caller still forwards it to the writer, which is authoritative).  A false
    GATE_ALREADY is possible on a 64-bit hash collision; callers re-check it
    against LMDB.  At most max_envelopes envelopes are tracked; beyond that
    the oldest tracked one is forgotten (FIFO), which only loses cached facts.
    """

    def __init__(self, Py_ssize_t max_envelopes=100_000):
        if max_envelopes < 1:
            raise ValueError(f"max_envelopes must be >= 1, got {max_envelopes}")
        self.max_envelopes = max_envelopes
        self._envelopes = {}
        self._order = deque()

    cdef EnvelopeGate *_find(self, bytes envelope_key) noexcept:
        # Borrowed: valid while the caller holds the GIL and runs no Python code.
        cdef PyObject *found = PyDict_GetItem(self._envelopes, envelope_key)
        if found == NULL:
            return NULL
        return &(<_TrackedEnvelope>found).gate

    cdef int _evict(self) except -1:
        # The deque may hold envelopes already forgotten or replaced; skip them.
        cdef _TrackedEnvelope oldest
        while len(self._envelopes) > self.max_envelopes:
            oldest = self._order.popleft()
            if self._envelopes.get(oldest.key) is oldest:
                del self._envelopes[oldest.key]
        # forget() leaves stale entries behind; rebuild before they pile up.
        if len(self._order) > 2 * len(self._envelopes) + 64:
            self._order = deque(self._envelopes.values())
        return 0

    def track(self, bytes envelope_key not None, count, claimed=0, sold_out=False, users=()):
        """Register an envelope, or refresh it from LMDB; idempotent.

        `reserved` becomes max(reserved, claimed); the envelope is marked sold
        out if sold_out is true or claimed >= count; every user in `users` is
        marked as having grabbed.
        """
        self._track(envelope_key, as_i64(count), as_i64(claimed), sold_out, users)

    cdef int _track(self, bytes envelope_key, int64_t count, int64_t claimed, bint sold_out,
                    object users) except -1:
        if count < 1 or count > GATE_MAX_COUNT:
            raise ValueError(f"count must be in 1..{GATE_MAX_COUNT}, got {count}")
        if claimed < 0 or claimed > count:
            raise ValueError(f"claimed must be in 0..{count}, got {claimed}")
        cdef _TrackedEnvelope tracked = self._envelopes.get(envelope_key)
        if tracked is None:
            tracked = _TrackedEnvelope(envelope_key, count)
            self._envelopes[envelope_key] = tracked
            self._order.append(tracked)
            self._evict()
        elif tracked.gate.count != count:
            raise ValueError(
                f"envelope tracked with count {tracked.gate.count}, refreshed with {count}")
        raise_reserved(&tracked.gate, claimed)
        if sold_out or claimed >= count:
            hb_store_i64(&tracked.gate.sold_out, 1)
            tracked.drop_table_if_sold_out()
        cdef bytes user_key
        for user_key in users:
            if user_key is None:
                raise TypeError("user keys must be bytes, not None")
            mark_hash(&tracked.gate, _key_hash(user_key))
            if HB_DEBUG:
                _check_marked_once(&tracked.gate, _key_hash(user_key))
        return 0

    def admit(self, bytes envelope_key not None, bytes user_key not None):
        """Claim a provisional slot for a user, or say why not (GATE_* < 0).

        Two concurrent admits of one user: exactly one gets a slot.
        """
        cdef EnvelopeGate *gate = self._find(envelope_key)
        if gate == NULL:
            return ANSWER_UNTRACKED
        cdef uint64_t h = _key_hash(user_key)
        cdef int64_t answer = admit_hash(gate, h)
        if HB_DEBUG:
            _check_marked_once(gate, h)
        return answer

    def admit_many(self, bytes envelope_key not None, user_keys):
        """admit() for a batch of users of one envelope, without the GIL for big batches."""
        cdef list keys = list(user_keys)
        cdef Py_ssize_t n = len(keys), i
        cdef _TrackedEnvelope tracked = self._envelopes.get(envelope_key)
        cdef bytes user_key
        if tracked is None:
            for user_key in keys:   # same type errors as admit()
                if user_key is None:
                    raise TypeError("user keys must be bytes, not None")
            return [ANSWER_UNTRACKED] * n
        cdef uint64_t *hashes = <uint64_t *>PyMem_Malloc((n + 1) * sizeof(uint64_t))
        cdef int64_t *answers = <int64_t *>PyMem_Malloc((n + 1) * sizeof(int64_t))
        cdef list result
        cdef object item
        try:
            if hashes == NULL or answers == NULL:
                raise MemoryError()
            for i in range(n):
                user_key = keys[i]
                if user_key is None:
                    raise TypeError("user keys must be bytes, not None")
                hashes[i] = _key_hash(user_key)
            # `tracked` keeps the struct alive even if another thread forgets it,
            # and `busy` its table while the GIL is released.
            if n >= _NOGIL_BATCH:
                tracked.busy += 1
                try:
                    with nogil:
                        for i in range(n):
                            answers[i] = admit_hash(&tracked.gate, hashes[i])
                finally:
                    tracked.busy -= 1
                tracked.drop_table_if_sold_out()
            else:
                for i in range(n):
                    answers[i] = admit_hash(&tracked.gate, hashes[i])
            result = PyList_New(n)
            for i in range(n):
                item = PyLong_FromLongLong(answers[i])
                Py_INCREF(item)   # PyList_SET_ITEM steals a reference
                PyList_SET_ITEM(result, i, item)
            return result
        finally:
            PyMem_Free(hashes)
            PyMem_Free(answers)

    def release(self, bytes envelope_key not None, bytes user_key not None):
        """Undo an admit the writer refused for a reason that must not stick.

        Removes the user's mark and gives one provisional slot back; a no-op
        if the envelope is untracked or the user is not marked.
        """
        cdef EnvelopeGate *gate = self._find(envelope_key)
        if gate != NULL:
            release_hash(gate, _key_hash(user_key))

    def mark_sold_out(self, bytes envelope_key not None):
        """Set the envelope's sticky sold-out flag (no-op if untracked); frees its users."""
        cdef _TrackedEnvelope tracked = self._envelopes.get(envelope_key)
        if tracked is not None:
            hb_store_i64(&tracked.gate.sold_out, 1)
            tracked.drop_table_if_sold_out()

    def mark_user(self, bytes envelope_key not None, bytes user_key not None):
        """Record that the user has grabbed (no-op if untracked)."""
        cdef EnvelopeGate *gate = self._find(envelope_key)
        if gate != NULL:
            mark_hash(gate, _key_hash(user_key))

    def forget(self, bytes envelope_key not None):
        """Drop everything cached about the envelope (no-op if untracked)."""
        self._envelopes.pop(envelope_key, None)
        if len(self._order) > 2 * len(self._envelopes) + 64:
            self._evict()

    def is_sold_out(self, bytes envelope_key not None):
        """True once the envelope's sticky sold-out flag is set."""
        cdef EnvelopeGate *gate = self._find(envelope_key)
        return gate != NULL and hb_load_i64(&gate.sold_out) != 0

    def table_bytes(self):
        """Bytes of user tables held (sold-out envelopes hold none)."""
        cdef _TrackedEnvelope tracked
        cdef Py_ssize_t total = 0
        for tracked in self._envelopes.values():
            if tracked.gate.table != NULL:
                total += (tracked.gate.mask + 1) * sizeof(uint64_t)
        return total

    def __len__(self):
        return len(self._envelopes)

    def __contains__(self, envelope_key):
        return envelope_key in self._envelopes
