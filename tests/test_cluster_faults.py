"""Cluster failures, each with real processes killed: a SET, a NATS node, the relay's and
the consumer's SETs at random points. Money only moves forward: every acknowledged grab is
credited exactly once on its grabber's SET, and every SET balances on its own.

The workload: senders on s1 fund themselves and send envelopes; grabbers on s2 grab them
through the cluster client, so every credit crosses s1 -> stream -> s2. A call that fails
or times out is unknown; it is asked again with its request id once the cluster is whole,
and then its answer is final (one share per user per envelope: a retry returns the share).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib

import grpc
import pytest

from gateway.cluster.client import ClusterClient
from gateway.errors import reason_of
from gateway.ops.clusterproc import LocalCluster
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.test_cluster_serve import CARD, _until, assert_sets_balanced, user_on


class Workload:
    """Cross-SET grabs with a history: what was acknowledged, what is unknown."""

    def __init__(self, cluster: LocalCluster, tag: str, senders: int = 2,
                 grabbers: int = 8) -> None:
        self.cluster = cluster
        self.tag = tag   # the tests share one cluster: each its own users and cards
        self.senders = [user_on(cluster, "s1", f"{tag}-snd{i}-") for i in range(senders)]
        self.grabbers = [user_on(cluster, "s2", f"{tag}-grb{i}-") for i in range(grabbers)]
        self.envelopes: list[str] = []
        self.grabbed: dict[tuple[str, str], int] = {}     # (user, envelope) -> amount
        self.unknown: set[tuple[str, str]] = set()
        self.cc = ClusterClient(list(cluster.addresses.values()))

    def meta(self, user: str):
        return self.cc.metadata(self.cluster.ticket(user))

    async def fund(self, amount_fen: int = 500_000) -> None:
        await self.cc.start()
        cards = zlib.crc32(self.tag.encode()) % 10**6   # a card of its own per sender
        for i, s in enumerate(self.senders):
            await self.cc.call(lambda c, s=s, i=i: c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id="fund", card_id=f"icbc-7{cards:06d}{i:03d}", amount_fen=amount_fen),
                metadata=self.meta(s), timeout=10), user=s)

    async def send_one(self, i: int) -> None:
        s = self.senders[i % len(self.senders)]
        r = await self.cc.call(lambda c: c.envelopes.SendEnvelope(
            envelope_pb2.SendEnvelopeRequest(request_id=f"e{i}", total_fen=800,
                                             count=len(self.grabbers),
                                             kind=envelope_pb2.ENVELOPE_KIND_LUCKY),
            metadata=self.meta(s), timeout=5), user=s)
        self.envelopes.append(r.envelope_id)

    async def grab(self, user: str, env: str) -> None:
        key = (user, env)
        try:
            r = await self.cc.call(lambda c: c.envelopes.GrabEnvelope(
                envelope_pb2.GrabEnvelopeRequest(envelope_id=env, request_id=f"g-{env}"),
                metadata=self.meta(user), timeout=5), envelope=env)
        except (grpc.aio.AioRpcError, ConnectionError, asyncio.CancelledError):
            self.unknown.add(key)
            return
        self.unknown.discard(key)
        if r.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED:
            self.grabbed[key] = r.amount_fen

    async def run(self, seconds: float, pause_s: float = 0.02) -> None:
        """Sends and grabs for ``seconds``; failures become unknowns, never stop it."""
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            try:
                await self.send_one(i)
            except (grpc.aio.AioRpcError, ConnectionError, asyncio.CancelledError):
                await asyncio.sleep(0.2)
                continue
            finally:
                i += 1
            env = self.envelopes[-1]
            await asyncio.gather(*(self.grab(u, env) for u in self.grabbers))
            await asyncio.sleep(pause_s)

    async def settle(self) -> None:
        """Asks every unknown grab again with its request id until each has an answer."""
        for _ in range(50):
            if not self.unknown:
                return
            for key in list(self.unknown):
                await self.grab(*key)
            await asyncio.sleep(0.2)
        raise AssertionError(f"grabs still unknown: {sorted(self.unknown)[:5]}")

    async def credited(self) -> bool:
        """Every grabber's wallet on s2 holds exactly the shares it grabbed."""
        for u in self.grabbers:
            want = sum(a for (user, _), a in self.grabbed.items() if user == u)
            b = await self.cc.call(lambda c, u=u: c.wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(), metadata=self.meta(u), timeout=5), user=u)
            if b.balance_fen != want:
                assert b.balance_fen < want, (u, b.balance_fen, want)   # never more
                return False
        return True


