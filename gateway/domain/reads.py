"""The ledger's queries: plain functions over one read transaction (any backend)."""

from __future__ import annotations

import dataclasses
import enum
import json

import hotpath
from gateway import errors
from gateway.domain import keys, records
from gateway.domain.model import (
    Balance,
    EnvelopeState,
    EnvelopeView,
    GrabFound,
    GrabView,
    MigrationChunk,
    Notice,
    Payment,
    RemoteCredit,
    SendResult,
    UnlockResult,
    WalletEntry,
    WalletPage,
)
from gateway.domain.store import Tx, scan_prefix


def find_grab(tx: Tx, user_id: str, envelope_id: str) -> GrabFound | None:
    env = envelope_id.encode()
    raw = tx.get(keys.GRABS, keys.grab_key(env, user_id.encode()))
    if raw is None:
        return None
    buf = tx.get(keys.ENVELOPES, env)
    assert buf is not None, envelope_id
    header = hotpath.envelope_header(buf)
    amount, at_ms, index, flags, digest = hotpath.unpack_grab(raw)
    view = GrabView(user_id, amount, at_ms, index, bool(flags & records.GRAB_CREDITED))
    return GrabFound(view, digest, header[4] - header[5])


def envelope_state(tx: Tx, envelope_id: str) -> EnvelopeState | None:
    buf = tx.get(keys.ENVELOPES, envelope_id.encode())
    if buf is None:
        return None
    h = hotpath.envelope_header(buf)
    return EnvelopeState(h[4], h[5], h[7], h[3])


def grabbers(tx: Tx, envelope_id: str) -> list[bytes]:
    prefix = keys.grabs_prefix(envelope_id.encode())
    return [key[len(prefix):] for key, _raw in scan_prefix(tx, keys.GRABS, prefix)]


def get_envelope(tx: Tx, envelope_id: str) -> EnvelopeView:
    env = envelope_id.encode()
    buf = tx.get(keys.ENVELOPES, env)
    if buf is None:
        raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
    raw_meta = tx.get(keys.ENV_META, env)
    assert raw_meta is not None, envelope_id
    meta = records.unpack_env_meta(raw_meta)
    prefix = keys.grabs_prefix(env)
    grabs = []
    for key, raw in scan_prefix(tx, keys.GRABS, prefix):
        amount, at_ms, index, flags, _d = hotpath.unpack_grab(raw)
        grabs.append(GrabView(key[len(prefix):].decode(), amount, at_ms, index,
                              bool(flags & records.GRAB_CREDITED)))
    (total, remaining_fen, created, expires, count, claimed, kind, status, _flags,
     _shares) = hotpath.unpack_envelope(buf)
    grabs.sort(key=lambda g: g.share_index)
    return EnvelopeView(envelope_id, meta["s"], total, count, kind, status, remaining_fen,
                        count - claimed, meta["g"], created, expires, tuple(grabs), meta["b"])


def balance(tx: Tx, user_id: str) -> Balance:
    user = user_id.encode()
    w = tx.get(keys.ACCOUNTS, keys.wallet_account(user))
    p = tx.get(keys.ACCOUNTS, keys.pending_account(user))
    return Balance(0 if w is None else hotpath.unpack_i64(w),
                   0 if p is None else hotpath.unpack_i64(p))


def list_transactions(tx: Tx, user_id: str, page_size: int, before_seq: int | None
                      ) -> WalletPage:
    """Wallet entries newest first; the cursor is the sequence number to continue below."""
    prefix = keys.user_prefix(user_id.encode())
    upper = keys.user_seq_key(user_id.encode(),
                              keys.BE64_MAX if before_seq is None else before_seq)
    entries: list[WalletEntry] = []
    last_seq = None
    for key, raw in tx.scan_back(keys.WALLET_TX, upper):
        if not key.startswith(prefix):
            break
        if len(entries) == page_size:
            return WalletPage(entries, last_seq)
        last_seq = keys.unbe64(key[len(prefix):])
        entries.append(records.unpack_wallet_entry(raw))
    return WalletPage(entries, None)


