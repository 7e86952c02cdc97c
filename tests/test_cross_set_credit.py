"""Cross-SET crediting in the books (cluster mode), on both backends: two SETs' ledgers
side by side, the relay's part played by the test.

A grab on SET A by a user whose wallet lives on SET B is claimed on A as any grab; its
credit leaves A through x:b and A's relay outbox; B applies it under the same transfer
id from x:a to the wallet, exactly once however often it is delivered. Each SET balances
on its own, and A's x:b plus B's x:a is zero once every credit has landed.

A paid photo unlock on A (the viewer's SET) for an owner whose wallet lives on B goes the
same way: the viewer's wallet -> x:b under the unlock's transfer id, and B books the owner's
PHOTO_INCOME entry and CREDITED event when it applies the credit.
"""

from __future__ import annotations

import struct

import pytest

from gateway import errors
from gateway.cluster import bus
from gateway.domain import keys, records
from gateway.domain.model import (
    CreditKind,
    GrabOutcome,
    NoticeKind,
    RemoteCredit,
    TxKind,
    photo_income_text,
)
from gateway.domain.store import Books
from tests.conftest import run
from tests.test_ledger import BACKENDS, _fund, _send, assert_balanced, make_ledger


@pytest.fixture(params=BACKENDS)
def two_sets(request, tmp_path):
    a = make_ledger(request.param, tmp_path / "a")
    b = make_ledger(request.param, tmp_path / "b")
    # Users named b-* live on SET b; everyone else on SET a (and the reverse on b).
    a.set_placement(lambda user: b"b" if user.startswith(b"b-") else None)
    b.set_placement(lambda user: None if user.startswith(b"b-") else b"a")
    yield a, b
    a.close()
    b.close()


def _interset(led, name: str) -> int:
    return run(led.audit()).totals.get("interset_fen", {}).get(name, 0)


def test_a_grab_by_a_user_of_another_set_is_credited_there_exactly_once(two_sets):
    a, b = two_sets

    async def scenario():
        await _fund(a, "alice", 10_000)
        sent = await _send(a, "alice", 1_000, 4)
        mine = await a.grab("alice", sent.envelope_id, "g1")
        theirs = await a.grab("b-bob", sent.envelope_id, "g2")
        assert mine.outcome == theirs.outcome == GrabOutcome.GRABBED
        assert await a.apply_credits(100) == 2
        # On A: bob has nothing (his wallet is not here); the credit waits for the relay.
        assert (await a.balance("b-bob")).balance_fen == 0
        assert (await a.balance("b-bob")).pending_credit_fen == 0
        due = await a.remote_credits_due(100)
        assert [(c.home, c.user_id, c.amount_fen) for c in due] == [
            ("b", "b-bob", theirs.amount_fen)]
        # The stream delivers it twice: applied once.
        assert await b.apply_remote_credits("a", due) == 1
        assert await b.apply_remote_credits("a", due) == 0
        assert (await b.balance("b-bob")).balance_fen == theirs.amount_fen
        notes = await b.notifications("b-bob", 0, 10)
        assert [n.amount_fen for n in notes] == [theirs.amount_fen]
        # The stream acknowledged it: off A's outbox, once.
        assert await a.remote_credits_sent([c.seq for c in due]) == 1
        assert await a.remote_credits_sent([c.seq for c in due]) == 0
        assert await a.remote_credits_due(100) == []
        assert (await a.balance("alice")).balance_fen == 9_000 + mine.amount_fen
        return theirs.amount_fen

    amount = run(scenario())
    ra, rb = assert_balanced(a), assert_balanced(b)
    assert ra.totals["interset_fen"] == {"b": amount}
    assert rb.totals["interset_fen"] == {"a": -amount}
    assert _interset(a, "b") + _interset(b, "a") == 0


