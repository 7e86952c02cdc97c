"""The Ledger contract, one suite for both backends (LMDB on disk and memory).

Every test here takes the ``ledger`` fixture, which runs it once against
each backend; `make test` runs the file again with the pure-Python hot path.
Backend-specific behaviour (LMDB's map growth) is at the end.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

import hotpath
from gateway import errors
from gateway.domain import keys, records, rules
from gateway.domain.keys import payment_id_for
from gateway.domain.model import (
    CardEnvelope,
    EnvelopeKind,
    EnvelopeStatus,
    GrabOutcome,
    NoticeKind,
    Payment,
    PaymentKind,
    PaymentStatus,
    PayMethod,
    TxKind,
    UnlockResult,
)
from gateway.domain.store import Books
from gateway.ledger import BooksLedger, LmdbLedger, MemoryLedger
from tests.conftest import run

BACKENDS = ("lmdb", "memory")


def make_ledger(backend: str, tmp_path, **kw) -> BooksLedger:
    if backend == "lmdb":
        return LmdbLedger(tmp_path, **kw)
    return MemoryLedger(**{k: v for k, v in kw.items()
                           if k in ("max_batch", "queue_limit", "clock_ms")})


@pytest.fixture(params=BACKENDS)
def ledger(request, tmp_path):
    led = make_ledger(request.param, tmp_path, max_batch=256)
    yield led
    led.close()


def _top_up(user: str, rid: str, amount: int) -> Payment:
    return Payment(payment_id_for(user, PaymentKind.TOP_UP, rid), user, PaymentKind.TOP_UP,
                   "icbc-1", "icbc", amount, PaymentStatus.PENDING)


async def _fund(led: BooksLedger, user: str, amount: int, rid: str = "t1") -> None:
    p, _created = await led.begin_payment(_top_up(user, rid, amount), b"f" * 16, 60_000)
    await led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)


async def _send(led, user, total, count, rid="s1", expires_in_s=3600):
    shares = hotpath.split_lucky(total, count)
    return await led.send_from_balance(user, rid, b"x" * 16, total_fen=total, count=count,
                                       kind=EnvelopeKind.LUCKY, greeting="hi",
                                       expires_in_s=expires_in_s, shares=shares)


def assert_balanced(led: BooksLedger):
    report = run(led.audit())
    assert report.balanced, report.discrepancies
    return report


def test_concurrent_grabs_share_group_commits(ledger):
    """Many concurrent grabs are committed in fewer transactions than requests, each exactly."""
    async def scenario():
        await _fund(ledger, "alice", 100_000)
        env = await _send(ledger, "alice", 100_000, 100)
        before = (await ledger.stats()).batches
        results = await asyncio.gather(*(ledger.grab(f"u{i}", env.envelope_id, "r")
                                         for i in range(150)))
        batches = (await ledger.stats()).batches - before
        return env, results, batches, await ledger.get_envelope(env.envelope_id)

    _env, results, batches, view = run(scenario())
    grabbed = [r for r in results if r.outcome == GrabOutcome.GRABBED]
    assert len(grabbed) == 100
    assert sum(r.amount_fen for r in grabbed) == 100_000
    assert sum(r.outcome == GrabOutcome.SOLD_OUT for r in results) == 50
    assert batches < 150
    assert view.remaining_count == 0 and view.remaining_fen == 0
    assert view.status == EnvelopeStatus.SOLD_OUT
    best = max(view.grabs, key=lambda g: (g.amount_fen, -g.share_index))
    assert view.best_luck_user_id == best.user_id
    assert_balanced(ledger)


def test_send_without_funds_changes_nothing(ledger):
    """An envelope the wallet cannot cover is refused and moves no money."""
    async def scenario():
        await _fund(ledger, "bob", 500)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await _send(ledger, "bob", 501, 1)
        return exc.value, await ledger.balance("bob")

    err, balance = run(scenario())
    assert err.reason == "INSUFFICIENT_BALANCE"
    assert balance == (500, 0)
    assert_balanced(ledger)


def test_send_is_idempotent_and_refuses_reused_ids(ledger):
    """A retried send returns the first envelope; the same id with another payload is refused."""
    async def scenario():
        await _fund(ledger, "carol", 10_000)
        first = await _send(ledger, "carol", 1000, 10, rid="same")
        again = await _send(ledger, "carol", 1000, 10, rid="same")
        with pytest.raises(errors.InvalidArgument) as exc:
            await ledger.send_from_balance(
                "carol", "same", b"y" * 16, total_fen=2000, count=10, kind=EnvelopeKind.LUCKY,
                greeting="", expires_in_s=60, shares=hotpath.split_lucky(2000, 10))
        saved = await ledger.send_result("carol", "same", b"x" * 16)
        return first, again, exc.value, saved, await ledger.balance("carol")

    first, again, err, saved, balance = run(scenario())
    assert first == again == saved
    assert first.paid_via == PayMethod.BALANCE and first.status == EnvelopeStatus.ACTIVE
    assert err.reason == "REQUEST_ID_REUSED"
    assert balance == (9000, 0)
    assert_balanced(ledger)


def test_grab_retry_returns_first_result(ledger):
    """The same user grabbing again gets the first share back, or ALREADY_GRABBED with a new id."""
    async def scenario():
        await _fund(ledger, "dan", 1000)
        env = await _send(ledger, "dan", 1000, 3)
        a = await ledger.grab("erin", env.envelope_id, "r1")
        b = await ledger.grab("erin", env.envelope_id, "r1")
        c = await ledger.grab("erin", env.envelope_id, "r2")
        found = await ledger.find_grab("erin", env.envelope_id)
        state = await ledger.envelope_state(env.envelope_id)
        grabbers = await ledger.grabbers(env.envelope_id)
        return a, b, c, found, state, grabbers, await ledger.balance("erin")

    a, b, c, found, state, grabbers, balance = run(scenario())
    assert a.outcome == b.outcome == GrabOutcome.GRABBED and a.amount_fen == b.amount_fen
    assert c.outcome == GrabOutcome.ALREADY_GRABBED
    assert found.grab.amount_fen == a.amount_fen and found.remaining_count == 2
    assert found.request_digest == keys.request_digest("r1")
    assert (state.count, state.claimed, state.status) == (3, 1, EnvelopeStatus.ACTIVE)
    assert grabbers == [b"erin"]
    assert balance == (0, a.amount_fen)
    assert_balanced(ledger)


def test_grab_many_answers_each_item_on_its_own(ledger):
    """A batch of grabs gives a result or an error per item, and the good ones land."""
    async def scenario():
        await _fund(ledger, "finn", 300)
        env = await _send(ledger, "finn", 300, 2)
        return await ledger.grab_many([("u1", env.envelope_id, "r"),
                                       ("u2", "env_00000000000000000000", "r"),
                                       ("u3", env.envelope_id, "r"),
                                       ("u4", env.envelope_id, "r")])

    r1, missing, r3, r4 = run(scenario())
    assert r1.outcome == r3.outcome == GrabOutcome.GRABBED
    assert r1.amount_fen + r3.amount_fen == 300
    assert isinstance(missing, errors.NotFound) and missing.reason == "ENVELOPE_NOT_FOUND"
    assert r4.outcome == GrabOutcome.SOLD_OUT
    assert_balanced(ledger)


def test_credits_apply_exactly_once_even_when_redelivered(ledger):
    """Pending credit moves to the wallet once, even if the outbox delivers the grab twice."""
    async def scenario():
        await _fund(ledger, "fay", 3000)
        env = await _send(ledger, "fay", 3000, 3)
        r = await ledger.grab("gus", env.envelope_id, "r")
        backlog = (await ledger.stats()).credit_backlog
        applied = await ledger.apply_credits(100)
        # Put the delivered message back, as a crash before the ack would.
        gkey = keys.grab_key(env.envelope_id.encode(), b"gus")

        def redeliver(b: Books) -> int:
            b.publish_credit(gkey)
            return rules.apply_credits(b, 100)

        again = await ledger.write(redeliver)
        page = await ledger.list_transactions("gus", 10, None)
        feed = await ledger.notifications("gus", 0, 10)
        return r, backlog, applied, again, page, feed, await ledger.balance("gus")

    r, backlog, applied, again, page, feed, balance = run(scenario())
    assert backlog == 1 and applied == 1 and again == 0
    assert balance == (r.amount_fen, 0)
    assert [e.kind for e in page.entries] == [TxKind.ENVELOPE_CREDIT]
    assert [(n.kind, n.amount_fen) for n in feed] == [(NoticeKind.CREDITED, r.amount_fen)]
    assert_balanced(ledger)


def test_transactions_page_newest_first(ledger):
    """ListTransactions pages through a wallet's entries newest first with a cursor."""
    async def scenario():
        for i in range(5):
            await _fund(ledger, "hal", 100 + i, rid=f"t{i}")
        first = await ledger.list_transactions("hal", 2, None)
        second = await ledger.list_transactions("hal", 2, first.next_cursor)
        third = await ledger.list_transactions("hal", 2, second.next_cursor)
        nobody = await ledger.list_transactions("nobody", 5, None)
        return first, second, third, nobody

    first, second, third, nobody = run(scenario())
    amounts = [e.amount_fen for e in first.entries + second.entries + third.entries]
    assert amounts == [104, 103, 102, 101, 100]
    assert third.next_cursor is None
    assert nobody == ([], None)


