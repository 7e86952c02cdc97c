"""The accounting queue between SETs over a real 3-node JetStream cluster: the relay and
the consumer between two SETs' LMDB ledgers, exactly once end to end."""

from __future__ import annotations

import asyncio

import nats
import pytest

from gateway.cluster import bus
from gateway.ledger import LmdbLedger
from gateway.ops.natsproc import NatsCluster
from tests.test_ledger import _fund, _send


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats")) as cluster:
        yield cluster


def _sets(tmp_path):
    a, b = LmdbLedger(tmp_path / "a"), LmdbLedger(tmp_path / "b")
    a.set_placement(lambda u: b"b" if u.startswith(b"b-") else None)
    b.set_placement(lambda u: None if u.startswith(b"b-") else b"a")
    return a, b


async def _until(check, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


def test_credits_cross_the_stream_exactly_once(nats_cluster, tmp_path):
    a, b = _sets(tmp_path)

    async def scenario():
        nc = await nats.connect(servers=nats_cluster.urls)
        js = nc.jetstream()
        await bus.ensure_stream(js, replicas=3)
        relay = bus.CreditRelay(a, js, "a")
        consumer = bus.CreditConsumer(b, js, "b")
        tasks = [asyncio.create_task(relay.run()), asyncio.create_task(consumer.run())]
        try:
            # A message no SET wrote: refused loudly, and the consumer goes on.
            await js.publish("credit.b", b"not json", stream=bus.STREAM,
                             headers={"Nats-Msg-Id": "junk-1"})
            await _fund(a, "alice", 100_000)
            grabbed = 0
            for i in range(20):
                env = (await _send(a, "alice", 500, 5, rid=f"s{i}")).envelope_id
                for u in ("b-bob", "b-bea", "alice"):
                    r = await a.grab(u, env, f"g{i}{u}")
                    grabbed += r.amount_fen if u != "alice" else 0
            await a.apply_credits(1000)

            async def landed() -> bool:
                bal = (await b.balance("b-bob")).balance_fen + (
                    await b.balance("b-bea")).balance_fen
                return bal == grabbed and not await a.remote_credits_due(10)
            await _until(landed)
            # A relay that died after the PubAck but before taking the credits off the
            # outbox publishes them again: the stream keeps one copy.
            info = await js.stream_info(bus.STREAM)
            again = await js.publish("credit.nobody", b"{}", stream=bus.STREAM,
                                     headers={"Nats-Msg-Id": "c:not-a-credit"})
            dup = await js.publish("credit.nobody", b"{}", stream=bus.STREAM,
                                   headers={"Nats-Msg-Id": "c:not-a-credit"})
            assert dup.duplicate and dup.seq == again.seq
            return grabbed, relay.published, consumer.applied, info.state.messages
        finally:
            relay.stop()
            consumer.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await nc.close()

    try:
        grabbed, published, applied, messages = asyncio.run(scenario())
        # Work-queue retention: every applied credit was acked, so gone; the junk was
        # refused (term), which removes it too.
        assert published == applied == 40 and messages == 0
        ra, rb = asyncio.run(a.audit()), asyncio.run(b.audit())
        assert ra.balanced and rb.balanced, ra.discrepancies + rb.discrepancies
        assert ra.totals["interset_fen"]["b"] == grabbed
        assert ra.totals["interset_fen"]["b"] + rb.totals["interset_fen"]["a"] == 0
    finally:
        a.close()
        b.close()
