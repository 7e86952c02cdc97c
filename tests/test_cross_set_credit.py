"""Cross-SET crediting in the books (cluster mode), on both backends: two SETs' ledgers
side by side, the relay's part played by the test.

A grab on SET A by a user whose wallet lives on SET B is claimed on A as any grab; its
credit leaves A through x:b and A's relay outbox; B applies it under the same transfer
id from x:a to the wallet, exactly once however often it is delivered. Each SET balances
on its own, and A's x:b plus B's x:a is zero once every credit has landed.
"""

from __future__ import annotations

import pytest

from gateway.domain.model import GrabOutcome
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