async def _equals(value, want: int) -> bool:
    return await value == want


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module: each test restarts what it killed and uses its own
    users, and the cluster reconcile runs after each."""
    c = LocalCluster(tmp_path_factory.mktemp("faults"), sets=2)
    with c:
        yield c


def test_a_dead_set_answers_set_down_elsewhere_and_its_credits_wait_in_the_stream(cluster):
    """s1 killed: calls for its users and grabs on its envelopes answer UNAVAILABLE
    SET_DOWN with pushback through s2, which keeps serving its own users; credits s2 owes
    s1's users wait in JetStream and land exactly once when s1 is back."""
    w = Workload(cluster, "down")
    s1_user = w.senders[0]
    s2_sender = user_on(cluster, "s2", "s2sender")

    async def scenario():
        await w.fund()
        await w.run(1.0)
        await w.cc.call(lambda c: c.wallet.TopUp(wallet_pb2.TopUpRequest(
            request_id="f", card_id=CARD, amount_fen=10_000), metadata=w.meta(s2_sender)),
            user=s2_sender)
        env2 = (await w.cc.call(lambda c: c.envelopes.SendEnvelope(
            envelope_pb2.SendEnvelopeRequest(request_id="x", total_fen=900, count=3,
                                             kind=envelope_pb2.ENVELOPE_KIND_NORMAL),
            metadata=w.meta(s2_sender)), user=s2_sender)).envelope_id
        async def landed() -> int:
            b = await w.cc.call(lambda c: c.wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(), metadata=w.meta(s1_user)), user=s1_user)
            return b.balance_fen
        start = await landed()   # s1_user only sends: nothing more comes to it until below
        cluster.sets["s1"].kill()
        via2 = w.cc.client(cluster.sets["s2"].address)
        plain = w.cluster.ticket(s1_user)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await via2.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                         metadata=(("authorization", f"Bearer {plain}"),))
        err = info.value
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "SET_DOWN")
        assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        # s2 serves its own: s1's senders grab s2's envelope; the credits are for s1.
        for u in w.senders:
            r = await via2.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=env2, request_id="g"), metadata=w.meta(u))
            assert r.amount_fen == 300
        await asyncio.sleep(0.5)
        cluster.sets["s1"].start()
        await w.settle()
        # The share s2 owed s1_user waited in the stream: it lands once s1 is back, once.
        await _until(lambda: _equals(landed(), start + 300))
        await _until(w.credited)
        await asyncio.sleep(1.0)   # a redelivery, if any, would land now: it must not
        assert await landed() == start + 300

    asyncio.run(scenario())
    assert_sets_balanced(cluster)


def test_one_nats_node_of_three_dies_and_returns_and_no_credit_is_lost(cluster):
    """A JetStream node killed mid-traffic and started again: publishes go on under the
    same message ids, the consumer resumes, every credit lands exactly once."""
    w = Workload(cluster, "nats")

    async def scenario():
        await w.fund()
        traffic = asyncio.create_task(w.run(6.0))
        await asyncio.sleep(1.5)
        cluster.nats.nodes[0].kill()
        await asyncio.sleep(2.0)
        cluster.nats.nodes[0].start()
        await traffic
        await w.settle()
        await _until(w.credited, timeout_s=60)
        assert len(w.grabbed) > 50

    asyncio.run(scenario())
    assert_sets_balanced(cluster)


# The suite's short version: two kills of each side. `make soak` runs ten of each.
KILL_RUNS = [("s1", 2, 4.0), ("s2", 2, 4.0),
             pytest.param("s1", 10, 20.0, marks=pytest.mark.slow, id="s1-long"),
             pytest.param("s2", 10, 20.0, marks=pytest.mark.slow, id="s2-long")]


@pytest.mark.parametrize("victim, kills, seconds", KILL_RUNS)
def test_the_relay_or_the_consumer_killed_at_random_points_loses_and_doubles_nothing(
        cluster, victim, kills, seconds):
    """SIGKILL of the SET running the relay (s1, the envelopes' SET) or the consumer (s2,
    the grabbers' SET) at random moments under traffic: after the restarts every
    acknowledged grab is credited once, none twice."""
    w = Workload(cluster, f"kill-{victim}-{kills}")
    rng = random.Random(20261203 + kills)

    async def scenario():
        await w.fund()
        traffic = asyncio.create_task(w.run(seconds, pause_s=0.0))
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.3, seconds / kills - 0.6))
            cluster.sets[victim].kill()
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            cluster.sets[victim].start()
        await traffic
        await w.settle()
        await _until(w.credited, timeout_s=60)
        assert len(w.grabbed) > 8 * kills

    asyncio.run(scenario())
    assert_sets_balanced(cluster)
