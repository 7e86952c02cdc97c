"""Every rule that moves money or changes an envelope, payment or grab.

Each rule is a plain function ``rule(books, *args) -> result`` over one write
transaction (:class:`~gateway.domain.store.Books`), whatever the backend. A
rule checks everything before it writes anything: a
:class:`~gateway.errors.GatewayError` it raises is that request's answer and
leaves the transaction untouched. A failed assertion is a programmer error;
the backend then aborts the whole transaction.

Money moves only through :meth:`Books.move` (double entry, unique transfer
ids); the transfer ids, account names and notification texts come from
``keys`` and ``model``.
"""

from __future__ import annotations

import dataclasses
import json

import hotpath
from gateway import errors
from gateway.domain import keys, reads, records
from gateway.domain.keys import (
    clearing_account,
    escrow_account,
    hold_account,
    pending_account,
    wallet_account,
)
from gateway.domain.model import (
    SLOT_MOVE_KIND,
    CardEnvelope,
    CreditKind,
    EnvelopeStatus,
    GrabOutcome,
    GrabResult,
    NoticeKind,
    Payment,
    PaymentBegun,
    PaymentKind,
    PaymentStatus,
    PayMethod,
    RemoteCredit,
    SendResult,
    SlotExport,
    TxKind,
    UnlockResult,
    expired_refund_text,
    photo_income_text,
)
from gateway.domain.store import Books, scan_prefix

_REUSED = ("REQUEST_ID_REUSED", "request_id was used before with another payload")

# The grab path's constants as plain ints and bound names: on Python 3.11 an
# enum attribute costs about 0.2 us to look up and as much again to convert
# for a Cython argument, a fifth of the writer's cost per grab (profiled with
# cProfile over rules.grab_many; see bench/RESULTS.md).
_ACTIVE, _SOLD_OUT, _EXPIRED = (int(EnvelopeStatus.ACTIVE), int(EnvelopeStatus.SOLD_OUT),
                                int(EnvelopeStatus.EXPIRED))
_GRABBABLE = (_ACTIVE, _SOLD_OUT, _EXPIRED)
_TX_GRAB = int(TxKind.GRAB)
_GRABBED, _ALREADY = GrabOutcome.GRABBED, GrabOutcome.ALREADY_GRABBED


# -- envelopes paid from the balance ---------------------------------------------------

def send_from_balance(b: Books, user: bytes, rid: bytes, fingerprint: bytes, env_id: bytes,
                      total_fen: int, count: int, kind: int, greeting: str,
                      expires_in_s: int, shares: list[int]) -> SendResult:
    """Wallet -> a new envelope's escrow, idempotent by (user, request id)."""
    idem_key = keys.send_idem_key(user, rid)
    raw = b.tx.get(keys.IDEM, idem_key)
    if raw is not None:
        saved_fp, saved = records.unpack_send_result(raw)
        if saved_fp != fingerprint:
            raise errors.InvalidArgument(*_REUSED)
        return dataclasses.replace(saved, status=_live_status(b, saved))
    wallet = wallet_account(user)
    if not hotpath.debit_ok(b.account(wallet), total_fen):
        raise errors.FailedPrecondition(
            "INSUFFICIENT_BALANCE", "the wallet does not cover the envelope",
            balance_fen=str(b.account(wallet)), needed_fen=str(total_fen))
    assert sum(shares) == total_fen and len(shares) == count
    expires_at_ms = b.now_ms + expires_in_s * 1000
    b.envelopes[env_id] = hotpath.pack_envelope(
        total_fen, total_fen, b.now_ms, expires_at_ms, count, 0, kind, EnvelopeStatus.ACTIVE,
        0, shares)
    b.tx.put(keys.ENV_META, env_id,
             records.pack_env_meta(user.decode(), greeting, "", "", PayMethod.BALANCE))
    tid = keys.send_tid(env_id)
    b.move(tid, wallet, escrow_account(env_id), total_fen, TxKind.ENVELOPE_SENT, env_id)
    b.wallet_entry(user, TxKind.ENVELOPE_SENT, -total_fen, tid, env_id)
    b.tx.put(keys.EXPIRY, keys.due_key(expires_at_ms, env_id), b"")
    result = SendResult(env_id.decode(), EnvelopeStatus.ACTIVE, PayMethod.BALANCE, "")
    b.tx.put(keys.IDEM, idem_key, records.pack_send_result(fingerprint, result))
    return result


def _live_status(b: Books, saved: SendResult) -> int:
    buf = b.envelope(saved.envelope_id.encode())
    if buf is None:
        # The sender's slot moved to this SET, the envelope (an id from before ids carried
        # a slot) stayed on the SET that made it: the saved status is all there is here.
        assert keys.envelope_slot(saved.envelope_id) is None, saved
        return saved.status
    return hotpath.envelope_header(buf)[7]


def _set_envelope_status(b: Books, env: bytes, status: EnvelopeStatus) -> None:
    buf = b.envelope(env)
    assert buf is not None, env
    (total, remaining_fen, created, expires, count, claimed, kind, _old, flags,
     shares) = hotpath.unpack_envelope(buf)
    b.envelopes[env] = hotpath.pack_envelope(total, remaining_fen, created, expires, count,
                                             claimed, kind, status, flags, shares)


# -- grabs and their credits ------------------------------------------------------------

def _replay_grab(b: Books, env: bytes, raw: bytes, digest: bytes) -> GrabResult:
    amount, _at, _index, flags, stored = hotpath.unpack_grab(raw)
    buf = b.envelope(env)
    assert buf is not None, env
    header = hotpath.envelope_header(buf)
    remaining = header[4] - header[5]
    if stored != digest:
        return GrabResult(_ALREADY, 0, remaining)
    return GrabResult(_GRABBED, amount, remaining,
                      bool(flags & records.GRAB_CREDITED))


