"""ListInterSetCredits: the credits a SET exchanged with the others, from one snapshot of
its journal, over real ledgers (both backends) and a real ``hongbao serve`` process."""

from __future__ import annotations

import json

import grpc
import pytest

from gateway.client import Client
from gateway.domain.reads import Direction
from gateway.errors import reason_of
from gateway.ledger import LmdbLedger
from gateway.usecases import Operations
from hongbao.v1 import admin_pb2
from tests.conftest import run
from tests.test_ledger import BACKENDS, _fund, _send, make_ledger


def home_of(user: bytes) -> bytes:
    """Users named b-* live on SET b, c-* on SET c, everyone else on SET a."""
    return user[:1] if user[:2] in (b"b-", b"c-") else b"a"


def placed(ledger, name: str):
    me = name.encode()
    ledger.set_placement(lambda user: None if home_of(user) == me else home_of(user))
    return ledger


# -- the listing (the Ledger contract, both backends) ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_the_listing_shows_both_halves_of_a_credit_and_the_balances_of_one_snapshot(
        backend, tmp_path):
    """A grab's share and a photo unlock for users of SET b are listed SENT on a (in the
    outbox until the stream acknowledges them), APPLIED on b, and each side's x: balance is
    what its listed credits add up to."""
    a = placed(make_ledger(backend, tmp_path / "a"), "a")
    b = placed(make_ledger(backend, tmp_path / "b"), "b")

    async def go():
        await _fund(a, "alice", 10_000)
        env = (await _send(a, "alice", 1_000, 2)).envelope_id
        share = (await a.grab("b-bob", env, "g")).amount_fen
        await a.apply_credits(10)
        await a.unlock_photo("alice", "u1", b"f" * 16, owner_id="b-olga", photo_id="p1",
                             amount_fen=30)
        sent = await a.interset_credits()
        assert {(c.direction, c.peer, c.amount_fen, c.in_outbox) for c in sent.credits} == {
            (Direction.SENT, "b", share, True), (Direction.SENT, "b", 30, True)}
        assert sent.balances == {"b": share + 30}
        due = await a.remote_credits_due(10)
        await b.apply_remote_credits("a", due)
        await a.remote_credits_sent([c.seq for c in due])
        after = await a.interset_credits()
        assert not any(c.in_outbox for c in after.credits)
        got = await b.interset_credits()
        assert sorted((c.direction, c.peer, c.transfer_id, c.amount_fen) for c in got.credits) \
            == sorted((Direction.APPLIED, "a", c.transfer_id, c.amount_fen)
                      for c in sent.credits)
        assert got.balances == {"a": -(share + 30)}
        alone = make_ledger(backend, tmp_path / "alone")
        try:
            empty = await alone.interset_credits()
        finally:
            alone.close()
        assert (empty.credits, empty.balances) == ([], {})

    try:
        run(go())
    finally:
        a.close()
        b.close()


def test_the_listing_leaves_in_chunks_of_at_most_the_bound(tmp_path):
    """The use case cuts one snapshot into chunks; only the first carries the balances, and
    a SET with nothing to list still answers one (empty) chunk."""
    a = placed(LmdbLedger(tmp_path / "a"), "a")

    async def go():
        ops = Operations(a, None, None, {})
        assert [(c.credits, c.balances) async for c in ops.interset_credits(chunk=2)] == [
            ([], {})]
        await _fund(a, "alice", 10_000)
        env = (await _send(a, "alice", 500, 5)).envelope_id
        for i in range(5):
            await a.grab(f"b-u{i}", env, "g")
        await a.apply_credits(10)
        chunks = [c async for c in ops.interset_credits(chunk=2)]
        assert [len(c.credits) for c in chunks] == [2, 2, 1]
        assert chunks[0].balances == {"b": 500} and chunks[1].balances == {}

    try:
        run(go())
    finally:
        a.close()


def test_the_directions_have_the_api_numbers():
    """The domain's Direction and the API's InterSetDirection agree, name for name."""
    for d in Direction:
        assert admin_pb2.InterSetDirection.Value(f"INTER_SET_DIRECTION_{d.name}") == d.value


# -- the admin call over a real gateway -------------------------------------------------------

def test_list_inter_set_credits_answers_admins_only(stack):
    """A plain gateway answers ListInterSetCredits with one empty response, to an admin
    ticket only; Reconcile can leave the bank cross-check out."""
    async def go():
        async with Client(stack.target) as c:
            admin = stack.meta("ops", scopes=("admin",))
            got = [r async for r in c.admin.ListInterSetCredits(
                admin_pb2.ListInterSetCreditsRequest(), metadata=admin, timeout=10)]
            assert len(got) == 1 and not got[0].credits and not got[0].interset_fen
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in c.admin.ListInterSetCredits(
                        admin_pb2.ListInterSetCreditsRequest(),
                        metadata=stack.meta("reader", scopes=("read",)), timeout=10):
                    pass
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(exc.value) == "SCOPE_MISSING"
            plain = await c.admin.Reconcile(admin_pb2.ReconcileRequest(), metadata=admin)
            alone = await c.admin.Reconcile(
                admin_pb2.ReconcileRequest(skip_bank_cross_check=True), metadata=admin)
            assert json.loads(plain.report_json)["bank"] is not None
            assert json.loads(alone.report_json)["bank"] is None and alone.balanced
    run(go())