def get_payment(tx: Tx, payment_id: str) -> Payment | None:
    raw = tx.get(keys.PAYMENTS, payment_id.encode())
    return None if raw is None else records.unpack_payment(raw)[0]


def send_result(tx: Tx, user_id: str, request_id: str, fingerprint: bytes
                ) -> SendResult | None:
    """The first result of a SendEnvelope request id, with the envelope's live status."""
    raw = tx.get(keys.IDEM, keys.send_idem_key(user_id.encode(), request_id.encode()))
    if raw is None:
        return None
    saved_fp, saved = records.unpack_send_result(raw)
    if saved_fp != fingerprint:
        raise errors.InvalidArgument(
            "REQUEST_ID_REUSED", "request_id was used before with another payload")
    buf = tx.get(keys.ENVELOPES, saved.envelope_id.encode())
    if buf is None:
        # An envelope id from before ids carried a slot stays on the SET that made it when
        # its sender's slot moves (see rules.export_slots): the saved status is all here.
        assert keys.envelope_slot(saved.envelope_id) is None, saved.envelope_id
        return saved
    return dataclasses.replace(saved, status=hotpath.envelope_header(buf)[7])


def unlock_result(tx: Tx, viewer_id: str, request_id: str, fingerprint: bytes
                  ) -> UnlockResult | None:
    """The saved result of a paid photo unlock by (viewer, request id), or None."""
    raw = tx.get(keys.IDEM, keys.unlock_idem_key(viewer_id.encode(), request_id.encode()))
    if raw is None:
        return None
    saved_fp, saved, _owner, _photo = records.unpack_unlock(raw)
    if saved_fp != fingerprint:
        raise errors.InvalidArgument(
            "REQUEST_ID_REUSED", "request_id was used before with another payload")
    return saved


def notifications(tx: Tx, user_id: str, after_event_id: int, limit: int) -> list[Notice]:
    """The user's events with ids above ``after_event_id``, oldest first."""
    user = user_id.encode()
    prefix = keys.user_prefix(user)
    start = keys.user_seq_key(user, min(max(after_event_id, 0) + 1, keys.BE64_MAX))
    out: list[Notice] = []
    for key, raw in scan_prefix(tx, keys.NOTIFICATIONS, prefix, start):
        if len(out) >= limit:
            break
        out.append(records.unpack_notice(keys.unbe64(key[len(prefix):]), raw))
    return out


def due_payments(tx: Tx, now_ms: int, limit: int) -> list[str]:
    """Ids of open payments whose resolve time has come, oldest first."""
    out: list[str] = []
    for key, _empty in tx.scan(keys.RESOLVE):
        if keys.unbe64(key) > now_ms or len(out) >= limit:
            break
        out.append(key[8:].decode())
    return out


def credit_backlog(tx: Tx) -> int:
    """Grabs whose credit has not reached a wallet yet."""
    return tx.count(keys.CREDIT_OUTBOX)


def xcredit_outbox(tx: Tx) -> int:
    """Credits for other SETs waiting for the relay (cluster mode; 0 otherwise)."""
    return tx.count(keys.XCREDIT_OUTBOX)


def expiry_due(tx: Tx, now_ms: int) -> bool:
    """True when the first envelope in the expiry queue is due by ``now_ms``."""
    for key, _empty in tx.scan(keys.EXPIRY):
        return keys.unbe64(key) <= now_ms
    return False


def remote_credits_due(tx: Tx, limit: int) -> list[RemoteCredit]:
    """The relay's next credits for other SETs, oldest first."""
    out: list[RemoteCredit] = []
    for key, raw in tx.scan(keys.XCREDIT_OUTBOX):
        out.append(records.unpack_xcredit(keys.unbe64(key), raw))
        if len(out) >= limit:
            break
    return out


def migration_chunks_due(tx: Tx, limit: int) -> list[MigrationChunk]:
    """The shipper's next chunks of moved slots, oldest first."""
    out: list[MigrationChunk] = []
    for key, raw in tx.scan(keys.MIGRATE_OUTBOX):
        if len(out) >= limit:
            break
        to_set, data = raw.split(b"\0", 1)
        chunk = records.unpack_chunk(data)
        out.append(MigrationChunk(keys.unbe64(key),
                                  keys.chunk_id(chunk.move_id.decode(), chunk.n),
                                  to_set.decode(), data))
    return out