def grab(b: Books, env: bytes, user: bytes, digest: bytes) -> GrabResult:
    """The next share for ``user``: escrow -> their pending credit, one share per user."""
    gkey = keys.grab_key(env, user)
    tx = b.tx
    buf = b.envelope(env)
    if buf is None:
        raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
    _total, _rem, _created, expires_at_ms, count, claimed, _kind, status, _f = (
        hotpath.envelope_header(buf))
    if status not in _GRABBABLE:
        raise errors.FailedPrecondition(
            "ENVELOPE_NOT_PAID", "the envelope's payment has not gone through")
    if status == _EXPIRED or b.now_ms >= expires_at_ms or claimed >= count:
        raw = tx.get(keys.GRABS, gkey)
        if raw is not None:
            return _replay_grab(b, env, raw, digest)
        if claimed >= count:
            return GrabResult(GrabOutcome.SOLD_OUT, 0, 0)
        return GrabResult(GrabOutcome.EXPIRED, 0, count - claimed)
    new_buf, index, amount = hotpath.claim_share(buf, _SOLD_OUT)
    # The insert doubles as the one-share-per-user check: it refuses an existing key.
    if not tx.put(keys.GRABS, gkey, hotpath.pack_grab(amount, b.now_ms, index, 0, digest),
                  overwrite=False):
        raw = tx.get(keys.GRABS, gkey)
        assert raw is not None, gkey
        return _replay_grab(b, env, raw, digest)
    b.envelopes[env] = new_buf
    b.move(keys.grab_tid(env, index), escrow_account(env), pending_account(user), amount,
           _TX_GRAB, gkey)
    b.publish_credit(gkey)
    if index + 1 == count:
        b.best_luck.append(env)
    return GrabResult(_GRABBED, amount, count - index - 1, False)


def grab_many(b: Books, items: list[tuple[bytes, bytes, bytes]]
              ) -> list[GrabResult | errors.GatewayError]:
    """(envelope, user, request digest) grabs in one request: each answers on its own."""
    out: list[GrabResult | errors.GatewayError] = []
    for env, user, digest in items:
        try:
            out.append(grab(b, env, user, digest))
        except errors.GatewayError as err:
            out.append(err)
    return out


def credit_grab(b: Books, gkey: bytes) -> bool:
    """Moves one grab's pending credit into the wallet; False if it was credited before."""
    raw = b.tx.get(keys.GRABS, gkey)
    assert raw is not None, gkey
    amount, at_ms, index, flags, digest = hotpath.unpack_grab(raw)
    if flags & records.GRAB_CREDITED:
        return False  # delivered twice: already applied
    env, user = keys.split_grab_key(gkey)
    tid = keys.credit_tid(env, index)
    home = _home(b, user)
    if home is not None:
        # The wallet lives on another SET: the credit leaves through inter-SET clearing
        # and the relay's outbox, written in this same transaction.
        b.move(tid, pending_account(user), keys.interset_account(home), amount,
               TxKind.ENVELOPE_CREDIT, gkey)
        b.publish_remote_credit(RemoteCredit(home.decode(), tid.decode(), user.decode(),
                                             amount, env.decode()))
    else:
        b.move(tid, pending_account(user), wallet_account(user), amount,
               TxKind.ENVELOPE_CREDIT, gkey)
        _share_landed(b, user, tid, env, amount)
    b.tx.put(keys.GRABS, gkey, hotpath.pack_grab(
        amount, at_ms, index, flags | records.GRAB_CREDITED, digest))
    return True


def _home(b: Books, user: bytes) -> bytes | None:
    """The SET a user's wallet lives on when it is not this one: the placement's answer or,
    for a user whose slot this SET handed off while its map still says here, the new
    owner (the MOVED marker). The embedded mode has no placement and hands nothing off,
    so its credits and unlocks pay no lookup at all."""
    if b.away is None:
        return None
    return b.away(user) or _moved_to(b, user)


def _moved_to(b: Books, user: bytes) -> bytes | None:
    raw = b.tx.get(keys.MOVED, keys.moved_key(b"u", user))
    return None if raw is None else raw.split(b"\0", 1)[1]


def _share_landed(b: Books, user: bytes, tid: bytes, env: bytes, amount_fen: int) -> None:
    """A grab's share reached the wallet: its entry and the CREDITED event."""
    b.wallet_entry(user, TxKind.ENVELOPE_CREDIT, amount_fen, tid, env)
    b.notify(user, NoticeKind.CREDITED, amount_fen, envelope_id=env.decode())


def apply_remote_credits(b: Books, from_set: bytes, credits: list[RemoteCredit]) -> int:
    """Credits that another SET owes users of this one (grab shares, photo incomes):
    x:<from_set> -> wallet, under the sender's transfer id, so a redelivered credit is
    applied once. The wallet entry and the event are those the credit would have had on
    one SET. Returns how many were new."""
    applied = 0
    for c in credits:
        tid = c.transfer_id.encode()
        if b.tx.get(keys.TRANSFERS, tid) is not None:
            continue   # delivered before
        user, ref = c.user_id.encode(), c.reference_id.encode()
        if c.kind in _MOVE_KINDS:
            # A slot handoff's money; the history it belongs to travels as records.
            to = wallet_account(user) if c.kind == CreditKind.WALLET_MOVE else escrow_account(ref)
            b.move(tid, keys.interset_account(from_set), to, c.amount_fen, SLOT_MOVE_KIND,
                   ref)
        elif (moved_to := _moved_to(b, user)) is not None:
            _forward(b, from_set, moved_to, c)
        elif c.kind == CreditKind.PHOTO_INCOME:
            assert c.photo_id, c
            b.move(tid, keys.interset_account(from_set), wallet_account(user), c.amount_fen,
                   TxKind.PHOTO_UNLOCK, ref)
            _photo_income(b, user, tid, ref, c.amount_fen, c.photo_id)
        else:
            assert c.kind == CreditKind.GRAB, c
            b.move(tid, keys.interset_account(from_set), wallet_account(user), c.amount_fen,
                   TxKind.ENVELOPE_CREDIT, ref)
            _share_landed(b, user, tid, ref, c.amount_fen)
        applied += 1
    return applied


