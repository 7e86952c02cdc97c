"""Handing slots from one SET to another in the books (cluster mode), on both backends: two
SETs' ledgers side by side, the control plane's part (freeze, shipping, the map switch)
played by the test.

SET a owns the slots of the ``s-*`` users (the set S) until the move; ``b-*`` users live
on b throughout, everyone else on a. ``export_slots`` on a credits every waiting grab of
S, moves S's wallets and escrows to x:b (m: transfers, queued for the relay like any remote
credit) and its records into chunks; b applies the chunks (``import_slots``) and the
credits (``apply_remote_credits``), each once however often and in whatever order they
arrive. Afterwards each SET balances alone, the x: accounts net to zero, every fen of S
is on b, and b answers S's users as a would have.
"""

from __future__ import annotations

import pytest

from gateway import errors
from gateway.cluster import bus
from gateway.domain import keys, records, rules
from gateway.domain.keys import slot_of
from gateway.domain.model import (
    CreditKind,
    EnvelopeKind,
    GrabOutcome,
    NoticeKind,
    PaymentStatus,
)
from gateway.domain.reads import Direction
from tests.conftest import run
from tests.test_ledger import BACKENDS, _fund, _send, _top_up, assert_balanced, make_ledger

MOVERS = ("s-alice", "s-bob", "s-eve")  # the users of the moving slots
S = frozenset(slot_of(u) for u in MOVERS)
STAYERS = ("a-carol", "a-frank", "a-gina", "b-dan", "b-hal")
assert not S & {slot_of(u) for u in STAYERS}, "pick other names: a stayer shares a slot"


@pytest.fixture(params=BACKENDS)
def two_sets(request, tmp_path):
    a = make_ledger(request.param, tmp_path / "a")
    b = make_ledger(request.param, tmp_path / "b")
    switched = [False]  # the slot map: S on a until the test switches it to b

    def home(user: bytes) -> bytes:
        if user.startswith(b"b-") or (switched[0] and slot_of(user.decode()) in S):
            return b"b"
        return b"a"

    a.set_placement(lambda u: None if home(u) == b"a" else home(u))
    b.set_placement(lambda u: None if home(u) == b"b" else home(u))
    yield a, b, switched
    a.close()
    b.close()


async def _balanced(led):
    report = await led.audit()
    assert report.balanced, report.discrepancies
    return report


def _interset(led, name: str) -> int:
    return run(led.audit()).totals.get("interset_fen", {}).get(name, 0)


async def _world(a, b):
    """S's users with money, history, grabbed envelopes (credited and not), an expired
    envelope, a final top-up and a paid photo unlock; the stayers around them."""
    await _fund(a, "s-alice", 10_000)
    await _fund(a, "s-bob", 3_000)
    await _fund(a, "a-carol", 5_000)
    await _fund(b, "b-dan", 5_000)
    env1 = (await _send(a, "s-alice", 1_000, 5, rid="send-1")).envelope_id
    env2 = (await _send(a, "s-alice", 300, 3, rid="send-2", expires_in_s=0)).envelope_id
    env3 = (await _send(a, "a-carol", 600, 3, rid="send-3")).envelope_id
    assert keys.envelope_slot(env1) in S and keys.envelope_slot(env3) not in S
    grabs = {"s-bob": await a.grab("s-bob", env1, "g-bob"),
             "b-dan": await a.grab("b-dan", env1, "g-dan")}
    assert await a.apply_credits(100) == 2  # bob's and dan's shares credited
    grabs["a-carol"] = await a.grab("a-carol", env1, "g-carol")  # waits on the outbox
    grabs["s-eve"] = await a.grab("s-eve", env3, "g-eve")  # a mover's grab of a stayer's
    assert await a.expire_due(10) == 1
    await a.unlock_photo("s-bob", "u-1", keys.fingerprint("unlock", "ph1", "a-carol"),
                         owner_id="a-carol", photo_id="ph1", amount_fen=50)
    # The relay and b's consumer have caught up before the freeze.
    due = await a.remote_credits_due(100)
    await b.apply_remote_credits("a", due)
    await a.remote_credits_sent([c.seq for c in due])
    return env1, env2, env3, grabs


async def _views(led, users):
    return {u: (await led.balance(u), (await led.list_transactions(u, 100, None)).entries,
                await led.notifications(u, 0, 100)) for u in users}