def import_complete(tx: Tx, move_id: str) -> bool:
    """True once every chunk of the move has been applied here."""
    prefix = move_id.encode() + b"\0"
    applied = total = 0
    for _key, raw in scan_prefix(tx, keys.MIGRATED, prefix):
        applied, total = applied + 1, keys.unbe64(raw)
    return total > 0 and applied == total


# -- cluster mode: the credits a SET exchanged with the others ---------------------------
# (The two types below sit with their query rather than in ``model``: only the cluster
# reconcile and the admin call that carries them use them.)

class Direction(enum.IntEnum):
    """Which half of an inter-SET credit a SET's journal holds (the API's numbers)."""

    SENT = 1     # <source> -> x:<peer>: this SET owes a user of <peer>
    APPLIED = 2  # x:<peer> -> <wallet>: <peer> owed a user of this SET, booked here


@dataclasses.dataclass(frozen=True, slots=True)
class InterSetCredit:
    peer: str
    direction: Direction
    transfer_id: str
    amount_fen: int
    in_outbox: bool = False  # SENT only: still waiting for the relay (no PubAck yet)


@dataclasses.dataclass(frozen=True, slots=True)
class InterSetCredits:
    """Every inter-SET credit of one snapshot, and each x:<peer> balance in that snapshot."""

    credits: list[InterSetCredit]
    balances: dict[str, int]


def interset_credits(tx: Tx) -> InterSetCredits:
    """The credits this SET sent to or applied from other SETs, as its journal shows them.

    Read from the transfer journal, which is enough without an index: a credit's two
    halves are transfers under the same id, the sender's into ``x:<home>`` (a grab's
    share from the pending account, a photo unlock from the viewer's wallet) and the
    home SET's out of ``x:<from>`` into a wallet, and no other transfer touches an
    ``x:`` account. A slot handoff's money (``m:<move>:w:<user>``, ``m:<move>:e:<env>``)
    is listed the same way: a wallet or escrow -> x:<new owner> on the old owner (SENT,
    in the outbox until the relay has it), x:<old owner> -> the wallet or escrow on the
    new one (APPLIED), whichever of the remote credit and the chunk landed first.

    Every transfer is looked at, not only the ``c:`` credit ids: an applied credit
    carries whatever id its sender gave it, and a listing that skipped one would leave
    the reconcile a sum it cannot explain instead of a credit it can name. The cost is
    one pass over the journal, which the audit makes anyway.

    ``in_outbox`` is true for a sent credit whose relay record (same id, home, amount)
    is still in ``bus:xcredit``, i.e. not yet acknowledged by the stream.
    """
    outbox: dict[str, tuple[str, int]] = {}
    for key, raw in tx.scan(keys.XCREDIT_OUTBOX):
        c = records.unpack_xcredit(keys.unbe64(key), raw)
        outbox[c.transfer_id] = (c.home, c.amount_fen)
    out: list[InterSetCredit] = []
    cut = len(keys.INTERSET)
    for tid, raw in tx.scan(keys.TRANSFERS):
        amount, _at, _kind, debit, credit, _ref = hotpath.unpack_transfer(raw)
        if credit.startswith(keys.INTERSET):
            peer, name = credit[cut:].decode(), tid.decode()
            out.append(InterSetCredit(peer, Direction.SENT, name, amount,
                                      outbox.get(name) == (peer, amount)))
        elif debit.startswith(keys.INTERSET):
            out.append(InterSetCredit(debit[cut:].decode(), Direction.APPLIED, tid.decode(),
                                      amount))
    balances = {acct[cut:].decode(): hotpath.unpack_i64(raw)
                for acct, raw in scan_prefix(tx, keys.ACCOUNTS, keys.INTERSET)}
    return InterSetCredits(out, balances)


def bound_cards(tx: Tx, user: bytes) -> list[str]:
    """The user's bound cards, most preferred first."""
    raw = tx.get(keys.CARDS, user)
    return [str(c) for c in json.loads(raw)] if raw else []