_MOVE_KINDS = (CreditKind.WALLET_MOVE, CreditKind.ESCROW_MOVE)


def _forward(b: Books, from_set: bytes, moved_to: bytes, c: RemoteCredit) -> None:
    """A credit for a user whose slot this SET handed off (sent before the sender's map
    moved): booked here under its id, so the sender's half pairs with it, and sent on at
    once to the new owner under ``fw:<id>``, where the entry and the event are written."""
    tid, user = c.transfer_id.encode(), c.user_id.encode()
    kind = TxKind.PHOTO_UNLOCK if c.kind == CreditKind.PHOTO_INCOME else TxKind.ENVELOPE_CREDIT
    ref = c.reference_id.encode()
    b.move(tid, keys.interset_account(from_set), wallet_account(user), c.amount_fen, kind, ref)
    onward = keys.forward_tid(tid)
    b.move(onward, wallet_account(user), keys.interset_account(moved_to), c.amount_fen, kind,
           ref)
    b.publish_remote_credit(c._replace(home=moved_to.decode(), transfer_id=onward.decode(),
                                       seq=0))


def remote_credits_sent(b: Books, seqs: list[int]) -> int:
    """The relay has the stream's acknowledgement for these: off the outbox."""
    return sum(b.tx.delete(keys.XCREDIT_OUTBOX, keys.be64(seq)) for seq in seqs)


def apply_credits(b: Books, limit: int) -> int:
    """Takes up to ``limit`` grabs off the credit outbox and credits each exactly once."""
    taken: list[tuple[bytes, bytes]] = []
    for key, gkey in b.tx.scan(keys.CREDIT_OUTBOX):
        taken.append((key, gkey))
        if len(taken) >= limit:
            break
    applied = 0
    for key, gkey in taken:
        b.tx.delete(keys.CREDIT_OUTBOX, key)
        applied += credit_grab(b, gkey)
    return applied


def expire_due(b: Books, limit: int) -> int:
    """Returns unclaimed escrow of envelopes past their expiry to the sender, exactly once."""
    due: list[bytes] = []
    for key, _empty in b.tx.scan(keys.EXPIRY):
        if keys.unbe64(key) > b.now_ms or len(due) >= limit:
            break
        due.append(key)
    refunded = 0
    for key in due:
        b.tx.delete(keys.EXPIRY, key)
        refunded += _expire(b, key[8:])
    return refunded


def _expire(b: Books, env: bytes) -> bool:
    buf = b.envelope(env)
    assert buf is not None, env
    (total, remaining_fen, created, expires, count, claimed, kind, status, flags,
     shares) = hotpath.unpack_envelope(buf)
    if status != EnvelopeStatus.ACTIVE:
        return False  # sold out (nothing left) or already expired
    unclaimed = sum(shares[claimed:])
    b.envelopes[env] = hotpath.pack_envelope(
        total, remaining_fen, created, expires, count, claimed, kind, EnvelopeStatus.EXPIRED,
        flags, shares)
    if unclaimed == 0:
        return False
    meta = b.tx.get(keys.ENV_META, env)
    assert meta is not None, env
    sender = records.unpack_env_meta(meta)["s"].encode()
    tid = keys.expiry_tid(env)
    b.move(tid, escrow_account(env), wallet_account(sender), unclaimed, TxKind.EXPIRY_REFUND,
           env)
    b.wallet_entry(sender, TxKind.EXPIRY_REFUND, unclaimed, tid, env)
    b.notify(sender, NoticeKind.EXPIRED_REFUND, unclaimed, envelope_id=env.decode(),
             message=expired_refund_text(count - claimed))
    return True


# -- card payments: intent, outcome, unknown ---------------------------------------------

def _load_payment(b: Books, payment_id: str) -> tuple[Payment, bytes, int]:
    raw = b.tx.get(keys.PAYMENTS, payment_id.encode())
    if raw is None:
        raise errors.NotFound("PAYMENT_NOT_FOUND", "no such payment")
    return records.unpack_payment(raw)


def _save_payment(b: Books, p: Payment, fp: bytes, old_due_ms: int, due_ms: int) -> None:
    """Writes the payment and keeps its entry in the resolver's due index in step."""
    pid = p.payment_id.encode()
    if old_due_ms != due_ms:
        if old_due_ms:
            b.tx.delete(keys.RESOLVE, keys.due_key(old_due_ms, pid))
        if due_ms:
            b.tx.put(keys.RESOLVE, keys.due_key(due_ms, pid), b"")
    b.tx.put(keys.PAYMENTS, pid, records.pack_payment(p, fp, due_ms))


def begin_payment(b: Books, payment: Payment, fingerprint: bytes, due_in_ms: int,
                  envelope: CardEnvelope | None, replaces: str = "") -> PaymentBegun:
    """Saves a payment intent before the bank is called (or returns the saved one).

    A withdrawal holds its amount at once (wallet -> hold), so the wallet
    cannot spend it twice while the bank works. A card-paid envelope is
    created PAYING (not grabbable) with its shares already split.

    ``replaces`` names the payment of the same send an AUTO payment gives up on (it must
    have FAILED for a reason in :data:`SWITCHABLE_REASONS`): the new one takes over the
    send's request id, and the user is told (CARD_SWITCHED).
    """
    key = payment.payment_id.encode()
    raw = b.tx.get(keys.PAYMENTS, key)
    if raw is not None:
        saved, saved_fp, _due = records.unpack_payment(raw)
        if saved_fp != fingerprint:
            raise errors.InvalidArgument(*_REUSED)
        return PaymentBegun(saved, False)
    if replaces:
        _give_up(b, replaces, payment)
    user = payment.user_id.encode()
    if payment.kind == PaymentKind.WITHDRAW:
        wallet = wallet_account(user)
        if not hotpath.debit_ok(b.account(wallet), payment.amount_fen):
            raise errors.FailedPrecondition(
                "INSUFFICIENT_BALANCE", "the wallet does not cover the withdrawal",
                balance_fen=str(b.account(wallet)))
        tid = keys.withdraw_hold_tid(key)
        b.move(tid, wallet, hold_account(key), payment.amount_fen, TxKind.WITHDRAW, key)
        b.wallet_entry(user, TxKind.WITHDRAW, -payment.amount_fen, tid, key)
    if envelope is not None:
        _create_card_envelope(b, payment, envelope)
    payment = dataclasses.replace(payment, created_at_ms=b.now_ms, updated_at_ms=b.now_ms)
    _save_payment(b, payment, fingerprint, 0, b.now_ms + due_in_ms)
    return PaymentBegun(payment, True)