def test_credits_both_ways_net_out_and_each_set_balances_alone(two_sets):
    a, b = two_sets

    async def scenario():
        await _fund(a, "alice", 5_000)
        await _fund(b, "b-bea", 5_000)
        env_a = (await _send(a, "alice", 600, 3)).envelope_id
        env_b = (await _send(b, "b-bea", 900, 3, rid="s2")).envelope_id
        for user in ("b-bob", "b-bea"):
            await a.grab(user, env_a, f"g-{user}")
        for user in ("alice", "carol"):
            await b.grab(user, env_b, f"g-{user}")
        await a.apply_credits(100)
        await b.apply_credits(100)
        # Nothing delivered yet: each SET balances on its own, the pair does not net out.
        ra, rb = await a.audit(), await b.audit()
        assert ra.balanced and rb.balanced, ra.discrepancies + rb.discrepancies
        in_flight = ra.totals["interset_fen"]["b"] + rb.totals["interset_fen"]["a"]
        assert in_flight == sum(c.amount_fen for c in await a.remote_credits_due(10)) + sum(
            c.amount_fen for c in await b.remote_credits_due(10))
        await b.apply_remote_credits("a", await a.remote_credits_due(10))
        await a.apply_remote_credits("b", await b.remote_credits_due(10))

    run(scenario())
    assert_balanced(a)
    assert_balanced(b)
    assert _interset(a, "b") + _interset(b, "a") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_placement_nothing_changes(backend, tmp_path):
    ledger = make_ledger(backend, tmp_path)

    async def scenario():
        await _fund(ledger, "alice", 1_000)
        env = (await _send(ledger, "alice", 100, 2)).envelope_id
        await ledger.grab("b-bob", env, "g")
        await ledger.apply_credits(10)
        assert await ledger.remote_credits_due(10) == []
        return await ledger.balance("b-bob")

    try:
        assert run(scenario()).balance_fen > 0
        assert assert_balanced(ledger).totals["interset_fen"] == {}
    finally:
        ledger.close()


# -- Moments photo unlocks whose owner lives on the other SET ----------------------------

async def _unlock(led, viewer: str, owner: str, rid: str = "u1", photo: str = "ph1",
                  amount: int = 100):
    return await led.unlock_photo(viewer, rid, keys.fingerprint("unlock", photo, owner),
                                  owner_id=owner, photo_id=photo, amount_fen=amount)


def _over_the_wire(credits):
    """What the home SET's consumer gets: each credit through bus.encode and bus.decode."""
    return [bus.decode(bus.encode("a", c), "b")[1] for c in credits]