def test_a_handoff_carries_every_fen_and_record_exactly_once(two_sets):
    """Export on a, chunks and credits delivered to b twice each (chunks first for one half
    of the credits, after for the other): both SETs balance alone, x: nets to zero, S's
    money and history are on b, and grabs, retries and sends of S behave there as on a."""
    a, b, switched = two_sets

    async def scenario():
        env1, env2, env3, grabs = await _world(a, b)
        before = await _views(a, MOVERS)
        escrow1 = (await a.get_envelope(env1)).remaining_fen
        pending = {u: before[u][0].pending_credit_fen for u in MOVERS}
        done = await a.export_slots(set(S), "b", "mv1")
        again = await a.export_slots(set(S), "b", "mv1")
        assert again == done and done.chunks == 1 and done.envelopes == 2
        assert (done.wallets, done.escrow_fen) == (2, escrow1)
        for user in MOVERS:
            assert await a.balance(user) == (0, 0)
            assert (await a.list_transactions(user, 10, None)).entries == []
        with pytest.raises(errors.NotFound):
            await a.get_envelope(env1)
        await _balanced(a)
        chunks = await a.migration_chunks_due(10)
        queued = await a.remote_credits_due(100)
        credits = [bus.decode(bus.encode("a", c), "b")[1] for c in queued]
        assert {c.kind for c in credits} == {CreditKind.GRAB, CreditKind.WALLET_MOVE,
                                             CreditKind.ESCROW_MOVE}
        assert not await b.import_complete("mv1")
        half = len(credits) // 2
        assert await b.apply_remote_credits("a", credits[:half]) == half
        await _balanced(b)
        for chunk in chunks * 2:
            await b.import_slots("a", chunk.data)
        # The chunk carried the money of the credits not delivered yet: nothing is new.
        assert await b.apply_remote_credits("a", credits * 2) == 0
        assert await b.import_complete("mv1")
        assert await a.migration_chunks_sent([c.seq for c in chunks]) == 1
        assert await a.remote_credits_sent([c.seq for c in queued]) == len(queued)
        switched[0] = True
        return env1, env2, env3, grabs, before, pending, escrow1, await _views(b, MOVERS)

    env1, env2, env3, grabs, before, pending, escrow1, after = run(scenario())
    assert_balanced(a)
    rb = assert_balanced(b)
    assert _interset(a, "b") + _interset(b, "a") == 0
    for user in MOVERS:
        balance, entries, feed = after[user]
        assert balance.balance_fen == before[user][0].balance_fen + pending[user]
        # The history as it was, and a share credited during the export on top.
        assert entries[len(entries) - len(before[user][1]):] == before[user][1]
        assert feed[:len(before[user][2])] == before[user][2]
    assert [n.kind for n in after["s-eve"][2]] == [NoticeKind.CREDITED]
    assert rb.totals["escrow_fen"] == escrow1 and rb.totals["payments_imported"] == 2
    # A stayer's envelope stays on a, with the mover's grab of it credited through x:b.
    stays = run(a.get_envelope(env3))
    assert [(g.user_id, g.credited) for g in stays.grabs] == [("s-eve", True)]
    _after_the_switch(a, b, env1, env2, grabs)