def _give_up(b: Books, old_id: str, new: Payment) -> None:
    """Checks that the payment ``new`` replaces moved no money, and tells the user."""
    old, _fp, _due = _load_payment(b, old_id)
    if not old.replaceable:
        raise errors.FailedPrecondition(
            "PAYMENT_NOT_REPLACEABLE", "only a payment known not to have moved money may be "
            "taken over by another card", payment_id=old_id, status=old.status.name)
    assert old.user_id == new.user_id and old.amount_fen == new.amount_fen, (old, new)
    b.notify(new.user_id.encode(), NoticeKind.CARD_SWITCHED, new.amount_fen,
             payment_id=new.payment_id, envelope_id=new.envelope_id,
             message=f"card {old.card_id} could not pay ({old.reason}); paying with card "
                     f"{new.card_id}")


def switch_channel(b: Books, payment_id: str, channel: str) -> Payment:
    """Names the bank channel a PENDING payment's order goes through next (the butler moved
    it: the first one refused it before anything was recorded). A payment no longer
    PENDING is returned unchanged: its handler must not send it anywhere."""
    p, fp, due = _load_payment(b, payment_id)
    if p.status != PaymentStatus.PENDING or p.channel == channel:
        return p
    moved = dataclasses.replace(p, channel=channel, updated_at_ms=b.now_ms)
    _save_payment(b, moved, fp, due, due)
    return moved


def _create_card_envelope(b: Books, payment: Payment, e: CardEnvelope) -> None:
    user = payment.user_id.encode()
    env_id = e.envelope_id.encode()
    expires_at_ms = b.now_ms + e.expires_in_s * 1000
    b.envelopes[env_id] = hotpath.pack_envelope(
        payment.amount_fen, payment.amount_fen, b.now_ms, expires_at_ms, e.count, 0, e.kind,
        EnvelopeStatus.PAYING, 0, e.shares)
    b.tx.put(keys.ENV_META, env_id, records.pack_env_meta(
        payment.user_id, e.greeting, "", payment.payment_id, PayMethod.CARD))
    result = SendResult(e.envelope_id, EnvelopeStatus.PAYING, PayMethod.CARD,
                        payment.payment_id)
    b.tx.put(keys.IDEM, keys.send_idem_key(user, e.request_id.encode()),
             records.pack_send_result(e.send_fingerprint, result))


def finish_payment(b: Books, payment_id: str, outcome: PaymentStatus, reason: str,
                   from_states: tuple[PaymentStatus, ...]) -> Payment:
    """Takes a payment to a final state, with its money, exactly once.

    Only from ``from_states``: the request handler finishes PENDING payments,
    the resolver UNKNOWN ones; whichever comes second sees the other's result.
    """
    p, fp, due = _load_payment(b, payment_id)
    if p.status not in from_states:
        return p
    if outcome == PaymentStatus.SUCCEEDED:
        _settle(b, p)
        note: NoticeKind | None = NoticeKind.SUCCEEDED
    else:
        assert outcome in (PaymentStatus.FAILED, PaymentStatus.REFUNDED), outcome
        _unwind(b, p, outcome)
        note = (NoticeKind.REFUNDED if outcome == PaymentStatus.REFUNDED
                else NoticeKind.LOCKED if reason == "LOCKED" else None)
    done = dataclasses.replace(p, status=outcome, reason=reason, updated_at_ms=b.now_ms)
    _save_payment(b, done, fp, due, 0)
    if note is not None:
        b.notify(p.user_id.encode(), note, p.amount_fen, payment_id=payment_id,
                 envelope_id=p.envelope_id)
    return done


def _settle(b: Books, p: Payment) -> None:
    """The bank moved the money: book it on our side."""
    pid = p.payment_id.encode()
    clearing = clearing_account(p.bank_id.encode())
    if p.kind == PaymentKind.TOP_UP:
        user = p.user_id.encode()
        tid = keys.card_in_tid(pid)
        b.move(tid, clearing, wallet_account(user), p.amount_fen, TxKind.TOP_UP, pid)
        b.wallet_entry(user, TxKind.TOP_UP, p.amount_fen, tid, pid)
    elif p.kind == PaymentKind.ENVELOPE:
        env = p.envelope_id.encode()
        b.move(keys.card_in_tid(pid), clearing, escrow_account(env), p.amount_fen,
               TxKind.ENVELOPE_SENT, env)
        _set_envelope_status(b, env, EnvelopeStatus.ACTIVE)
        buf = b.envelope(env)
        assert buf is not None, env
        expires_at_ms = hotpath.envelope_header(buf)[3]
        b.tx.put(keys.EXPIRY, keys.due_key(expires_at_ms, env), b"")
    else:
        assert p.kind == PaymentKind.WITHDRAW, p.kind
        b.move(keys.payout_tid(pid), hold_account(pid), clearing, p.amount_fen,
               TxKind.WITHDRAW, pid)


