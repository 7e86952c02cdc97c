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

import hotpath
from gateway import errors
from gateway.domain import keys, records
from gateway.domain.keys import (
    clearing_account,
    escrow_account,
    hold_account,
    pending_account,
    wallet_account,
)
from gateway.domain.model import (
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
    TxKind,
    UnlockResult,
    expired_refund_text,
    photo_income_text,
)
from gateway.domain.store import Books

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
        return dataclasses.replace(saved, status=_live_status(b, saved.envelope_id))
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


def _live_status(b: Books, envelope_id: str) -> int:
    buf = b.envelope(envelope_id.encode())
    assert buf is not None, envelope_id
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
    home = b.away(user) if b.away is not None else None
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
        if c.kind == CreditKind.PHOTO_INCOME:
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
    if old_due_ms:
        b.tx.delete(keys.RESOLVE, keys.due_key(old_due_ms, pid))
    if due_ms:
        b.tx.put(keys.RESOLVE, keys.due_key(due_ms, pid), b"")
    b.tx.put(keys.PAYMENTS, pid, records.pack_payment(p, fp, due_ms))


def begin_payment(b: Books, payment: Payment, fingerprint: bytes, due_in_ms: int,
                  envelope: CardEnvelope | None) -> PaymentBegun:
    """Saves a payment intent before the bank is called (or returns the saved one).

    A withdrawal holds its amount at once (wallet -> hold), so the wallet
    cannot spend it twice while the bank works. A card-paid envelope is
    created PAYING (not grabbable) with its shares already split.
    """
    key = payment.payment_id.encode()
    raw = b.tx.get(keys.PAYMENTS, key)
    if raw is not None:
        saved, saved_fp, _due = records.unpack_payment(raw)
        if saved_fp != fingerprint:
            raise errors.InvalidArgument(*_REUSED)
        return PaymentBegun(saved, False)
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
    home = b.away(owner) if b.away is not None else None
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
