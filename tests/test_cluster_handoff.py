"""A slot handed from one SET to another with its data, through the real command, while a
client keeps calling: frozen (SLOT_MOVING), exported, shipped over the stream, imported,
handed over; afterwards the slot's users and envelopes are served by the new SET as the old
one would have served them, and the cluster reconcile (with the bank) is BALANCED."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from gateway.client import Client
from gateway.cluster.client import ClusterClient
from gateway.domain.keys import SLOTS, slot_of
from gateway.errors import reason_of
from gateway.ops.clusterproc import LocalCluster
from hongbao.v1 import cluster_pb2, cluster_pb2_grpc, envelope_pb2, wallet_pb2
from tests.test_cluster_serve import CARD, assert_sets_balanced, md, user_on


def _same_slot(slot: int, prefix: str) -> str:
    for i in range(200_000):
        if slot_of(f"{prefix}{i}") == slot:
            return f"{prefix}{i}"
    raise AssertionError("no user in that slot")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_nats):
    c = LocalCluster(tmp_path_factory.mktemp("handoff"), sets=2, nats=shared_nats)
    with c:
        yield c
        assert_sets_balanced(c)


def _move(cluster: LocalCluster, slots: str, to: str) -> subprocess.CompletedProcess:
    s1 = cluster.sets["s1"]
    return subprocess.run(
        [sys.executable, "-m", "gateway.ops.cli", "cluster", "move", "--cluster",
         str(s1.cluster_file), "--slots", slots, "--to", to, "--key-file",
         str(cluster.key_file), "--drain-s", "2", "--timeout", "60"],
        capture_output=True, text=True, timeout=120)


async def _watch(cc: ClusterClient, cluster: LocalCluster, user: str, stop: asyncio.Event,
                 seen: list[str], balances: set[int]) -> None:
    """GetBalance every 50 ms through the routing client: what it answers, by reason."""
    while not stop.is_set():
        try:
            b = await cc.call(lambda c: c.wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(), metadata=cc.metadata(cluster.ticket(user)),
                timeout=5), user=user)
            seen.append("OK")
            balances.add(b.balance_fen)
        except grpc.aio.AioRpcError as err:
            seen.append(reason_of(err) or err.code().name)
        await asyncio.sleep(0.05)


async def _owner_by(c: Client, slot: int) -> str:
    """The owner of ``slot`` in the map that SET (the one ``c`` calls) serves by."""
    stub = cluster_pb2_grpc.ClusterServiceStub(c.channel)
    m = await stub.GetClusterMap(cluster_pb2.GetClusterMapRequest(), timeout=5.0)
    return next(s.name for s in m.sets for r in s.runs if r.first <= slot <= r.last)


def test_a_slot_moves_with_its_wallets_envelopes_and_request_ids(cluster):
    """Alice (sender) and Bob (grabber) share a slot of s1; Carol lives on s2. After the
    slot moves to s2: balances, an unclaimed envelope still grabbable, one share per user
    kept, a retried send answering the same envelope, the history listed."""
    carol = user_on(cluster, "s2", "h-carol")
    slot = next(s for s in range(SLOTS // 2) if s == slot_of(user_on(cluster, "s1", "h-a")))
    alice, bob, dave = (_same_slot(slot, p) for p in ("h-alice", "h-bob", "h-dave"))

    async def scenario():
        async with ClusterClient([cluster.sets["s2"].address]) as cc:
            await cc.start()
            via = Client(cluster.sets["s2"].address)
            await via.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id="t", card_id=CARD, amount_fen=10_000), metadata=md(cluster, alice))
            sends = []
            for rid, count in (("e1", 3), ("e2", 2)):
                sends.append(await via.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                    request_id=rid, total_fen=1_200, count=count,
                    kind=envelope_pb2.ENVELOPE_KIND_NORMAL), metadata=md(cluster, alice)))
            for u in (bob, carol):
                await via.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                    envelope_id=sends[0].envelope_id, request_id="g"), metadata=md(cluster, u))
            want = {alice: 10_000 - 2_400, bob: 400}
            for _ in range(150):   # the credits land (within 15 s)
                before = {u: (await via.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                          metadata=md(cluster, u))).balance_fen
                          for u in (alice, bob)}
                if before == want:
                    break
                await asyncio.sleep(0.1)
            assert before == want

            stop, seen, balances = asyncio.Event(), [], set()
            watcher = asyncio.create_task(_watch(cc, cluster, alice, stop, seen, balances))
            done = await asyncio.to_thread(_move, cluster, str(slot), "s2")
            stop.set()
            await watcher
            assert done.returncode == 0, done.stdout + done.stderr
            assert "s2 owns the 1 slots" in done.stdout
            assert set(seen) <= {"OK", "SLOT_MOVING", "WRONG_SLOT"}, seen
            assert "SLOT_MOVING" in seen and balances == {before[alice]}
            direct = Client(cluster.sets["s2"].address)   # the new owner, no forwarding
            for _ in range(50):   # each SET reads the new map within a second or so
                await cc.refresh()
                if cc.owner(user=alice) == "s2" and await _owner_by(direct, slot) == "s2":
                    break
                await asyncio.sleep(0.1)
            assert cc.owner(user=alice) == "s2" and await _owner_by(direct, slot) == "s2"
            for u, fen in before.items():
                b = await direct.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                   metadata=md(cluster, u))
                assert b.balance_fen == fen, u
            again = await direct.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id="e2", total_fen=1_200, count=2,
                kind=envelope_pb2.ENVELOPE_KIND_NORMAL), metadata=md(cluster, alice))
            assert again.envelope_id == sends[1].envelope_id
            assert (await direct.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                   metadata=md(cluster, alice))
                    ).balance_fen == before[alice]   # the retried send paid nothing more
            g = await direct.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=sends[1].envelope_id, request_id="g"), metadata=md(cluster, dave))
            assert (g.outcome, g.amount_fen) == (envelope_pb2.GRAB_OUTCOME_GRABBED, 600)
            same = await direct.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=sends[0].envelope_id, request_id="other"), metadata=md(cluster, bob))
            assert same.outcome == envelope_pb2.GRAB_OUTCOME_ALREADY_GRABBED
            page = await direct.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(
                page_size=10), metadata=md(cluster, alice))
            assert len(page.transactions) == 3   # the top-up and the two sends, moved along
            await via.close()
            await direct.close()

    asyncio.run(scenario())


def test_a_move_without_admin_keys_is_refused_in_one_line(cluster):
    """The handoff needs the SETs' admin calls: no keys, no move, nothing frozen."""
    s1 = cluster.sets["s1"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.ops.cli", "cluster", "move", "--cluster",
         str(s1.cluster_file), "--slots", "0", "--to", "s2"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--key-file" in done.stderr
    assert "Traceback" not in done.stderr