def _unwind(b: Books, p: Payment, outcome: PaymentStatus) -> None:
    """The bank did not keep the money: give back what our side set aside."""
    pid = p.payment_id.encode()
    if p.kind == PaymentKind.WITHDRAW:
        user = p.user_id.encode()
        tid = keys.reversal_tid(pid)
        b.move(tid, hold_account(pid), wallet_account(user), p.amount_fen,
               TxKind.WITHDRAW_REVERSAL, pid)
        b.wallet_entry(user, TxKind.WITHDRAW_REVERSAL, p.amount_fen, tid, pid)
    elif p.kind == PaymentKind.ENVELOPE:
        _set_envelope_status(b, p.envelope_id.encode(),
                             EnvelopeStatus.REFUNDED if outcome == PaymentStatus.REFUNDED
                             else EnvelopeStatus.FAILED)


def payment_unknown(b: Books, payment_id: str, resolve_in_ms: int, reason: str) -> Payment:
    """The bank gave no clear answer: UNKNOWN, notified once, and due for the resolver."""
    p, fp, due = _load_payment(b, payment_id)
    if not p.open:
        return p
    first = p.status == PaymentStatus.PENDING
    unknown = dataclasses.replace(p, status=PaymentStatus.UNKNOWN, reason=reason,
                                  updated_at_ms=b.now_ms,
                                  attempts=p.attempts + (0 if first else 1))
    _save_payment(b, unknown, fp, due, b.now_ms + resolve_in_ms)
    if first:
        if p.kind == PaymentKind.ENVELOPE:
            _set_envelope_status(b, p.envelope_id.encode(), EnvelopeStatus.PAY_UNKNOWN)
        b.notify(p.user_id.encode(), NoticeKind.UNKNOWN, p.amount_fen, payment_id=payment_id,
                 envelope_id=p.envelope_id)
    return unknown


# -- Moments photo unlocks -------------------------------------------------------------

def unlock_photo(b: Books, viewer: bytes, rid: bytes, fingerprint: bytes, owner: bytes,
                 photo_id: str, amount_fen: int) -> UnlockResult:
    """Viewer's wallet -> owner's wallet, ``amount_fen``, idempotent by (viewer, request id).

    One transfer (``u:<unlock id>``, kind PHOTO_UNLOCK) and an entry in each
    wallet: PHOTO_UNLOCK ``-amount_fen`` for the viewer, PHOTO_INCOME
    ``+amount_fen`` for the owner, both referencing the unlock id. The owner,
    who did not make the call, gets a CREDITED event in their feed, as a
    credited grab does; the viewer gets none, the answer being their
    confirmation, as with a balance-paid send. The owner's wallet opens on
    its first credit. A retry returns the saved result; the same request id
    with another photo or owner is refused.

    In cluster mode, when the owner's wallet lives on another SET, the transfer
    goes to ``x:<home>`` instead and the owner's half (entry and event) is
    booked there, once, from the remote credit written here.
    """
    idem_key = keys.unlock_idem_key(viewer, rid)
    raw = b.tx.get(keys.IDEM, idem_key)
    if raw is not None:
        saved_fp, saved, _owner, _photo = records.unpack_unlock(raw)
        if saved_fp != fingerprint:
            raise errors.InvalidArgument(*_REUSED)
        return saved
    assert viewer != owner and amount_fen > 0, (viewer, amount_fen)
    wallet = wallet_account(viewer)
    if not hotpath.debit_ok(b.account(wallet), amount_fen):
        raise errors.FailedPrecondition(
            "INSUFFICIENT_BALANCE", "the wallet does not cover the unlock",
            balance_fen=str(b.account(wallet)), needed_fen=str(amount_fen))
    unlock_id = keys.unlock_id(viewer.decode(), rid.decode(), free=False)
    ref = unlock_id.encode()
    tid = keys.unlock_tid(ref)
    home = _home(b, owner)
    # An owner whose wallet lives on another SET is paid through inter-SET clearing and
    # the relay's outbox, in this same transaction; their SET books the owner's entry and
    # event when it applies the credit (apply_remote_credits), under this transfer id.
    to = wallet_account(owner) if home is None else keys.interset_account(home)
    b.move(tid, wallet, to, amount_fen, TxKind.PHOTO_UNLOCK, ref)
    b.wallet_entry(viewer, TxKind.PHOTO_UNLOCK, -amount_fen, tid, ref)
    if home is None:
        _photo_income(b, owner, tid, ref, amount_fen, photo_id)
    else:
        b.publish_remote_credit(RemoteCredit(home.decode(), tid.decode(), owner.decode(),
                                             amount_fen, unlock_id, CreditKind.PHOTO_INCOME,
                                             photo_id))
    result = UnlockResult(unlock_id, amount_fen, False)
    b.tx.put(keys.IDEM, idem_key, records.pack_unlock(
        fingerprint, result, owner.decode(), photo_id,
        None if home is None else home.decode()))
    return result


def _photo_income(b: Books, owner: bytes, tid: bytes, ref: bytes, amount_fen: int,
                  photo_id: str) -> None:
    """A paid unlock reached the owner's wallet: their PHOTO_INCOME entry and a CREDITED
    event that names the photo, not the viewer."""
    b.wallet_entry(owner, TxKind.PHOTO_INCOME, amount_fen, tid, ref)
    b.notify(owner, NoticeKind.CREDITED, amount_fen, payment_id=ref.decode(),
             message=photo_income_text(photo_id))


# -- cluster mode: handing slots to another SET ------------------------------------------
# A slot handoff moves the data of a set of slots from their old owner A to the new owner B
# while both refuse the slots' calls (the control plane freezes, drains, ships the chunks
# and switches the map; these two rules are the books' part).
#
# What A keeps: its journal (every transfer, the m: ones included: wallet or escrow ->
# x:<B>, sent like any remote credit), its x:<B> account, the final payments and paid
# unlock records of the moved users (they tie A's clearing accounts and unlock transfers
# together, so A's audit balances unchanged; B gets copies marked imported) and a marker
# per moved user and envelope with the move id and B (MOVED). Everything else of the slots
# leaves A's live tables: wallet entries, notifications, send records, envelopes, their
# metadata, grabs and expiry entries. Money that reaches a moved user on A afterwards
# (another SET's credit sent before its map moved, an unlock by a user of A) goes on to B
# through x:B like any remote credit (see _home and _forward).

