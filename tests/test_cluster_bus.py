"""The accounting queue between SETs over a real 3-node JetStream cluster: the relay and
the consumer between two SETs' LMDB ledgers, exactly once end to end; and the messages'
format, old and new."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from gateway.cluster import bus
from gateway.domain import keys
from gateway.domain.model import CreditKind, NoticeKind, RemoteCredit, TxKind
from gateway.ledger import LmdbLedger
from tests.test_ledger import _fund, _send


@pytest.fixture(scope="module")
def nats_cluster(shared_nats):
    shared_nats.clear()
    return shared_nats


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

            # The consumer acks after its ledger write, and a work-queue stream drops an
            # acked message once the ack is replicated: a moment after the credits land.
            async def emptied() -> bool:
                return (await js.stream_info(bus.STREAM)).state.messages == 0
            await _until(emptied)
            info = await js.stream_info(bus.STREAM)
            # A relay that died after the PubAck but before taking the credits off the
            # outbox publishes them again: the stream keeps one copy.
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


def test_a_photo_income_crosses_the_stream_and_lands_once(nats_cluster, tmp_path):
    """Unlocks on A of photos whose owner lives on B reach the owner's wallet on B through
    the real relay, stream and consumer, as PHOTO_INCOME with its event, once each: a
    retried unlock sends nothing more, and a copy published again past the stream's
    duplicate check is refused by the ledger's transfer id."""
    a, b = _sets(tmp_path)
    photos = [f"ph{i}" for i in range(5)]

    async def scenario():
        nc = await nats.connect(servers=nats_cluster.urls)
        js = nc.jetstream()
        await bus.ensure_stream(js, replicas=3)
        relay = bus.CreditRelay(a, js, "a")
        consumer = bus.CreditConsumer(b, js, "b")
        tasks = [asyncio.create_task(relay.run()), asyncio.create_task(consumer.run())]
        try:
            await _fund(a, "vic", 10_000)
            paid = []
            for photo in photos:
                fp = keys.fingerprint("unlock", photo, "b-olga")
                for _retry in range(2):
                    r = await a.unlock_photo("vic", f"r-{photo}", fp, owner_id="b-olga",
                                             photo_id=photo, amount_fen=100)
                paid.append(r)

            async def landed() -> bool:
                return ((await b.balance("b-olga")).balance_fen == 100 * len(photos)
                        and not await a.remote_credits_due(10))
            await _until(landed)
            # Delivered again under another message id (past the dedup window's reach).
            first = paid[0]
            tid = keys.unlock_tid(first.payment_id.encode()).decode()
            again = RemoteCredit("b", tid, "b-olga", 100, first.payment_id,
                                 CreditKind.PHOTO_INCOME, photos[0])
            await js.publish("credit.b", bus.encode("a", again), stream=bus.STREAM,
                             headers={"Nats-Msg-Id": tid + "#again"})

            async def drained() -> bool:
                info = await js.consumer_info(bus.STREAM, "credits-b")
                return info.num_pending == 0 and info.num_ack_pending == 0
            await _until(drained)
            return (paid, relay.published, consumer.applied, await b.balance("b-olga"),
                    (await b.list_transactions("b-olga", 20, None)).entries,
                    await b.notifications("b-olga", 0, 20))
        finally:
            relay.stop()
            consumer.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await nc.close()

    try:
        paid, published, applied, olga, entries, feed = asyncio.run(scenario())
        assert published == applied == len(photos)
        assert olga.balance_fen == 100 * len(photos)
        assert sorted((e.kind, e.amount_fen, e.reference_id) for e in entries) == sorted(
            (TxKind.PHOTO_INCOME, 100, p.payment_id) for p in paid)
        assert sorted((n.kind, n.payment_id) for n in feed) == sorted(
            (NoticeKind.CREDITED, p.payment_id) for p in paid)
        ra, rb = asyncio.run(a.audit()), asyncio.run(b.audit())
        assert ra.balanced and rb.balanced, ra.discrepancies + rb.discrepancies
        assert rb.totals["photo_credits_in_fen"] == 100 * len(photos)
        assert ra.totals["interset_fen"]["b"] + rb.totals["interset_fen"]["a"] == 0
    finally:
        a.close()
        b.close()


def test_a_message_without_a_kind_decodes_as_a_grab_credit():
    """A message written before credits had kinds (a grab's, as it was) still decodes."""
    old = (b'{"from":"a","tid":"c:env_1:0","user":"b-bob","amount_fen":250,'
           b'"envelope_id":"env_1"}')
    assert bus.decode(old, "b") == ("a", RemoteCredit(
        "b", "c:env_1:0", "b-bob", 250, "env_1", CreditKind.GRAB, ""))


def test_messages_round_trip_and_a_malformed_one_is_refused():
    """Both kinds survive encode and decode; a message that is not a credit raises the
    errors the consumer refuses a message for."""
    grab = RemoteCredit("b", "c:env_1:0", "b-bob", 250, "env_1")
    photo = RemoteCredit("b", "u:unl_1", "b-olga", 100, "unl_1", CreditKind.PHOTO_INCOME,
                         "ph1")
    for credit in (grab, photo):
        assert bus.decode(bus.encode("a", credit), "b") == ("a", credit)
    good = {"from": "a", "tid": "u:unl_1", "user": "b-olga", "amount_fen": 100,
            "envelope_id": "unl_1", "kind": "photo_income", "photo_id": "ph1"}
    for change in ({"kind": "gift"}, {"photo_id": ""}, {"amount_fen": 1.5},
                   {"amount_fen": 0}, {"amount_fen": "100"}, {"user": None}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            bus.decode(json.dumps({**good, **change}).encode(), "b")
    with pytest.raises(KeyError):
        bus.decode(json.dumps({k: v for k, v in good.items() if k != "photo_id"}).encode(),
                   "b")
