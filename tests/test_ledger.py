"""The LMDB ledger in process: group commit, double entry, idempotency, credits."""

from __future__ import annotations

import asyncio

import pytest

import hotpath
from gateway import errors
from gateway.ledger import (
    KIND_LUCKY,
    GrabOutcome,
    LmdbLedger,
    Payment,
    PaymentStatus,
    TxKind,
    payment_id_for,
)
from gateway.ledger._lmdb import _BE64, _op_apply_credits
from gateway.ops import reconcile
from tests.conftest import run


@pytest.fixture
def ledger(tmp_path):
    led = LmdbLedger(tmp_path, max_batch=256)
    yield led
    led.close()


def _top_up(user: str, rid: str, amount: int) -> Payment:
    return Payment(payment_id_for(user, "top_up", rid), user, "top_up", "icbc-1", "icbc",
                   amount, PaymentStatus.PENDING)


async def _fund(led: LmdbLedger, user: str, amount: int, rid: str = "t1") -> None:
    p, _created = await led.begin_payment(_top_up(user, rid, amount), b"f" * 16, 60_000)
    await led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)


async def _send(led, user, total, count, rid="s1"):
    shares = hotpath.split_lucky(total, count)
    return await led.send_from_balance(user, rid, b"x" * 16, total_fen=total, count=count,
                                       kind=KIND_LUCKY, greeting="hi", expires_in_s=3600,
                                       shares=shares)


def assert_balanced(led: LmdbLedger) -> reconcile.Report:
    report = reconcile.audit(led)
    assert report.balanced, report.discrepancies
    return report


def test_concurrent_grabs_share_group_commits(ledger):
    """Many concurrent grabs are committed in fewer transactions than requests, each exactly."""
    async def scenario():
        await _fund(ledger, "alice", 100_000)
        env = await _send(ledger, "alice", 100_000, 100)
        results = await asyncio.gather(*(ledger.grab(f"u{i}", env.envelope_id, "r")
                                         for i in range(150)))
        return env, results

    before = ledger.writer.batches
    env, results = run(scenario())
    grabbed = [r for r in results if r.outcome == GrabOutcome.GRABBED]
    assert len(grabbed) == 100
    assert sum(r.amount_fen for r in grabbed) == 100_000
    assert sum(r.outcome == GrabOutcome.SOLD_OUT for r in results) == 50
    assert ledger.writer.batches - before < 150
    view = ledger.get_envelope(env.envelope_id)
    assert view.remaining_count == 0 and view.remaining_fen == 0
    best = max(view.grabs, key=lambda g: (g.amount_fen, -g.share_index))
    assert view.best_luck_user_id == best.user_id
    assert_balanced(ledger)


def test_send_without_funds_changes_nothing(ledger):
    """An envelope the wallet cannot cover is refused and moves no money."""
    async def scenario():
        await _fund(ledger, "bob", 500)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await _send(ledger, "bob", 501, 1)
        return exc.value

    err = run(scenario())
    assert err.reason == "INSUFFICIENT_BALANCE"
    assert ledger.balance("bob") == (500, 0)
    assert_balanced(ledger)


def test_send_is_idempotent_and_refuses_reused_ids(ledger):
    """A retried send returns the first envelope; the same id with another payload is refused."""
    async def scenario():
        await _fund(ledger, "carol", 10_000)
        first = await _send(ledger, "carol", 1000, 10, rid="same")
        again = await _send(ledger, "carol", 1000, 10, rid="same")
        with pytest.raises(errors.InvalidArgument) as exc:
            await ledger.send_from_balance(
                "carol", "same", b"y" * 16, total_fen=2000, count=10, kind=KIND_LUCKY,
                greeting="", expires_in_s=60, shares=hotpath.split_lucky(2000, 10))
        return first, again, exc.value

    first, again, err = run(scenario())
    assert first == again
    assert err.reason == "REQUEST_ID_REUSED"
    assert ledger.balance("carol") == (9000, 0)
    assert_balanced(ledger)


def test_grab_retry_returns_first_result(ledger):
    """The same user grabbing again gets the first share back, or ALREADY_GRABBED with a new id."""
    async def scenario():
        await _fund(ledger, "dan", 1000)
        env = await _send(ledger, "dan", 1000, 3)
        a = await ledger.grab("erin", env.envelope_id, "r1")
        b = await ledger.grab("erin", env.envelope_id, "r1")
        c = await ledger.grab("erin", env.envelope_id, "r2")
        return a, b, c

    a, b, c = run(scenario())
    assert a.outcome == b.outcome == GrabOutcome.GRABBED and a.amount_fen == b.amount_fen
    assert c.outcome == GrabOutcome.ALREADY_GRABBED
    assert ledger.balance("erin") == (0, a.amount_fen)
    assert_balanced(ledger)