_MOVE_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_OPEN_ENVELOPE = (int(EnvelopeStatus.PAYING), int(EnvelopeStatus.PAY_UNKNOWN))


def export_slots(b: Books, slots: frozenset[int], to_set: bytes, move_id: bytes
                 ) -> SlotExport:
    """Takes the slots' wallets, envelopes and records off this SET for ``to_set``: money
    to x:<to_set> (m: transfers, queued for the relay as wallet_move/escrow_move credits),
    records into chunks on the migration outbox. Idempotent by move id; refused with
    SLOT_BUSY while a payment of the slots is open."""
    if not move_id or len(move_id) > 64 or not set(move_id) <= _MOVE_ID_CHARS:
        raise errors.InvalidArgument("BAD_MOVE_ID", "a move id is 1-64 of [A-Za-z0-9_.-]")
    fp = keys.fingerprint("export_slots", sorted(slots), to_set.decode())
    saved = b.tx.get(keys.MOVED, keys.move_record_key(move_id))
    if saved is not None:
        saved_fp, result = records.unpack_export(saved)
        if saved_fp != fp:
            raise errors.InvalidArgument("MOVE_ID_REUSED",
                                         "move_id was used before for other slots or SET")
        return result
    if not to_set or b"\0" in to_set:
        raise errors.InvalidArgument("BAD_SET", "the new owner's name is empty or has a NUL")
    envs = _envelopes_in(b, slots)
    payments = _payments_in(b, slots)
    _refuse_busy(b, envs, payments)
    _refuse_legacy_escrow(b, slots)
    users = _users_in(b, slots) | set(payments)
    _credit_before_move(b, slots, set(envs), to_set)
    groups: list[list[tuple]] = []
    escrow_fen = wallet_fen = wallets = 0
    for env in envs:
        group = _export_envelope(b, env, to_set, move_id)
        escrow_fen += sum(item[3] for item in group if item[0] == "money")
        groups.append(group)
    for user in sorted(users):
        items = _export_user(b, user, to_set, move_id, payments.get(user, []))
        moved = [item[3] for item in items if item[0] == "money"]
        wallets, wallet_fen = wallets + len(moved), wallet_fen + sum(moved)
        groups.extend([item] for item in items)
    chunks = _pack_chunks(groups, move_id, to_set)
    for raw in chunks:
        b.tx.put(keys.MIGRATE_OUTBOX, keys.be64(b.next_seq()), to_set + b"\0" + raw,
                 append=True)
    rows = sum(1 for group in groups for item in group if item[0] == "row")
    result = SlotExport(move_id.decode(), len(chunks), wallets, wallet_fen, len(envs),
                        escrow_fen, rows)
    b.tx.put(keys.MOVED, keys.move_record_key(move_id), records.pack_export(fp, result))
    return result


def _in_slots(user: bytes, slots: frozenset[int]) -> bool:
    return keys.slot_of(user.decode()) in slots


def _envelopes_in(b: Books, slots: frozenset[int]) -> list[bytes]:
    """The envelopes whose id carries one of the slots (ids from before ids carried a slot
    stay where they are)."""
    return [env for env in _all_envelopes(b) if keys.envelope_slot(env.decode()) in slots]


def _all_envelopes(b: Books) -> list[bytes]:
    """Every envelope id, those made earlier in this group commit (still cached) too."""
    return sorted({env for env, _buf in b.tx.scan(keys.ENVELOPES)} | set(b.envelopes))


def _payments_in(b: Books, slots: frozenset[int]) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """The payment records of the slots' users, by user."""
    out: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for key, raw in b.tx.scan(keys.PAYMENTS):
        user = records.unpack_payment(raw)[0].user_id.encode()
        if _in_slots(user, slots):
            out.setdefault(user, []).append((key, raw))
    return out


def _refuse_busy(b: Books, envs: list[bytes],
                 payments: dict[bytes, list[tuple[bytes, bytes]]]) -> None:
    for user, held in payments.items():
        for _key, raw in held:
            p = records.unpack_payment(raw)[0]
            if p.open:
                raise errors.FailedPrecondition(
                    "SLOT_BUSY", f"payment {p.payment_id} of {user.decode()} is "
                    f"{p.status.name}: the resolver must finish it before the move",
                    payment_id=p.payment_id)
    for env in envs:
        buf = b.envelope(env)
        assert buf is not None, env
        if hotpath.envelope_header(buf)[7] in _OPEN_ENVELOPE:
            raise errors.FailedPrecondition(
                "SLOT_BUSY", f"envelope {env.decode()} waits for its card payment",
                envelope_id=env.decode())


def _refuse_legacy_escrow(b: Books, slots: frozenset[int]) -> None:
    """An envelope whose id carries no slot (made before ids did) stays on the SET that made
    it; while it holds escrow its expiry would refund a sender who left, so the move waits
    for it to expire (24 h at most by default)."""
    for env in _all_envelopes(b):
        buf = b.envelope(env)
        if buf is None or keys.envelope_slot(env.decode()) is not None:
            continue
        if hotpath.envelope_header(buf)[7] != _ACTIVE or b.account(escrow_account(env)) == 0:
            continue
        meta = b.tx.get(keys.ENV_META, env)
        assert meta is not None, env
        sender = records.unpack_env_meta(meta)["s"]
        if keys.slot_of(sender) in slots:
            raise errors.FailedPrecondition(
                "SLOT_BUSY", f"envelope {env.decode()} of {sender} (an id without a slot, "
                "which stays here) holds escrow until it expires", envelope_id=env.decode())


def _distinct_users(b: Books, table: str, prefix: bytes = b"") -> set[bytes]:
    """The users of a table keyed ``prefix user \\0 ...``: one seek per user, not per row."""
    users: set[bytes] = set()
    start = prefix
    while True:
        key = next((k for k, _v in b.tx.scan(table, start)), None)
        if key is None or not key.startswith(prefix):
            return users
        user = key[len(prefix):].split(b"\0", 1)[0]
        users.add(user)
        start = prefix + user + b"\x01"


