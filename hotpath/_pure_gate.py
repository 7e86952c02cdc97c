"""The grab gate (pure-Python twin of _gate.pyx).

Same behaviour with a dict, sets and one threading.Lock instead of C structs
and atomics.  It keeps the user keys themselves (so it has no hash
collisions) but models the C table's capacity exactly: a table of
max(8, next power of two >= 2*count) slots, where a released mark keeps its
slot (a tombstone), and a full table answers as if the user were new.
"""

import threading
from collections import OrderedDict
from operator import index as _index

from hotpath._pure_split import _i64

GATE_SOLD_OUT = -1
GATE_ALREADY = -2
GATE_UNTRACKED = -3

_MIN_CAPACITY = 8
_MAX_COUNT = 65535


def _need_bytes(value, name):
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


class _TrackedEnvelope:
    __slots__ = ("capacity", "count", "reserved", "sold_out", "used", "users")

    def __init__(self, count):
        capacity = _MIN_CAPACITY
        while capacity < 2 * count:
            capacity <<= 1
        self.capacity = capacity
        self.count = count
        self.reserved = 0
        self.sold_out = False
        self.used = 0          # slots ever filled, tombstones included
        self.users: set[bytes] = set()

    def set_sold_out(self):
        """Sticky; the users are never asked about again, so their set goes."""
        self.sold_out = True
        self.users = set()

    def mark(self, user_key):
        """Return True if the user was already marked."""
        if self.sold_out:
            return False   # nothing is kept once sold out
        if user_key in self.users:
            return True
        if self.used < self.capacity:
            self.users.add(user_key)
            self.used += 1
        return False


class GrabGate:
    """Per-process cache of sticky grab facts; see hotpath._gate.GrabGate."""

    def __init__(self, max_envelopes=100_000):
        max_envelopes = _index(max_envelopes)
        if max_envelopes < 1:
            raise ValueError(f"max_envelopes must be >= 1, got {max_envelopes}")
        self.max_envelopes = max_envelopes
        self._envelopes = OrderedDict()   # oldest tracked first
        self._lock = threading.Lock()

    def track(self, envelope_key, count, claimed=0, sold_out=False, users=()):
        """Register an envelope, or refresh it from LMDB; idempotent."""
        _need_bytes(envelope_key, "envelope_key")
        count, claimed = _i64(count), _i64(claimed)
        if count < 1 or count > _MAX_COUNT:
            raise ValueError(f"count must be in 1..{_MAX_COUNT}, got {count}")
        if claimed < 0 or claimed > count:
            raise ValueError(f"claimed must be in 0..{count}, got {claimed}")
        with self._lock:
            tracked = self._envelopes.get(envelope_key)
            if tracked is None:
                tracked = _TrackedEnvelope(count)
                self._envelopes[envelope_key] = tracked
                while len(self._envelopes) > self.max_envelopes:
                    self._envelopes.popitem(last=False)
            elif tracked.count != count:
                raise ValueError(
                    f"envelope tracked with count {tracked.count}, refreshed with {count}")
            tracked.reserved = max(tracked.reserved, claimed)
            if sold_out or claimed >= count:
                tracked.set_sold_out()
            for user_key in users:
                _need_bytes(user_key, "user key")
                tracked.mark(user_key)

    def admit(self, envelope_key, user_key):
        """Claim a provisional slot for a user, or say why not (GATE_* < 0)."""
        _need_bytes(envelope_key, "envelope_key")
        _need_bytes(user_key, "user_key")
        with self._lock:
            return self._admit(envelope_key, user_key)

    def _admit(self, envelope_key, user_key):
        tracked = self._envelopes.get(envelope_key)
        if tracked is None:
            return GATE_UNTRACKED
        if tracked.sold_out:
            return GATE_SOLD_OUT
        if tracked.mark(user_key):
            return GATE_ALREADY
        slot = tracked.reserved
        tracked.reserved += 1
        return slot

    def admit_many(self, envelope_key, user_keys):
        """admit() for a batch of users of one envelope."""
        _need_bytes(envelope_key, "envelope_key")
        keys = list(user_keys)
        for user_key in keys:
            _need_bytes(user_key, "user key")
        with self._lock:
            return [self._admit(envelope_key, user_key) for user_key in keys]

    def release(self, envelope_key, user_key):
        """Undo an admit the writer refused for a reason that must not stick."""
        _need_bytes(envelope_key, "envelope_key")
        _need_bytes(user_key, "user_key")
        with self._lock:
            tracked = self._envelopes.get(envelope_key)
            if tracked is not None and user_key in tracked.users:
                tracked.users.remove(user_key)   # its slot stays used: a tombstone
                tracked.reserved = max(0, tracked.reserved - 1)

    def mark_sold_out(self, envelope_key):
        """Set the envelope's sticky sold-out flag (no-op if untracked)."""
        _need_bytes(envelope_key, "envelope_key")
        with self._lock:
            tracked = self._envelopes.get(envelope_key)
            if tracked is not None:
                tracked.set_sold_out()

    def mark_user(self, envelope_key, user_key):
        """Record that the user has grabbed (no-op if untracked)."""
        _need_bytes(envelope_key, "envelope_key")
        _need_bytes(user_key, "user_key")
        with self._lock:
            tracked = self._envelopes.get(envelope_key)
            if tracked is not None:
                tracked.mark(user_key)

    def forget(self, envelope_key):
        """Drop everything cached about the envelope (no-op if untracked)."""
        _need_bytes(envelope_key, "envelope_key")
        with self._lock:
            self._envelopes.pop(envelope_key, None)

    def is_sold_out(self, envelope_key):
        """True once the envelope's sticky sold-out flag is set."""
        _need_bytes(envelope_key, "envelope_key")
        with self._lock:
            tracked = self._envelopes.get(envelope_key)
            return tracked is not None and tracked.sold_out

    def table_bytes(self):
        """Bytes the C gate's user tables would hold (sold-out envelopes hold none)."""
        with self._lock:
            return sum(8 * t.capacity for t in self._envelopes.values() if not t.sold_out)

    def __len__(self):
        return len(self._envelopes)

    def __contains__(self, envelope_key):
        return envelope_key in self._envelopes