def _after_the_switch(a, b, env1, env2, grabs):
    async def scenario():
        view = await b.get_envelope(env1)
        fresh = await b.grab("s-eve", env1, "g-eve-2")
        again = await b.grab("s-bob", env1, "another-request")
        retry = await b.grab("s-bob", env1, "g-bob")
        carol = await b.grab("a-carol", env1, "g-carol")
        resent = await _send(b, "s-alice", 1_000, 5, rid="send-1")
        expired = await b.get_envelope(env2)
        seen = await b.notifications("s-eve", 0, 100)
        await b.apply_credits(100)
        later = await b.notifications("s-eve", seen[-1].event_id, 100)
        listings = await a.interset_credits(), await b.interset_credits()
        return view, fresh, again, retry, carol, resent, expired, later, listings

    view, fresh, again, retry, carol, resent, expired, later, listings = run(scenario())
    # A watcher resuming after the last event it saw (numbered on a) gets the new one.
    assert [(n.kind, n.amount_fen) for n in later] == [(NoticeKind.CREDITED, fresh.amount_fen)]
    # The cluster reconcile's pairing: every fen a sent to b, b applied under the same id.
    sent = {c.transfer_id: c.amount_fen for c in listings[0].credits if c.peer == "b"}
    applied = {c.transfer_id: c.amount_fen for c in listings[1].credits if c.peer == "a"}
    assert sent == applied and any(t.startswith("m:mv1:e:") for t in sent)
    assert view.remaining_count == 2 and len(view.grabs) == 3
    assert fresh.outcome == GrabOutcome.GRABBED and fresh.remaining_count == 1
    assert again.outcome == GrabOutcome.ALREADY_GRABBED
    assert (retry.outcome, retry.amount_fen) == (GrabOutcome.GRABBED, grabs["s-bob"].amount_fen)
    assert (carol.outcome, carol.amount_fen) == (GrabOutcome.GRABBED,
                                                 grabs["a-carol"].amount_fen)
    assert resent.envelope_id == env1
    assert expired.status == 3 and expired.remaining_fen == 300
    assert_balanced(b)


def test_an_open_payment_of_the_slots_refuses_the_export_and_changes_nothing(two_sets):
    """A PENDING top-up of a mover: SLOT_BUSY naming it, nothing moved or queued; once the
    payment is final the same move goes through."""
    a, _b, _switched = two_sets

    async def scenario():
        await _fund(a, "s-alice", 1_000)
        p, _created = await a.begin_payment(_top_up("s-eve", "t-open", 500), b"f" * 16, 60_000)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await a.export_slots(set(S), "b", "mv-busy")
        state = (await a.balance("s-alice"), await a.migration_chunks_due(10),
                 await a.remote_credits_due(10))
        await a.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)
        done = await a.export_slots(set(S), "b", "mv-busy")
        return exc.value, p.payment_id, state, done

    err, payment_id, state, done = run(scenario())
    assert err.reason == "SLOT_BUSY" and payment_id in str(err)
    assert state == ((1_000, 0), [], [])
    assert (done.wallets, done.wallet_fen) == (2, 1_500)
    assert_balanced(a)


def test_chunks_out_of_order_and_twice_import_once(two_sets, monkeypatch):
    """With small chunks a move spans many; delivered backwards and again, each applies
    once, the move is complete only with the last, and nothing is lost or doubled."""
    a, b, _switched = two_sets
    monkeypatch.setattr(records, "CHUNK_MAX_BYTES", 1024)

    async def scenario():
        await _world(a, b)
        for i in range(12):
            await _send(a, "s-alice", 10, 1, rid=f"many-{i}")
        before = await _views(a, MOVERS)
        done = await a.export_slots(set(S), "b", "mv2")
        chunks = await a.migration_chunks_due(1000)
        assert len(chunks) == done.chunks > 3
        assert [c.chunk_id for c in chunks] == [f"mv2:{n}" for n in range(done.chunks)]
        applied = 0
        for chunk in reversed(chunks):
            assert not await b.import_complete("mv2")
            applied += await b.import_slots("a", chunk.data)
            assert await b.import_slots("a", chunk.data) == 0
        # Rows, wallets and escrows: env1's and the twelve small ones' (the expired has none).
        assert applied == done.records + done.wallets + 13
        await b.apply_remote_credits("a", await a.remote_credits_due(1000))
        return before, await _views(b, MOVERS), await b.import_complete("mv2")

    before, after, complete = run(scenario())
    assert complete
    for user in ("s-alice", "s-bob"):
        old = before[user][1]
        assert after[user][1][len(after[user][1]) - len(old):] == old
        assert after[user][2] == before[user][2]
    assert_balanced(a)
    assert_balanced(b)
    assert _interset(a, "b") + _interset(b, "a") == 0


def test_a_chunk_that_is_not_one_is_refused():
    """Bytes that do not parse as a chunk never reach the books."""
    raw = records.pack_chunk(records.Chunk(b"mv", b"b", 0, 1, [(b"m:mv:w:u", b"w:u", 5)],
                                           [(keys.WALLET_TX, b"u\0" + keys.be64(1), b"x")]))
    assert records.unpack_chunk(raw).money == [(b"m:mv:w:u", b"w:u", 5)]
    for bad in (raw[:-1], raw + b"\0", b"nope", raw.replace(b"HBM1", b"HBM2")):
        with pytest.raises(ValueError):
            records.unpack_chunk(bad)