def _users_in(b: Books, slots: frozenset[int]) -> set[bytes]:
    """The slots' users with a wallet, history, notifications or request records here."""
    found = {acct[len(keys.WALLET):] for acct, _raw in
             scan_prefix(b.tx, keys.ACCOUNTS, keys.WALLET)}
    for table in (keys.WALLET_TX, keys.NOTIFICATIONS):
        found |= _distinct_users(b, table)
    found |= _distinct_users(b, keys.IDEM, keys.send_idem_prefix(b"")[:-1])
    found |= _distinct_users(b, keys.IDEM, keys.UNLOCK_IDEM)
    return {user for user in found if _in_slots(user, slots)}


def _credit_before_move(b: Books, slots: frozenset[int], envs: set[bytes],
                        to_set: bytes) -> None:
    """Credits every grab waiting on the credit outbox whose envelope or grabber moves, the
    slots' users counting as living on ``to_set``: no pending credit refers to data that
    leaves, and their shares reach them on ``to_set`` as any remote credit."""
    waiting = [(key, gkey) for key, gkey in b.tx.scan(keys.CREDIT_OUTBOX)
               if keys.split_grab_key(gkey)[0] in envs
               or _in_slots(keys.split_grab_key(gkey)[1], slots)]
    placement = b.away

    def away(user: bytes) -> bytes | None:
        if _in_slots(user, slots):
            return to_set
        return placement(user) if placement is not None else None

    b.away = away
    try:
        for key, gkey in waiting:
            b.tx.delete(keys.CREDIT_OUTBOX, key)
            credit_grab(b, gkey)
    finally:
        b.away = placement


def _move_out(b: Books, tid: bytes, acct: bytes, to_set: bytes, amount: int, ref: bytes,
              credit: RemoteCredit) -> tuple:
    b.move(tid, acct, keys.interset_account(to_set), amount, SLOT_MOVE_KIND, ref)
    b.publish_remote_credit(credit)
    return ("money", tid, acct, amount)


def _export_envelope(b: Books, env: bytes, to_set: bytes, move_id: bytes) -> list[tuple]:
    """An envelope's escrow and rows, as one group (they travel in one chunk, so the new
    owner never holds an envelope without its escrow)."""
    buf = b.drop_envelope(env)
    meta = b.tx.get(keys.ENV_META, env)
    assert buf is not None and meta is not None, env
    rows = [("row", keys.ENVELOPES, env, buf), ("row", keys.ENV_META, env, meta)]
    for gkey, raw in scan_prefix(b.tx, keys.GRABS, keys.grabs_prefix(env)):
        assert hotpath.unpack_grab(raw)[3] & records.GRAB_CREDITED, gkey
        rows.append(("row", keys.GRABS, gkey, raw))
    due = keys.due_key(hotpath.envelope_header(buf)[3], env)
    if b.tx.get(keys.EXPIRY, due) is not None:
        rows.append(("row", keys.EXPIRY, due, b""))
    for _row, table, key, _value in rows:
        b.tx.delete(table, key)
    escrow = escrow_account(env)
    amount = b.account(escrow)
    if amount > 0:
        tid = keys.move_tid(move_id, b"e", env)
        sender = records.unpack_env_meta(meta)["s"]
        rows.insert(0, _move_out(b, tid, escrow, to_set, amount, env, RemoteCredit(
            to_set.decode(), tid.decode(), sender, amount, env.decode(),
            CreditKind.ESCROW_MOVE)))
    b.tx.put(keys.MOVED, keys.moved_key(b"e", env), move_id + b"\0" + to_set)
    rows.append(("row", keys.MOVED, keys.moved_key(b"e", env), b""))
    return rows


def _export_user(b: Books, user: bytes, to_set: bytes, move_id: bytes,
                 payments: list[tuple[bytes, bytes]]) -> list[tuple]:
    """A user's wallet balance and rows. Final payments and paid unlock records stay here
    too (this SET's clearing accounts and unlock transfers are tied to them)."""
    leaving = [("row", table, key, value)
               for table, prefix in ((keys.WALLET_TX, keys.user_prefix(user)),
                                     (keys.NOTIFICATIONS, keys.user_prefix(user)),
                                     (keys.IDEM, keys.send_idem_prefix(user)))
               for key, value in scan_prefix(b.tx, table, prefix)]
    copied = [("row", keys.IDEM, key, value)
              for key, value in scan_prefix(b.tx, keys.IDEM, keys.unlock_idem_prefix(user))]
    copied += [("row", keys.PAYMENTS, key, raw) for key, raw in payments]
    cards = b.tx.get(keys.CARDS, user)
    if cards is not None:
        leaving.append(("row", keys.CARDS, user, cards))
    for _row, table, key, _value in leaving:
        b.tx.delete(table, key)
    assert b.account(pending_account(user)) == 0, user
    items = leaving + copied
    wallet = wallet_account(user)
    amount = b.account(wallet)
    if amount > 0:
        tid = keys.move_tid(move_id, b"w", user)
        items.insert(0, _move_out(b, tid, wallet, to_set, amount, move_id, RemoteCredit(
            to_set.decode(), tid.decode(), user.decode(), amount, move_id.decode(),
            CreditKind.WALLET_MOVE)))
    b.tx.put(keys.MOVED, keys.moved_key(b"u", user), move_id + b"\0" + to_set)
    items.append(("row", keys.MOVED, keys.moved_key(b"u", user), b""))
    return items


def _item_size(item: tuple) -> int:
    if item[0] == "money":
        return records.money_size(item[1], item[2])
    return records.row_size(item[2], item[3])