def test_sequence_keys_page_past_256_entries(ledger):
    """Wallet entries page newest first past 256 entries, where little-endian keys would not."""
    assert keys.be64(1) < keys.be64(256) < keys.be64(2**40)

    async def scenario():
        for i in range(300):
            await _fund(ledger, "many", 1 + i, rid=f"t{i}")
        seen, cursor = [], None
        while True:
            page = await ledger.list_transactions("many", 100, cursor)
            seen += [e.amount_fen for e in page.entries]
            cursor = page.next_cursor
            if cursor is None:
                return seen

    assert run(scenario()) == list(range(300, 0, -1))


def test_failed_payment_moves_nothing(ledger):
    """A payment the bank refused ends FAILED and leaves every account as it was."""
    async def scenario():
        p, _created = await ledger.begin_payment(_top_up("ivy", "r", 100), b"f" * 16, 60_000)
        done = await ledger.finish_payment(p.payment_id, PaymentStatus.FAILED, "CARD_DECLINED")
        return done, await ledger.balance("ivy")

    p, balance = run(scenario())
    assert p.status == PaymentStatus.FAILED and p.reason == "CARD_DECLINED"
    assert balance == (0, 0)
    assert_balanced(ledger)


def test_payment_intent_is_idempotent_and_finishes_once(ledger):
    """A retried intent returns the saved one, another payload is refused, and a second
    finish (the resolver's, after the handler's) changes nothing."""
    async def scenario():
        intent = _top_up("jay", "r", 700)
        first = await ledger.begin_payment(intent, b"f" * 16, 60_000)
        again = await ledger.begin_payment(intent, b"f" * 16, 60_000)
        with pytest.raises(errors.InvalidArgument) as exc:
            await ledger.begin_payment(intent, b"g" * 16, 60_000)
        done = await ledger.finish_payment(intent.payment_id, PaymentStatus.SUCCEEDED)
        late = await ledger.finish_payment(intent.payment_id, PaymentStatus.REFUNDED,
                                           from_states=(PaymentStatus.UNKNOWN,))
        return first, again, exc.value, done, late, await ledger.balance("jay")

    first, again, err, done, late, balance = run(scenario())
    assert first.created and not again.created and first.payment == again.payment
    assert err.reason == "REQUEST_ID_REUSED"
    assert done.status == late.status == PaymentStatus.SUCCEEDED
    assert balance == (700, 0)
    assert_balanced(ledger)


