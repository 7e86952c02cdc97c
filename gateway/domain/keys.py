"""Every name the books use: tables, account names, transfer ids, record keys, ids.

Defined once here, above any backend, so the money rules, the audit and every
storage backend agree on them. Keys are bytes; numbers in keys are big-endian
fixed width so that byte order is numeric order.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import struct
from collections.abc import Callable, Iterator

# -- tables ---------------------------------------------------------------------------
ACCOUNTS = "accounts"  # account name -> int64 balance
TRANSFERS = "transfers"  # transfer id -> amount, time, kind, debit, credit, reference
ENVELOPES = "envelopes"  # envelope id -> header + pre-split shares
ENV_META = "env_meta"  # envelope id -> JSON: sender, greeting, best luck, payment
GRABS = "grabs"  # grab key -> amount, time, share index, flags, request digest
IDEM = "idem"  # idempotency key -> fingerprint + first result
PAYMENTS = "payments"  # payment id -> JSON payment intent
WALLET_TX = "wallet_tx"  # user \0 seq -> kind, amount, time, ids
CREDIT_OUTBOX = "bus:credit"  # seq -> grab key: credits still to apply
EXPIRY = "expiry"  # expiry ms + envelope id -> empty (the sweeper's queue)
META = "meta"  # counter name -> value
NOTIFICATIONS = "notifications"  # user \0 seq -> kind, amount, time, ids, message
RESOLVE = "resolve"  # due ms + payment id -> empty (the resolver's queue)
XCREDIT_OUTBOX = "bus:xcredit"  # seq -> a credit for a user of another SET (the relay's queue)
# Slot handoff (cluster mode): the old owner's outbox of exported chunks, its record of what
# left, and the new owner's record of the chunks it applied.
MIGRATE_OUTBOX = "bus:migrate"  # seq -> to SET \0 a chunk of moved slots' data
MOVED = "moved"  # old owner: m\0 move id -> export summary; e\0 envelope, u\0 user -> move
# id \0 new owner (what left, and where to: a late credit for a moved user is sent on)
MIGRATED = "migrated"  # new owner: move id \0 chunk number -> chunk count

CARDS = "cards"  # user -> the user's bound cards, most preferred first (JSON list)

TABLES = (ACCOUNTS, TRANSFERS, ENVELOPES, ENV_META, GRABS, IDEM, PAYMENTS, WALLET_TX,
          CREDIT_OUTBOX, EXPIRY, META, NOTIFICATIONS, RESOLVE, XCREDIT_OUTBOX, MIGRATE_OUTBOX,
          MOVED, MIGRATED, CARDS)
# The tables whose rows a slot handoff carries to the new owner (a chunk names them by index,
# so the order is part of the chunk format: append only).
# A MOVED row in a chunk names a user or envelope arriving: the new owner drops its own
# marker for it (the slot may be coming back).
MIGRATABLE = (WALLET_TX, NOTIFICATIONS, IDEM, PAYMENTS, ENVELOPES, ENV_META, GRABS, EXPIRY,
              MOVED, CARDS)

SEQ = b"seq"  # META: the last sequence number handed out (wallet entries, notices, outbox)

_BE64 = struct.Struct(">Q")
BE64_MAX = (1 << 64) - 1


def be64(n: int) -> bytes:
    return _BE64.pack(n)


def unbe64(raw: bytes) -> int:
    return _BE64.unpack(raw[:8])[0]


# -- accounts -------------------------------------------------------------------------
# The one-letter prefixes are part of the stored format; the audit reads them back.
WALLET, PENDING, ESCROW, CLEARING, HOLD = b"w:", b"p:", b"e:", b"c:", b"h:"
# Inter-SET clearing (cluster mode): on a SET, x:<set> is what its grabs and photo unlocks
# owe the users of <set> (credits sent); on <set>, x:<that SET> goes negative by what it
# received. The two sum to zero once every credit in flight has landed.
INTERSET = b"x:"


def wallet_account(user: bytes) -> bytes:
    return WALLET + user


def pending_account(user: bytes) -> bytes:
    """Grabbed money on its way to the wallet (the credit outbox's balance)."""
    return PENDING + user


def escrow_account(env: bytes) -> bytes:
    return ESCROW + env


def clearing_account(bank: bytes) -> bytes:
    """The bank's side of card payments: the only account that may go negative."""
    return CLEARING + bank


def hold_account(payment: bytes) -> bytes:
    """Money of a withdrawal in flight: out of the wallet, not yet at the bank."""
    return HOLD + payment


def interset_account(set_name: bytes) -> bytes:
    return INTERSET + set_name


def may_go_negative(account: bytes) -> bool:
    return account.startswith(CLEARING) or account.startswith(INTERSET)


# -- transfer ids -----------------------------------------------------------------------

def send_tid(env: bytes) -> bytes:
    """Wallet -> escrow of a balance-paid envelope."""
    return b"s:" + env


def grab_tid(env: bytes, index: int) -> bytes:
    """Escrow -> pending credit, for share ``index``."""
    return b"g:" + env + b":" + str(index).encode()


def credit_tid(env: bytes, index: int) -> bytes:
    """Pending credit -> wallet, for share ``index``."""
    return b"c:" + env + b":" + str(index).encode()


def expiry_tid(env: bytes) -> bytes:
    """Escrow -> sender's wallet: the unclaimed rest of an expired envelope."""
    return b"x:" + env


def card_in_tid(payment: bytes) -> bytes:
    """Clearing -> wallet (top-up) or escrow (card-paid envelope)."""
    return b"t:" + payment


def withdraw_hold_tid(payment: bytes) -> bytes:
    """Wallet -> hold, when a withdrawal starts."""
    return b"w:" + payment


def payout_tid(payment: bytes) -> bytes:
    """Hold -> clearing, when the bank paid a withdrawal out."""
    return b"o:" + payment


def reversal_tid(payment: bytes) -> bytes:
    """Hold -> wallet, when a withdrawal did not happen."""
    return b"r:" + payment


UNLOCK_TID = b"u:"


def unlock_tid(unlock: bytes) -> bytes:
    """Viewer's wallet -> owner's wallet, for a paid Moments photo unlock (cluster mode, an
    owner of another SET: viewer's wallet -> x:<home> here, x:<from> -> owner's wallet there)."""
    return UNLOCK_TID + unlock


MOVE_TID = b"m:"


def move_tid(move_id: bytes, what: bytes, name: bytes) -> bytes:
    """A slot handoff's money: ``m:<move>:w:<user>`` (wallet -> x:<new owner>) or
    ``m:<move>:e:<envelope>`` (escrow -> x:<new owner>), and the same id x:<old> -> the
    account on the new owner."""
    assert what in (b"w", b"e"), what
    return MOVE_TID + move_id + b":" + what + b":" + name


def forward_tid(tid: bytes) -> bytes:
    """A credit that reached this SET for a user whose slot it handed off, sent on to the
    new owner (wallet -> x:<new owner>) after it was booked here under ``tid``."""
    return b"fw:" + tid


# -- record keys --------------------------------------------------------------------------

def grab_key(env: bytes, user: bytes) -> bytes:
    return env + b"/" + user


def split_grab_key(key: bytes) -> tuple[bytes, bytes]:
    env, user = key.split(b"/", 1)
    return env, user


def grabs_prefix(env: bytes) -> bytes:
    return env + b"/"


def send_idem_key(user: bytes, request_id: bytes) -> bytes:
    return b"send\0" + user + b"\0" + request_id


UNLOCK_IDEM = b"unlock\0"


def unlock_idem_key(user: bytes, request_id: bytes) -> bytes:
    """IDEM: a paid photo unlock, by (viewer, request id); free unlocks have no record."""
    return UNLOCK_IDEM + user + b"\0" + request_id


def split_unlock_idem_key(key: bytes) -> tuple[bytes, bytes]:
    """(viewer, request id) of an unlock record's key."""
    user, request_id = key[len(UNLOCK_IDEM):].split(b"\0", 1)
    return user, request_id


def send_idem_prefix(user: bytes) -> bytes:
    return b"send\0" + user + b"\0"


def unlock_idem_prefix(user: bytes) -> bytes:
    return UNLOCK_IDEM + user + b"\0"


def move_record_key(move_id: bytes) -> bytes:
    """MOVED: a finished export, so a second call with its id changes nothing."""
    return b"m\0" + move_id


def moved_key(what: bytes, name: bytes) -> bytes:
    """MOVED: ``e`` an envelope or ``u`` a user that left this SET, -> move id \0 new owner."""
    assert what in (b"e", b"u"), what
    return what + b"\0" + name


def chunk_id(move_id: str, n: int) -> str:
    return f"{move_id}:{n}"


def applied_chunk_key(move_id: bytes, n: int) -> bytes:
    """MIGRATED: chunk ``n`` of a move, applied here (value: the move's chunk count)."""
    return move_id + b"\0" + be64(n)


def user_seq_key(user: bytes, seq: int) -> bytes:
    """WALLET_TX and NOTIFICATIONS: a user's entries in sequence order."""
    return user + b"\0" + be64(seq)


def user_prefix(user: bytes) -> bytes:
    return user + b"\0"


def due_key(due_ms: int, ident: bytes) -> bytes:
    """EXPIRY and RESOLVE: entries in due-time order."""
    return be64(due_ms) + ident


# -- ids ------------------------------------------------------------------------------------

# Where ids and split seeds come from: the kernel, except inside a seeded simulation
# (``gateway.sim``), which replaces it for the length of a run to make the run replayable.
_entropy: Callable[[int], bytes] = secrets.token_bytes


# -- placement -------------------------------------------------------------------------
# A cluster spreads users over SLOTS slots (gateway.cluster maps slots to SETs); the
# embedded mode computes the same slots and ignores them.
SLOTS = 1024


def slot_of(user_id: str) -> int:
    """The user's slot: a stable hash (blake2b; Python's own hash is salted per process)."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOTS


def new_envelope_id(sender_id: str) -> str:
    """``env_`` + the sender's slot (3 hex digits) + 80 random bits (20 hex digits).

    The slot says which SET holds the envelope, so any node routes a grab without a
    lookup; the random part keeps it unguessable, so nobody can grab an envelope not
    shared with them.
    """
    return f"env_{slot_of(sender_id):03x}{_entropy(10).hex()}"


def envelope_slot(envelope_id: str) -> int | None:
    """The slot an envelope id carries; None for ids made before ids carried one
    (``env_`` + 20 hex digits), which stay on the SET that made them."""
    if len(envelope_id) != 27:
        return None
    slot = int(envelope_id[4:7], 16)
    return slot if slot < SLOTS else None


def split_seed() -> bytes | None:
    """The seed of an envelope's share split: None (hotpath draws 32 kernel bytes), or the
    simulation's seeded bytes."""
    return None if _entropy is secrets.token_bytes else _entropy(32)


@contextlib.contextmanager
def seeded_entropy(source: Callable[[int], bytes]) -> Iterator[None]:
    """Draws ids and split seeds from ``source`` inside the block (simulations only)."""
    global _entropy
    saved, _entropy = _entropy, source
    try:
        yield
    finally:
        _entropy = saved


def payment_id_for(user_id: str, kind: str, request_id: str) -> str:
    """Deterministic, so a retry after a crash reuses the bank order id (the bank dedups it)."""
    digest = hashlib.blake2b(f"{kind}\0{user_id}\0{request_id}".encode(), digest_size=10)
    return "pay_" + digest.hexdigest()


def unlock_id(viewer_id: str, request_id: str, *, free: bool) -> str:
    """A photo unlock's id, deterministic from (viewer, request id).

    ``unl_`` for a paid unlock (its transfer is ``u:<id>``), ``free_`` for a
    free one: the same hash, so the two never collide and either says which it
    was.
    """
    digest = hashlib.blake2b(f"photo_unlock\0{viewer_id}\0{request_id}".encode(),
                             digest_size=10)
    return ("free_" if free else "unl_") + digest.hexdigest()


def request_digest(request_id: str) -> bytes:
    """What a grab record keeps of its request id, to tell a retry from another request."""
    return hashlib.blake2b(request_id.encode(), digest_size=16).digest()


def fingerprint(*parts: object) -> bytes:
    """What a request asked for, so a reused request_id with another payload is caught."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