def _pack_chunks(groups: list[list[tuple]], move_id: bytes, to_set: bytes) -> list[bytes]:
    """Groups into chunks of at most CHUNK_MAX_BYTES, a group never split; every chunk
    carries its number and the count (a move with nothing to carry still has one)."""
    room = records.CHUNK_MAX_BYTES - records.chunk_head_size(move_id, to_set)
    parts: list[list[tuple]] = [[]]
    used = 0
    for group in groups:
        size = sum(_item_size(item) for item in group)
        assert size <= room, ("a group larger than a chunk", size)
        if used + size > room:
            parts.append([])
            used = 0
        parts[-1].extend(group)
        used += size
    return [records.pack_chunk(records.Chunk(
        move_id, to_set, n, len(parts),
        [(i[1], i[2], i[3]) for i in part if i[0] == "money"],
        [(i[1], i[2], i[3]) for i in part if i[0] == "row"])) for n, part in enumerate(parts)]


def migration_chunks_sent(b: Books, seqs: list[int]) -> int:
    """The shipper has the new owner's acknowledgement for these: off the outbox."""
    return sum(b.tx.delete(keys.MIGRATE_OUTBOX, keys.be64(seq)) for seq in seqs)


def import_slots(b: Books, from_set: bytes, raw: bytes) -> int:
    """One chunk of ``from_set``'s export, applied once by its id: the money x:<from_set>
    -> wallet or escrow under the old owner's transfer ids (skipping one a remote credit
    applied first), and the rows written back, marked imported where the audit must not
    look for their transfers here. Returns how many items were applied (0: seen before).

    Wallet entries and notifications keep their sequence numbers when the key is free; this
    SET's counter is taken past the largest imported one first, so later entries sort after
    them, and an entry whose key is taken gets a fresh number. So a WatchNotifications
    client resuming with an ``after_event_id`` it got from the old owner sees every later
    event, and sees again only the (rare) events that had to be renumbered.
    """
    try:
        chunk = records.unpack_chunk(raw)
    except ValueError as exc:
        raise errors.InvalidArgument("BAD_CHUNK", str(exc)) from exc
    for _tid, acct, amount in chunk.money:
        if amount <= 0 or not acct.startswith((keys.WALLET, keys.ESCROW)):
            raise errors.InvalidArgument("BAD_CHUNK", f"cannot move {amount} fen into {acct!r}")
    done = keys.applied_chunk_key(chunk.move_id, chunk.n)
    if b.tx.get(keys.MIGRATED, done) is not None:
        return 0
    for tid, acct, amount in chunk.money:
        if b.tx.get(keys.TRANSFERS, tid) is None:
            ref = chunk.move_id if acct.startswith(keys.WALLET) else acct[len(keys.ESCROW):]
            b.move(tid, keys.interset_account(from_set), acct, amount, SLOT_MOVE_KIND, ref)
    seqs = [keys.unbe64(key[-8:]) for table, key, _v in chunk.rows
            if table in (keys.WALLET_TX, keys.NOTIFICATIONS)]
    b.seq_past(max(seqs, default=0))
    origin = from_set.decode()
    for table, key, value in chunk.rows:
        _import_row(b, origin, table, key, value)
    b.tx.put(keys.MIGRATED, done, keys.be64(chunk.total))
    return len(chunk.money) + len(chunk.rows)


def _import_row(b: Books, origin: str, table: str, key: bytes, value: bytes) -> None:
    tx = b.tx
    if table == keys.MOVED:
        tx.delete(table, key)  # it arrives here: no longer moved away (a slot coming back)
        return
    if table in (keys.WALLET_TX, keys.NOTIFICATIONS):
        if not tx.put(table, key, value, overwrite=False):
            tx.put(table, keys.user_seq_key(key[:-9], b.next_seq()), value)
        return
    if table == keys.IDEM and key.startswith(keys.UNLOCK_IDEM):
        value = records.mark_unlock_imported(value, origin)
    elif table == keys.PAYMENTS:
        value = records.mark_payment_imported(value, origin)
    elif table == keys.GRABS:
        amount, at_ms, index, flags, digest = hotpath.unpack_grab(value)
        value = hotpath.pack_grab(amount, at_ms, index, flags | records.GRAB_IMPORTED, digest)
    elif table == keys.ENVELOPES:
        b.envelopes.pop(key, None)
        (total, remaining_fen, created, expires, count, claimed, kind, status, flags,
         shares) = hotpath.unpack_envelope(value)
        value = hotpath.pack_envelope(total, remaining_fen, created, expires, count, claimed,
                                      kind, status, flags | records.ENV_IMPORTED, shares)
    # What this SET already holds under the key is kept: a record is never overwritten.
    tx.put(table, key, value, overwrite=False)


# -- bound cards ----------------------------------------------------------------------------

def bind_card(b: Books, user: bytes, card_id: str, preferred: bool, limit: int) -> list[str]:
    """Adds a card to the user's bound cards: last, or first when ``preferred``. Binding a
    card already bound changes nothing (or makes it the first, when ``preferred``), so a
    retry is harmless. Past ``limit`` cards: FailedPrecondition TOO_MANY_CARDS."""
    cards = reads.bound_cards(b.tx, user)
    if card_id in cards:
        if not preferred or cards[0] == card_id:
            return cards
        cards.remove(card_id)
    elif len(cards) >= limit:
        raise errors.FailedPrecondition(
            "TOO_MANY_CARDS", f"at most {limit} bound cards: unbind one first",
            limit=str(limit))
    if preferred:
        cards.insert(0, card_id)
    else:
        cards.append(card_id)
    b.tx.put(keys.CARDS, user, json.dumps(cards).encode())
    return cards


def unbind_card(b: Books, user: bytes, card_id: str) -> tuple[list[str], bool]:
    """Takes a card off the user's bound cards; (the cards left, whether it was bound).
    Unbinding a card that is not bound changes nothing, so a retry is harmless."""
    cards = reads.bound_cards(b.tx, user)
    if card_id not in cards:
        return cards, False
    cards.remove(card_id)
    if cards:
        b.tx.put(keys.CARDS, user, json.dumps(cards).encode())
    else:
        b.tx.delete(keys.CARDS, user)
    return cards, True