def test_an_unlock_for_an_owner_of_another_set_pays_them_there_exactly_once(two_sets):
    """The viewer pays on A into x:b with the relay's credit beside it; B books the owner's
    PHOTO_INCOME entry and CREDITED event under the same transfer id, once however often
    the credit is delivered; each SET balances alone and the x: accounts net to zero."""
    a, b = two_sets

    async def scenario():
        await _fund(a, "vic", 1_000)
        paid = await _unlock(a, "vic", "b-olga")
        tid = keys.unlock_tid(paid.payment_id.encode()).decode()
        # On A: the viewer paid, the owner has nothing here, the credit waits for the relay.
        assert await a.balance("vic") == (900, 0)
        assert await a.balance("b-olga") == (0, 0)
        assert (await a.list_transactions("b-olga", 10, None)).entries == []
        assert await a.notifications("b-olga", 0, 10) == []
        vic = (await a.list_transactions("vic", 10, None)).entries[0]
        assert (vic.kind, vic.amount_fen, vic.transaction_id, vic.reference_id) == (
            TxKind.PHOTO_UNLOCK, -100, tid, paid.payment_id)
        due = await a.remote_credits_due(100)
        assert [(c.home, c.transfer_id, c.user_id, c.amount_fen, c.reference_id, c.kind,
                 c.photo_id) for c in due] == [
            ("b", tid, "b-olga", 100, paid.payment_id, CreditKind.PHOTO_INCOME, "ph1")]
        in_flight = await a.audit()
        assert in_flight.balanced, in_flight.discrepancies
        assert in_flight.totals["interset_fen"] == {"b": 100}
        assert in_flight.totals["remote_credits_waiting"] == 1
        # Delivered twice (and once more in the same batch): applied once.
        assert await b.apply_remote_credits("a", _over_the_wire(due) * 2) == 1
        assert await b.apply_remote_credits("a", _over_the_wire(due)) == 0
        assert await a.remote_credits_sent([c.seq for c in due]) == 1
        return (paid, tid, await b.balance("b-olga"),
                (await b.list_transactions("b-olga", 10, None)).entries,
                await b.notifications("b-olga", 0, 10))

    paid, tid, olga, entries, feed = run(scenario())
    assert olga == (100, 0)
    assert [(e.kind, e.amount_fen, e.transaction_id, e.reference_id) for e in entries] == [
        (TxKind.PHOTO_INCOME, 100, tid, paid.payment_id)]
    assert [(n.kind, n.amount_fen, n.payment_id, n.envelope_id) for n in feed] == [
        (NoticeKind.CREDITED, 100, paid.payment_id, "")]
    assert feed[0].message == photo_income_text("ph1") and "vic" not in feed[0].message
    ra, rb = assert_balanced(a), assert_balanced(b)
    assert (ra.totals["unlocks"], ra.totals["unlock_fen"]) == (1, 100)
    assert (rb.totals["photo_credits_in"], rb.totals["photo_credits_in_fen"]) == (1, 100)
    assert ra.totals["interset_fen"] == {"b": 100}
    assert rb.totals["interset_fen"] == {"a": -100}


def test_a_retried_unlock_for_an_owner_of_another_set_pays_once(two_sets):
    """A retry by request id returns the first result and queues no second credit, before
    and after the credit landed; another payload under the id is still refused."""
    a, b = two_sets

    async def scenario():
        await _fund(a, "vic", 1_000)
        first = await _unlock(a, "vic", "b-olga")
        again = await _unlock(a, "vic", "b-olga")
        due = await a.remote_credits_due(100)
        await b.apply_remote_credits("a", _over_the_wire(due))
        await a.remote_credits_sent([c.seq for c in due])
        late = await _unlock(a, "vic", "b-olga")
        with pytest.raises(errors.InvalidArgument) as exc:
            await _unlock(a, "vic", "b-olga", photo="ph2")
        return (first, again, late, len(due), exc.value.reason,
                await a.remote_credits_due(100), await a.balance("vic"),
                await b.balance("b-olga"))

    first, again, late, queued, reason, left, vic, olga = run(scenario())
    assert first == again == late and queued == 1 and left == []
    assert reason == "REQUEST_ID_REUSED"
    assert vic == (900, 0) and olga == (100, 0)
    assert _interset(a, "b") + _interset(b, "a") == 0
    assert_balanced(a)
    assert_balanced(b)


def test_an_unlock_for_an_owner_of_the_same_set_is_paid_locally(two_sets):
    """With placement on, an owner on the viewer's SET is paid wallet to wallet as on one
    SET: no inter-SET clearing, no credit for the relay."""
    a, _b = two_sets

    async def scenario():
        await _fund(a, "vic", 1_000)
        paid = await _unlock(a, "vic", "olga")
        return (paid, await a.remote_credits_due(10), await a.balance("olga"),
                (await a.list_transactions("olga", 10, None)).entries,
                await a.notifications("olga", 0, 10))

    paid, due, olga, entries, feed = run(scenario())
    tid = keys.unlock_tid(paid.payment_id.encode()).decode()
    assert due == [] and olga == (100, 0)
    assert [(e.kind, e.amount_fen, e.transaction_id) for e in entries] == [
        (TxKind.PHOTO_INCOME, 100, tid)]
    assert [(n.kind, n.payment_id, n.message) for n in feed] == [
        (NoticeKind.CREDITED, paid.payment_id, photo_income_text("ph1"))]
    report = assert_balanced(a)
    assert report.totals["interset_fen"] == {} and report.totals["unlock_fen"] == 100