def test_withdrawal_holds_then_returns_the_money(ledger):
    """A withdrawal holds its amount at once; a locked order gives it back to the wallet."""
    async def scenario():
        await _fund(ledger, "kay", 1000)
        pid = payment_id_for("kay", PaymentKind.WITHDRAW, "w")
        intent = Payment(pid, "kay", PaymentKind.WITHDRAW, "icbc-1", "icbc", 400,
                         PaymentStatus.PENDING)
        await ledger.begin_payment(intent, b"w" * 16, 60_000)
        held = await ledger.balance("kay")
        with pytest.raises(errors.FailedPrecondition):
            await ledger.begin_payment(
                Payment(payment_id_for("kay", PaymentKind.WITHDRAW, "w2"), "kay",
                        PaymentKind.WITHDRAW, "icbc-1", "icbc", 700, PaymentStatus.PENDING),
                b"v" * 16, 60_000)
        unknown = await ledger.payment_unknown(pid, 0, "BANK_RESULT_UNKNOWN")
        due = await ledger.due_payments(10, now_ms=time.time_ns() // 1_000_000 + 1)
        audit_open = await ledger.audit()
        done = await ledger.finish_payment(pid, PaymentStatus.FAILED, "LOCKED",
                                           from_states=(PaymentStatus.UNKNOWN,))
        feed = await ledger.notifications("kay", 0, 10)
        return held, unknown, due, audit_open, done, feed, await ledger.balance("kay")

    held, unknown, due, audit_open, done, feed, balance = run(scenario())
    assert held == (600, 0)
    assert unknown.status == PaymentStatus.UNKNOWN and due == [unknown.payment_id]
    assert audit_open.balanced and [p["status"] for p in audit_open.in_flight] == ["UNKNOWN"]
    assert done.status == PaymentStatus.FAILED and balance == (1000, 0)
    assert [n.kind for n in feed] == [NoticeKind.SUCCEEDED, NoticeKind.UNKNOWN,
                                      NoticeKind.LOCKED]
    assert_balanced(ledger)


def test_card_paid_envelope_is_not_grabbable_until_paid(ledger):
    """A card-paid envelope is PAYING (grabs refused) until the bank settles, then ACTIVE."""
    async def scenario():
        env_id = keys.new_envelope_id("lee")
        pid = payment_id_for("lee", PaymentKind.ENVELOPE, "s")
        intent = Payment(pid, "lee", PaymentKind.ENVELOPE, "ccb-9", "ccb", 500,
                         PaymentStatus.PENDING, envelope_id=env_id)
        card_env = CardEnvelope(env_id, 5, EnvelopeKind.NORMAL, "", 3600, [100] * 5, "s",
                                b"e" * 16)
        await ledger.begin_payment(intent, b"e" * 16, 60_000, card_env)
        paying = await ledger.envelope_state(env_id)
        sent = await ledger.send_result("lee", "s", b"e" * 16)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await ledger.grab("may", env_id, "r")
        await ledger.finish_payment(pid, PaymentStatus.SUCCEEDED)
        grabbed = await ledger.grab("may", env_id, "r")
        return paying, sent, exc.value, grabbed, await ledger.get_envelope(env_id)

    paying, sent, err, grabbed, view = run(scenario())
    assert paying.status == EnvelopeStatus.PAYING
    assert sent.paid_via == PayMethod.CARD and sent.status == EnvelopeStatus.PAYING
    assert err.reason == "ENVELOPE_NOT_PAID"
    assert grabbed.outcome == GrabOutcome.GRABBED and grabbed.amount_fen == 100
    assert view.status == EnvelopeStatus.ACTIVE and view.sender_id == "lee"
    assert_balanced(ledger)


def test_expiry_returns_the_unclaimed_rest_once(ledger):
    """An expired envelope's unclaimed shares go back to the sender exactly once."""
    async def scenario():
        await _fund(ledger, "ned", 1000)
        env = await _send(ledger, "ned", 1000, 4, expires_in_s=1)
        got = await ledger.grab("oli", env.envelope_id, "r")
        await asyncio.sleep(1.05)
        first = await ledger.expire_due(10)
        second = await ledger.expire_due(10)
        late = await ledger.grab("pat", env.envelope_id, "r")
        return got, first, second, late, await ledger.balance("ned")

    got, first, second, late, balance = run(scenario())
    assert (first, second) == (1, 0)
    assert late.outcome == GrabOutcome.EXPIRED
    assert balance == (1000 - got.amount_fen, 0)
    report = assert_balanced(ledger)
    # Where the money went, from the journal: in from the card, into the envelope, one
    # share grabbed (and credited, or still pending), the rest back to the sender.
    flows = report.totals["flows_fen"]
    assert flows["top_up:clearing->wallet"] == 1000
    assert flows["envelope_sent:wallet->escrow"] == 1000
    assert flows["grab:escrow->pending"] == got.amount_fen
    assert flows["expiry_refund:escrow->wallet"] == 1000 - got.amount_fen
    assert flows.get("envelope_credit:pending->wallet", 0) in (0, got.amount_fen)


def test_unknown_envelope_is_not_found(ledger):
    """Reading or grabbing an envelope that does not exist is NOT_FOUND and writes nothing."""
    async def scenario():
        with pytest.raises(errors.NotFound):
            await ledger.get_envelope("env_00000000000000000000")
        with pytest.raises(errors.NotFound):
            await ledger.grab("q", "env_00000000000000000000", "r")
        return (await ledger.envelope_state("env_00000000000000000000"),
                await ledger.get_payment("pay_x"), await ledger.stats())

    state, payment, stats = run(scenario())
    assert state is None and payment is None
    assert stats.credit_backlog == 0 and stats.queue_depth == 0
    assert_balanced(ledger)


async def _unlock(led, viewer, owner, rid="u1", photo="ph1", amount=100, fp=None):
    return await led.unlock_photo(viewer, rid, fp or keys.fingerprint("unlock", photo, owner),
                                  owner_id=owner, photo_id=photo, amount_fen=amount)


def test_photo_unlock_moves_once_from_viewer_to_owner(ledger):
    """A paid unlock is one viewer -> owner transfer with an entry in each wallet and the
    owner told; a retry returns it, another payload under its id is refused."""
    async def scenario():
        await _fund(ledger, "vic", 1000)
        first = await _unlock(ledger, "vic", "olga")
        again = await _unlock(ledger, "vic", "olga")
        with pytest.raises(errors.InvalidArgument) as exc:
            await _unlock(ledger, "vic", "olga", photo="ph2")
        with pytest.raises(errors.InvalidArgument):
            await ledger.unlock_result("vic", "u1", keys.fingerprint("unlock", "ph1", "pat"))
        found = await ledger.unlock_result("vic", "u1", keys.fingerprint("unlock", "ph1", "olga"))
        pages = [await ledger.list_transactions(u, 10, None) for u in ("vic", "olga")]
        return (first, again, exc.value, found, pages, await ledger.notifications("olga", 0, 10),
                await ledger.balance("vic"), await ledger.balance("olga"))

    first, again, err, found, (vic, olga), feed, vic_bal, olga_bal = run(scenario())
    assert first == again == found
    assert first.payment_id == keys.unlock_id("vic", "u1", free=False)
    assert (first.amount_fen, first.free) == (100, False)
    assert err.reason == "REQUEST_ID_REUSED"
    assert vic_bal == (900, 0) and olga_bal == (100, 0)
    tid = keys.unlock_tid(first.payment_id.encode()).decode()
    assert [(e.kind, e.amount_fen, e.transaction_id, e.reference_id) for e in vic.entries[:1]
            ] == [(TxKind.PHOTO_UNLOCK, -100, tid, first.payment_id)]
    assert [(e.kind, e.amount_fen, e.transaction_id, e.reference_id) for e in olga.entries
            ] == [(TxKind.PHOTO_INCOME, 100, tid, first.payment_id)]
    assert [(n.kind, n.amount_fen, n.payment_id) for n in feed] == [
        (NoticeKind.CREDITED, 100, first.payment_id)]
    assert "ph1" in feed[0].message
    report = assert_balanced(ledger)
    assert report.totals["unlocks"] == 1 and report.totals["unlock_fen"] == 100


def test_photo_unlock_without_funds_changes_nothing(ledger):
    """An unlock the wallet cannot cover is refused and writes nothing, not even its record."""
    async def scenario():
        await _fund(ledger, "wes", 99)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await _unlock(ledger, "wes", "olga")
        found = await ledger.unlock_result("wes", "u1", keys.fingerprint("unlock", "ph1", "olga"))
        return (exc.value, found, await ledger.balance("wes"), await ledger.balance("olga"),
                await ledger.list_transactions("olga", 10, None),
                await ledger.notifications("olga", 0, 10))

    err, found, wes, olga, page, feed = run(scenario())
    assert err.reason == "INSUFFICIENT_BALANCE" and err.metadata["needed_fen"] == "100"
    assert found is None and wes == (99, 0) and olga == (0, 0)
    assert page.entries == [] and feed == []
    assert_balanced(ledger)


def test_audit_catches_unlock_record_and_transfer_out_of_step(ledger):
    """An unlock transfer without its record, or a record without its transfer, is reported."""
    async def scenario():
        await _fund(ledger, "xan", 1000)

        def stray_transfer(b: Books) -> None:
            b.move(keys.unlock_tid(b"unl_stray"), b"w:xan", b"w:yul", 5, TxKind.PHOTO_UNLOCK,
                   b"unl_stray")

        def stray_record(b: Books) -> None:
            result = UnlockResult("unl_norecord", 7, False)
            b.tx.put(keys.IDEM, keys.unlock_idem_key(b"xan", b"r9"),
                     records.pack_unlock(b"f" * 16, result, "yul", "ph9"))

        await ledger.write(stray_transfer)
        await ledger.write(stray_record)
        return await ledger.audit()

    report = run(scenario())
    assert not report.balanced
    assert any("u:unl_stray belongs to no photo unlock" in d for d in report.discrepancies)
    assert any("u:unl_norecord" in d and "is missing" in d for d in report.discrepancies)


def test_a_bug_in_one_request_aborts_only_its_batch_cleanly(ledger):
    """A rule that breaks an invariant fails its batch with INTERNAL and writes nothing."""
    async def scenario():
        await _fund(ledger, "jo", 100)

        def overdraw(b: Books) -> None:
            b.move(b"t:bogus", b"w:jo", b"w:kim", 1000, 1, b"")

        with pytest.raises(errors.Internal) as exc:
            await ledger.write(overdraw)
        assert exc.value.reason == "WRITE_FAILED" and "jo" not in exc.value.message
        return await ledger.balance("jo"), await ledger.balance("kim")

    assert run(scenario()) == ((100, 0), (0, 0))
    assert_balanced(ledger)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writer_queue_is_bounded(backend, tmp_path):
    """Past its queue limit the writer refuses at once with RESOURCE_EXHAUSTED."""
    led = make_ledger(backend, tmp_path, max_batch=1, queue_limit=1)

    async def scenario():
        # Two writes in one turn of the loop: the second finds the queue full.
        results = await asyncio.gather(
            *(led.write(lambda b: time.sleep(0.05)) for _ in range(2)),
            return_exceptions=True)
        return results

    try:
        results = run(scenario())
    finally:
        led.close()
    refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
    assert len(refused) == 1 and refused[0].reason == "WRITER_QUEUE_FULL"


def test_lmdb_map_grows_when_full(tmp_path):
    """A full LMDB map is grown and the batch retried, losing nothing."""
    led = LmdbLedger(tmp_path, map_size_bytes=1 << 20)
    try:
        async def scenario():
            for i in range(0, 1000, 50):
                if led.map_size_bytes > 1 << 20:
                    break
                users = [f"user{j}" for j in range(i, i + 50)]
                await asyncio.gather(*(_fund(led, u, 1000, rid="x" * 60) for u in users))
                await asyncio.gather(*(_send(led, u, 1000, 100, rid="y" * 60) for u in users))

        run(scenario())
        assert led.map_size_bytes > 1 << 20
        assert_balanced(led)
    finally:
        led.close()


def test_an_idle_ledger_commits_nothing_when_swept(ledger):
    """The credit and expiry sweeps look first: with nothing due they write nothing (in
    strict durability each write transaction would be an fsync)."""
    async def scenario():
        before = (await ledger.stats()).batches
        for _ in range(20):
            assert await ledger.apply_credits(100) == 0
            assert await ledger.expire_due(100) == 0
        idle = (await ledger.stats()).batches - before
        await _fund(ledger, "ida", 1000)
        env = await _send(ledger, "ida", 1000, 2)
        await ledger.grab("ivo", env.envelope_id, "r")
        return idle, await ledger.apply_credits(100)

    idle, applied = run(scenario())
    assert idle == 0 and applied == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_ledger_refuses_writes_shutting_down(backend, tmp_path):
    """After close (the graceful stop), a write is UNAVAILABLE SHUTTING_DOWN, not a hang."""
    led = make_ledger(backend, tmp_path)
    run(_fund(led, "sd", 100))
    led.close()

    async def late():
        with pytest.raises(errors.Unavailable) as exc:
            await _fund(led, "sd", 100, rid="late")
        return exc.value.reason
    assert run(late()) == "SHUTTING_DOWN"


def test_a_stuck_writer_times_out_sync_callers(tmp_path):
    """submit_sync (CLI, recovery) gives up with UNAVAILABLE WRITER_TIMEOUT, then the write
    it queued still lands once the writer moves again."""
    led = LmdbLedger(tmp_path)
    try:
        started = threading.Event()

        def stall(_b):
            started.set()
            time.sleep(0.5)

        async def block():
            return await led.write(stall)
        blocker = threading.Thread(target=run, args=(block(),))
        blocker.start()
        assert started.wait(5)
        with pytest.raises(errors.Unavailable) as exc:
            led._writer.submit_sync(_noop, timeout_s=0.05)
        assert exc.value.reason == "WRITER_TIMEOUT"
        blocker.join(10)
    finally:
        led.close()


def _noop(_b) -> None:
    return None


def test_a_map_that_cannot_grow_is_ledger_full_and_loses_nothing(tmp_path):
    """Past its size limit the writer answers RESOURCE_EXHAUSTED LEDGER_FULL for the batch;
    what was committed before stays, and the books still balance."""
    led = LmdbLedger(tmp_path, map_size_bytes=1 << 20)
    led._writer._map_size_limit = 1 << 20   # no room to grow
    try:
        async def fill():
            funded = []
            for i in range(2000):
                try:
                    await _fund(led, f"full{i}", 1000, rid="x" * 60)
                except errors.ResourceExhausted as exc:
                    return funded, exc.reason
                funded.append(f"full{i}")
            return funded, None
        funded, reason = run(fill())
        assert reason == "LEDGER_FULL" and funded
        assert run(led.balance(funded[-1])) == (1000, 0)
        assert_balanced(led)
    finally:
        led.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expiry_races_the_deadline_and_refunds_exactly_once(backend, tmp_path):
    """On an injected clock: a grab 1 ms before the deadline gets its share, one at the
    deadline is EXPIRED; sweeps before it refund nothing; two sweeps racing at it refund
    the rest once, to the fen; later sweeps and grabs change nothing."""
    now = [1_800_000_000_000]
    led = make_ledger(backend, tmp_path, clock_ms=lambda: now[0])
    try:
        async def scenario():
            await _fund(led, "snd", 10_000)
            sent = await _send(led, "snd", 1_000, 5, expires_in_s=10)
            env = sent.envelope_id
            deadline = now[0] + 10_000
            now[0] = deadline - 1
            early = [await led.grab(f"r{i}", env, "g") for i in range(2)]
            assert [r.outcome for r in early] == [GrabOutcome.GRABBED] * 2
            assert await led.expire_due(100) == 0          # not due yet: nothing written
            now[0] = deadline
            late = await led.grab("r9", env, "g")
            assert late.outcome == GrabOutcome.EXPIRED and late.amount_fen == 0
            raced = await asyncio.gather(led.expire_due(100), led.expire_due(100))
            assert sorted(raced) == [0, 1]
            assert await led.expire_due(100) == 0
            after_grab = await led.grab("r8", env, "g")
            assert after_grab.outcome == GrabOutcome.EXPIRED
            grabbed = sum(r.amount_fen for r in early)
            assert (await led.balance("snd"))[0] == 10_000 - grabbed  # the rest came back once
        run(scenario())
        assert_balanced(led)
    finally:
        led.close()


def test_a_map_grown_by_another_process_is_adopted_not_a_write_failure(tmp_path):
    """Two workers share one LMDB: when one grows the map, the other's next write and read
    adopt the new size (MDB_MAP_RESIZED) instead of failing WRITE_FAILED from then on."""
    import subprocess
    import sys
    led = LmdbLedger(tmp_path, map_size_bytes=1 << 20)
    try:
        run(_fund(led, "before", 100))
        grow = (
            "import asyncio, sys\n"
            "from gateway.ledger import LmdbLedger\n"
            "from tests.test_ledger import _fund\n"
            f"led = LmdbLedger({str(tmp_path)!r}, map_size_bytes=1 << 20)\n"
            "async def fill():\n"
            "    for i in range(40):\n"
            "        await asyncio.gather(*(_fund(led, f'g{i}-{j}', 10, rid='x' * 60)\n"
            "                               for j in range(100)))\n"
            "asyncio.run(fill())\n"
            "assert led.map_size_bytes > 1 << 20, led.map_size_bytes\n"
            "led.close()\n")
        done = subprocess.run([sys.executable, "-c", grow], capture_output=True, text=True,
                              timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
        assert done.returncode == 0, done.stderr[-2000:]
        run(_fund(led, "after", 100))            # a write: adopts the grown map
        assert run(led.balance("g39-99")) == (10, 0)   # a read of the other's data
        assert led.map_size_bytes > 1 << 20
        assert_balanced(led)
    finally:
        led.close()


def test_envelope_ids_carry_the_senders_slot_and_old_ids_stay_valid():
    """The slot is a stable hash of the user id (the same in every process and run), an
    envelope id carries its sender's, and ids made before ids carried a slot still pass."""
    from gateway.usecases.checks import check_envelope_id

    assert keys.slot_of("alice") == keys.slot_of("alice")
    assert {keys.slot_of(f"user{i}") for i in range(20_000)} == set(range(keys.SLOTS))
    # A fixed value: a change of the hash would move every user of a running cluster.
    assert keys.slot_of("alice") == int.from_bytes(
        __import__("hashlib").blake2b(b"alice", digest_size=8).digest(), "big") % 1024
    env = keys.new_envelope_id("alice")
    assert len(env) == 27 and keys.envelope_slot(env) == keys.slot_of("alice")
    assert check_envelope_id(env) == env
    old = "env_0123456789abcdef0123"
    assert check_envelope_id(old) == old and keys.envelope_slot(old) is None
    for bad in ("env_4ff0123456789abcdef0123", "env_0123", "env_" + "g" * 20):
        with pytest.raises(errors.InvalidArgument):
            check_envelope_id(bad)


def test_the_writer_queue_depth_stays_exact_under_writes_from_many_threads(tmp_path):
    """Writes from the event loop and from other threads at once, while the writer thread
    commits them: afterwards the depth is exactly 0 (it is never negative: a negative
    depth broke GetQosStatus, whose field is unsigned)."""
    led = LmdbLedger(tmp_path, max_batch=8)
    seen: list[int] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a lost update shows at once
    try:
        def sync_writes() -> None:
            for _ in range(300):
                led._writer.submit_sync(_noop)
                seen.append(led._writer.depth)

        async def loop_writes() -> None:
            for _ in range(30):
                await asyncio.gather(*(led.write(_noop) for _ in range(20)))
                seen.append(led._writer.depth)

        threads = [threading.Thread(target=sync_writes) for _ in range(3)]
        for t in threads:
            t.start()
        run(loop_writes())
        for t in threads:
            t.join(30)
        assert led._writer.depth == 0 and min(seen) >= 0
        assert led._writer.requests == 3 * 300 + 30 * 20
    finally:
        sys.setswitchinterval(interval)
        led.close()