def test_money_for_a_moved_user_reaching_the_old_owner_goes_on_to_the_new(two_sets):
    """After the export, before the map switch: an unlock on b for a mover (b still routes
    it to a) is booked on a and sent on to b under fw:<id>; an unlock on a for a mover goes
    to x:b at once. The mover gets both on b, with entries; everything pairs and balances."""
    a, b, _switched = two_sets

    async def scenario():
        await _fund(a, "a-carol", 1_000)
        await _fund(b, "b-dan", 1_000)
        await _fund(a, "s-alice", 100)
        await a.export_slots(set(S), "b", "mv3")
        for chunk in await a.migration_chunks_due(10):
            await b.import_slots("a", chunk.data)
        await b.unlock_photo("b-dan", "u-1", keys.fingerprint("unlock", "ph1", "s-alice"),
                             owner_id="s-alice", photo_id="ph1", amount_fen=50)
        await a.unlock_photo("a-carol", "u-2", keys.fingerprint("unlock", "ph2", "s-alice"),
                             owner_id="s-alice", photo_id="ph2", amount_fen=70)
        assert await a.apply_remote_credits("b", await b.remote_credits_due(10)) == 1
        assert await a.balance("s-alice") == (0, 0)
        await b.apply_remote_credits("a", await a.remote_credits_due(10))
        return (await b.balance("s-alice"),
                (await b.list_transactions("s-alice", 10, None)).entries,
                await a.interset_credits(), await b.interset_credits())

    alice, entries, listing_a, listing_b = run(scenario())
    assert alice == (100 + 50 + 70, 0)
    assert sorted((e.kind.name, e.amount_fen) for e in entries) == [
        ("PHOTO_INCOME", 50), ("PHOTO_INCOME", 70), ("TOP_UP", 100)]
    assert any(e.transaction_id.startswith("fw:u:") for e in entries)
    for sender, receiver, peer, back in ((listing_a, listing_b, "b", "a"),
                                         (listing_b, listing_a, "a", "b")):
        sent = {c.transfer_id: c.amount_fen for c in sender.credits
                if c.peer == peer and c.direction == Direction.SENT}
        applied = {c.transfer_id: c.amount_fen for c in receiver.credits
                   if c.peer == back and c.direction == Direction.APPLIED}
        assert sent == applied and sent
    assert_balanced(a)
    assert_balanced(b)
    assert _interset(a, "b") + _interset(b, "a") == 0


def test_slots_moved_there_and_back_end_where_they_started(two_sets):
    """a -> b, then b -> a: the mover's money, history and envelope are on a again, a no
    longer sends the mover's money on to b, and both SETs balance."""
    a, b, switched = two_sets

    async def scenario():
        await _fund(a, "s-alice", 1_000)
        env = (await _send(a, "s-alice", 300, 3)).envelope_id
        history = (await a.list_transactions("s-alice", 10, None)).entries
        await a.export_slots(set(S), "b", "there")
        for chunk in await a.migration_chunks_due(10):
            await b.import_slots("a", chunk.data)
        switched[0] = True
        await b.export_slots(set(S), "a", "back")
        for chunk in await b.migration_chunks_due(10):
            await a.import_slots("b", chunk.data)
        switched[0] = False
        for src, dst, name in ((a, b, "a"), (b, a, "b")):
            await dst.apply_remote_credits(name, await src.remote_credits_due(100))
        await _fund(a, "a-carol", 100)
        await a.unlock_photo("a-carol", "u-1", keys.fingerprint("unlock", "ph", "s-alice"),
                             owner_id="s-alice", photo_id="ph", amount_fen=5)
        grabbed = await a.grab("a-gina", env, "g")
        await a.apply_credits(10)
        return (history, (await a.list_transactions("s-alice", 10, None)).entries,
                await a.balance("s-alice"), await a.remote_credits_due(100), grabbed)

    history, entries, alice, due, grabbed = run(scenario())
    assert entries[1:] == history and entries[0].amount_fen == 5 and alice == (705, 0)
    # Only the first move's money waits for the relay: nothing of later was sent to b.
    assert grabbed.outcome == GrabOutcome.GRABBED
    assert {c.transfer_id[:8] for c in due} == {"m:there:"}
    assert_balanced(a)
    assert_balanced(b)
    assert _interset(a, "b") + _interset(b, "a") == 0