def test_grab_shares_and_photo_incomes_cross_together(two_sets):
    """One delivery holding a grab's share and a photo income books each with its own
    kind; the inter-SET totals carry both."""
    a, b = two_sets

    async def scenario():
        await _fund(a, "alice", 10_000)
        env = (await _send(a, "alice", 500, 1)).envelope_id
        await a.grab("b-bob", env, "g")
        await a.apply_credits(10)
        paid = await _unlock(a, "alice", "b-bob", photo="sunset")
        due = await a.remote_credits_due(10)
        assert [c.kind for c in due] == [CreditKind.GRAB, CreditKind.PHOTO_INCOME]
        assert (await a.audit()).totals["interset_fen"] == {"b": 600}
        assert await b.apply_remote_credits("a", _over_the_wire(due)) == 2
        page = await b.list_transactions("b-bob", 10, None)
        return env, paid, page.entries, await b.notifications("b-bob", 0, 10)

    env, paid, entries, feed = run(scenario())
    assert sorted((e.kind, e.amount_fen, e.reference_id) for e in entries) == [
        (TxKind.ENVELOPE_CREDIT, 500, env), (TxKind.PHOTO_INCOME, 100, paid.payment_id)]
    assert [(n.envelope_id, n.payment_id) for n in feed] == [(env, ""), ("", paid.payment_id)]
    assert "sunset" in feed[1].message
    assert _interset(b, "a") == -600 and _interset(a, "b") + _interset(b, "a") == 0
    assert_balanced(a)
    assert_balanced(b)


def test_the_audit_ties_a_remote_unlock_to_its_inter_set_transfer(two_sets):
    """An unlock whose transfer went to another x: account than its record names, or an
    incoming photo income that reaches no wallet, is reported."""
    a, b = two_sets

    async def scenario():
        await _fund(a, "vic", 1_000)
        paid = await _unlock(a, "vic", "b-olga")
        tid = keys.unlock_tid(paid.payment_id.encode())

        def elsewhere(bk: Books) -> None:
            raw = bk.tx.get(keys.IDEM, keys.unlock_idem_key(b"vic", b"u1"))
            fp, result, owner, photo = records.unpack_unlock(raw)
            bk.tx.put(keys.IDEM, keys.unlock_idem_key(b"vic", b"u1"),
                      records.pack_unlock(fp, result, owner, photo, "c"))

        def stray_income(bk: Books) -> None:
            bk.move(tid, b"x:a", b"e:nowhere", 100, TxKind.PHOTO_UNLOCK, b"x")

        await a.write(elsewhere)
        await b.write(stray_income)
        return tid.decode(), await a.audit(), await b.audit()

    tid, ra, rb = run(scenario())
    assert any(tid in d and "x:c" in d and "x:b" in d for d in ra.discrepancies)
    assert any(tid in d and "reach a wallet" in d for d in rb.discrepancies)


def test_an_outbox_record_from_before_photo_credits_reads_as_a_grab():
    """A credit queued by a SET before credits had kinds reads back as a grab's."""
    raw = struct.pack("<q", 250) + b"\0".join((b"b", b"c:env_1:0", b"b-bob", b"env_1"))
    assert records.unpack_xcredit(7, raw) == RemoteCredit(
        "b", "c:env_1:0", "b-bob", 250, "env_1", CreditKind.GRAB, "", 7)
    # And a grab is still stored that way, a photo income with its kind and photo.
    grab = RemoteCredit("b", "c:env_1:0", "b-bob", 250, "env_1")
    assert records.pack_xcredit(grab) == raw
    photo = RemoteCredit("b", "u:unl_1", "b-olga", 100, "unl_1", CreditKind.PHOTO_INCOME,
                         "ph1", 9)
    assert records.unpack_xcredit(9, records.pack_xcredit(photo)) == photo