def test_credits_apply_exactly_once_even_when_redelivered(ledger):
    """Pending credit moves to the wallet once, even if the bus delivers the grab twice."""
    async def scenario():
        await _fund(ledger, "fay", 3000)
        env = await _send(ledger, "fay", 3000, 3)
        r = await ledger.grab("gus", env.envelope_id, "r")
        applied = await ledger.apply_credits(100)
        # Put the delivered message back, as a crash before the ack would.
        gkey = env.envelope_id.encode() + b"/gus"

        def redeliver(b):
            b.publish("credit", gkey)
            return _op_apply_credits(b, 100)

        again = await ledger.writer.submit(redeliver)
        return r, applied, again

    r, applied, again = run(scenario())
    assert applied == 1 and again == 0
    assert ledger.balance("gus") == (r.amount_fen, 0)
    entries, _ = ledger.list_transactions("gus", 10, None)
    assert [e.kind for e in entries] == [TxKind.ENVELOPE_CREDIT]
    assert_balanced(ledger)


def test_transactions_page_newest_first(ledger):
    """ListTransactions pages through a wallet's entries newest first with a cursor."""
    async def scenario():
        for i in range(5):
            await _fund(ledger, "hal", 100 + i, rid=f"t{i}")

    run(scenario())
    first, cursor = ledger.list_transactions("hal", 2, None)
    second, cursor2 = ledger.list_transactions("hal", 2, cursor)
    third, cursor3 = ledger.list_transactions("hal", 2, cursor2)
    amounts = [e.amount_fen for e in first + second + third]
    assert amounts == [104, 103, 102, 101, 100]
    assert cursor3 is None
    assert ledger.list_transactions("nobody", 5, None) == ([], None)


def test_failed_payment_moves_nothing(ledger):
    """A payment the bank refused ends FAILED and leaves every account as it was."""
    async def scenario():
        p, _created = await ledger.begin_payment(_top_up("ivy", "r", 100), b"f" * 16, 60_000)
        return await ledger.finish_payment(p.payment_id, PaymentStatus.FAILED, "CARD_DECLINED")

    p = run(scenario())
    assert p.status == PaymentStatus.FAILED and p.reason == "CARD_DECLINED"
    assert ledger.balance("ivy") == (0, 0)
    assert_balanced(ledger)


def test_a_bug_in_one_request_aborts_only_its_batch_cleanly(ledger):
    """An operation that breaks an invariant fails its batch with INTERNAL and writes nothing."""
    async def scenario():
        await _fund(ledger, "jo", 100)

        def overdraw(b):
            b.move(b"t:bogus", b"w:jo", b"w:kim", 1000, 1, b"")

        with pytest.raises(errors.Internal):
            await ledger.writer.submit(overdraw)

    run(scenario())
    assert ledger.balance("jo") == (100, 0)
    assert ledger.balance("kim") == (0, 0)
    assert_balanced(ledger)


def test_writer_queue_is_bounded(tmp_path):
    """Past its queue limit the writer refuses at once with RESOURCE_EXHAUSTED."""
    led = LmdbLedger(tmp_path, max_batch=1, queue_limit=1)
    try:
        led.writer._depth = 1  # as if one request were waiting
        with pytest.raises(errors.ResourceExhausted) as exc:
            run(led.apply_credits(1))
        assert exc.value.reason == "WRITER_QUEUE_FULL"
    finally:
        led.writer._depth = 0
        led.close()


def test_map_grows_when_full(tmp_path):
    """A full LMDB map is grown and the batch retried, losing nothing."""
    led = LmdbLedger(tmp_path, map_size_bytes=1 << 20)
    try:
        async def scenario():
            for i in range(0, 1000, 50):
                if led.env.info()["map_size"] > 1 << 20:
                    break
                users = [f"user{j}" for j in range(i, i + 50)]
                await asyncio.gather(*(_fund(led, u, 1000, rid="x" * 60) for u in users))
                await asyncio.gather(*(_send(led, u, 1000, 100, rid="y" * 60) for u in users))

        run(scenario())
        assert led.env.info()["map_size"] > 1 << 20
        assert_balanced(led)
    finally:
        led.close()


def test_sequence_keys_are_big_endian(ledger):
    """Wallet entries page newest first past 256 entries, where little-endian keys would not."""
    assert _BE64.pack(1) < _BE64.pack(256) < _BE64.pack(2**40)

    async def scenario():
        for i in range(300):
            await _fund(ledger, "many", 1 + i, rid=f"t{i}")

    run(scenario())
    seen, cursor = [], None
    while True:
        page, cursor = ledger.list_transactions("many", 100, cursor)
        seen += [e.amount_fen for e in page]
        if cursor is None:
            break
    assert seen == list(range(300, 0, -1))