def _send_rule(bk, user: bytes, rid: bytes, env: bytes, total: int):
    return rules.send_from_balance(bk, user, rid, b"x" * 16, env, total, 1,
                                   EnvelopeKind.NORMAL, "hi", 3600, [total])


def test_an_envelope_made_in_the_same_group_commit_moves_too(two_sets):
    """A send still in the transaction's cache when the export runs leaves with the rest:
    nothing of the slots is written back to the old owner afterwards."""
    a, b, _switched = two_sets
    env = keys.new_envelope_id("s-alice").encode()

    def both(bk):
        _send_rule(bk, b"s-alice", b"r", env, 400)
        return rules.export_slots(bk, S, b"b", b"mv4")

    async def scenario():
        await _fund(a, "s-alice", 1_000)
        done = await a.write(both)
        for chunk in await a.migration_chunks_due(10):
            await b.import_slots("a", chunk.data)
        return done, await a.envelope_state(env.decode()), await b.get_envelope(env.decode())

    done, left, moved = run(scenario())
    assert (done.envelopes, done.escrow_fen, done.wallet_fen) == (1, 400, 600)
    assert left is None and moved.remaining_fen == 400
    assert_balanced(a)
    assert_balanced(b)


def test_an_envelope_id_without_a_slot_holding_escrow_makes_the_move_wait(two_sets):
    """Such an envelope stays on the SET that made it; while it holds escrow its expiry
    would refund a sender who left, so the export answers SLOT_BUSY naming it."""
    a, _b, _switched = two_sets
    legacy = b"env_" + b"0" * 20

    async def scenario():
        await _fund(a, "s-alice", 1_000)
        await a.write(_send_rule, b"s-alice", b"r", legacy, 300)
        with pytest.raises(errors.FailedPrecondition) as exc:
            await a.export_slots(set(S), "b", "mv5")
        return exc.value, await a.balance("s-alice")

    err, alice = run(scenario())
    assert err.reason == "SLOT_BUSY" and legacy.decode() in str(err)
    assert alice == (700, 0)
    assert_balanced(a)


def test_the_audit_reports_money_left_on_a_moved_wallet(two_sets):
    """A fen reaching a moved user's wallet on the old owner by any path but the forward
    is stranded there: the audit names the wallet and the move."""
    a, _b, _switched = two_sets

    def stray(bk):
        bk.move(b"stray", b"w:a-carol", b"w:s-alice", 5, 1, b"")

    async def scenario():
        await _fund(a, "s-alice", 100)
        await _fund(a, "a-carol", 100)
        await a.export_slots(set(S), "b", "mv6")
        clean = await a.audit()
        await a.write(stray)
        return clean, await a.audit()

    clean, dirty = run(scenario())
    assert clean.balanced and clean.totals["moved_users"] == 1
    assert clean.totals["migration_chunks_waiting"] == 1
    assert any("w:s-alice" in d and "mv6" in d for d in dirty.discrepancies)


def test_an_envelope_sold_out_in_the_export_s_group_commit_leaves_with_its_best_luck(two_sets):
    """The last share grabbed in the same transaction as the export: the envelope leaves
    sold out, best luck named, and nothing of it is written back on the old owner."""
    a, b, _switched = two_sets

    async def scenario():
        await _fund(a, "s-alice", 1_000)
        env = (await _send(a, "s-alice", 200, 2)).envelope_id
        await a.grab("a-carol", env, "g1")

        def last_and_export(bk):
            rules.grab(bk, env.encode(), b"a-frank", keys.request_digest("g2"))
            return rules.export_slots(bk, S, b"b", b"mv7")

        await a.write(last_and_export)
        for chunk in await a.migration_chunks_due(10):
            await b.import_slots("a", chunk.data)
        return await a.envelope_state(env), await b.get_envelope(env)

    left, view = run(scenario())
    assert left is None and view.remaining_count == 0
    assert view.best_luck_user_id == max(view.grabs, key=lambda g: g.amount_fen).user_id
    assert_balanced(a)
    assert_balanced(b)
