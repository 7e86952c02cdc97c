"""The cluster reconcile: every SET's books and the credit stream checked together.

The checks run over real parts: LMDB ledgers with placement set (the SETs), a real 3-node
JetStream cluster with the real relay and consumer between them, and, for the admin call
and the command, real ``hongbao serve`` processes. Each planted discrepancy is its own
case and must be found and named; the untouched cases must be BALANCED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import nats
import pytest
from nats.js import errors as js_errors

import hotpath
from gateway.client import Client
from gateway.cluster import bus, mapstore
from gateway.cluster.reconcile import (
    ClusterReport,
    SetAudit,
    StreamState,
    check,
    gather,
    read_stream,
)
from gateway.domain import keys
from gateway.domain.model import RemoteCredit
from gateway.domain.reads import Direction
from gateway.errors import reason_of
from gateway.ledger import LmdbLedger, offline_write
from gateway.ops.clusterproc import LocalCluster
from gateway.ops.natsproc import NatsCluster
from gateway.ops.procs import free_port
from gateway.usecases import Operations
from hongbao.v1 import admin_pb2, envelope_pb2, wallet_pb2
from tests.conftest import run
from tests.test_cluster_serve import CARD, user_on
from tests.test_ledger import BACKENDS, _fund, _send, make_ledger

SETS = ("a", "b", "c")


# -- parts ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nats_cluster(shared_nats):
    shared_nats.clear()
    return shared_nats


def home_of(user: bytes) -> bytes:
    """Users named b-* live on SET b, c-* on SET c, everyone else on SET a."""
    return user[:1] if user[:2] in (b"b-", b"c-") else b"a"


def placed(ledger, name: str):
    me = name.encode()
    ledger.set_placement(lambda user: None if home_of(user) == me else home_of(user))
    return ledger


class LedgerSet:
    """A SET as the gathering sees it, answered by an in-process ledger."""

    def __init__(self, name: str, ledger, before_listing=None) -> None:
        self.name = name
        self.address = f"127.0.0.1:{7100 + SETS.index(name)}"
        self.ledger = ledger
        self.before_listing = before_listing  # a coroutine function run before each read
        self.listings = 0

    async def audit(self) -> SetAudit:
        r = await self.ledger.audit()
        return SetAudit(r.balanced, r.discrepancies, r.totals, r.in_flight)

    async def listing(self):
        if self.before_listing is not None:
            await self.before_listing()
        self.listings += 1
        return await self.ledger.interset_credits()


class World:
    """Three SETs' ledgers, their relays and consumers on one real JetStream."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ledgers = {n: placed(LmdbLedger(tmp_path / n), n) for n in SETS}
        self.nc = None
        self.js = None

    async def connect(self, urls: list[str]) -> None:
        self.nc = await nats.connect(servers=urls)
        self.js = self.nc.jetstream()
        with contextlib.suppress(js_errors.NotFoundError):   # each case starts afresh
            await self.js.delete_stream(bus.STREAM)
        await bus.ensure_stream(self.js, replicas=3)

    def sources(self) -> list[LedgerSet]:
        return [LedgerSet(n, self.ledgers[n]) for n in SETS]

    async def reconcile(self, sources=None, stream=None) -> ClusterReport:
        gathered = await gather(sources or self.sources(),
                                stream or (lambda: read_stream(self.js)))
        self.gathered = gathered
        return check(gathered)

    async def traffic(self) -> int:
        """Envelopes on a and b grabbed by users of all three SETs; credits applied on the
        envelopes' SETs, so the cross-SET ones wait in the relays' outboxes."""
        a, b = self.ledgers["a"], self.ledgers["b"]
        await _fund(a, "alice", 100_000)
        await _fund(b, "b-bea", 100_000)
        for i in range(3):
            env_a = (await _send(a, "alice", 900, 3, rid=f"sa{i}")).envelope_id
            env_b = (await _send(b, "b-bea", 600, 3, rid=f"sb{i}")).envelope_id
            for user in ("b-bob", "c-cai", "alice"):
                await a.grab(user, env_a, f"g{i}")
            for user in ("alice", "c-cai", "b-bo2"):
                await b.grab(user, env_b, f"g{i}")
        await a.apply_credits(100)
        await b.apply_credits(100)
        return sum([len(await led.remote_credits_due(100)) for led in self.ledgers.values()])

    async def relay(self, *names: str) -> None:
        """The relays of ``names`` until their outboxes are empty."""
        relays = [bus.CreditRelay(self.ledgers[n], self.js, n) for n in names]
        await self._run(relays, lambda: _all_empty(self.ledgers[n] for n in names))

    async def consume(self, *names: str) -> None:
        """The consumers of ``names`` until each has applied and acknowledged everything
        the stream holds for its SET (acknowledged: gone from the stream)."""
        consumers = [bus.CreditConsumer(self.ledgers[n], self.js, n) for n in names]

        async def drained() -> bool:
            for n in names:
                try:
                    info = await self.js.consumer_info(bus.STREAM, f"credits-{n}")
                except js_errors.NotFoundError:
                    return False   # its durable is not made yet
                if info.num_pending or info.num_ack_pending:
                    return False
            return True
        await self._run(consumers, drained)

    @staticmethod
    async def _run(loops, done) -> None:
        tasks = [asyncio.create_task(loop.run()) for loop in loops]
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not await done():
                assert asyncio.get_running_loop().time() < deadline, "timed out"
                await asyncio.sleep(0.02)
        finally:
            for loop in loops:
                loop.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    def close_ledgers(self) -> None:
        for led in self.ledgers.values():
            led.close()


async def _all_empty(ledgers) -> bool:
    return all([not await led.remote_credits_due(1) for led in ledgers])


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close_ledgers()


def scenario(world: World, nats_cluster: NatsCluster, body):
    async def go():
        await world.connect(nats_cluster.urls)
        try:
            return await body()
        finally:
            await world.close()
    return run(go())


def assert_balanced(report: ClusterReport) -> ClusterReport:
    assert report.balanced, report.discrepancies
    return report


def only(report: ClusterReport, *needles: str) -> list[str]:
    """The discrepancies that contain every needle (at least one must)."""
    found = [d for d in report.discrepancies if all(n in d for n in needles)]
    assert found, (needles, report.discrepancies)
    return found


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


# -- balanced, in flight and landed ---------------------------------------------------------

def test_credits_in_the_outbox_then_the_stream_then_landed_all_balance(world, nats_cluster):
    """With the relays stopped the credits wait in the outboxes, with the consumers stopped
    in the stream, and then they land: BALANCED at each step, the in-flight figures where
    the credits are, and x:B + x:A equals the credits in flight between A and B."""
    async def body():
        waiting = await world.traffic()
        assert waiting == 12
        r = assert_balanced(await world.reconcile())
        ab, ac = r.flows[("a", "b")], r.flows[("a", "c")]
        assert (ab.sent, ab.in_outbox, ab.in_stream, ab.applied) == (3, 3, 0, 0)
        assert ac.in_outbox == 3 and ac.in_flight_fen == ac.sent_fen
        assert r.totals["account_sum_fen"] == 0 and r.stream["messages"] == 0
        x = {n: world.gathered.first[n].balances for n in SETS}
        assert x["a"]["b"] + x["b"]["a"] == ab.in_flight_fen + r.flows[("b", "a")].in_flight_fen

        await world.relay("a", "b")
        r = assert_balanced(await world.reconcile())
        assert r.stream["messages"] == 12
        assert all(f.in_outbox == 0 and f.in_stream == f.sent for f in r.flows.values())

        await world.consume("a", "b", "c")
        r = assert_balanced(await world.reconcile())
        assert all(f.in_flight_fen == 0 and f.applied == f.sent for f in r.flows.values())
        assert sum(f.applied_fen for f in r.flows.values()) == sum(
            f.sent_fen for f in r.flows.values()) > 0
        x = {n: world.gathered.first[n].balances for n in SETS}
        assert all(x[p].get(q, 0) + x[q].get(p, 0) == 0 for p in SETS for q in SETS)
        return r

    report = scenario(world, nats_cluster, body)
    assert "BALANCED" in report.to_text()
    assert json.loads(report.to_json())["balanced"] is True


def test_a_credit_applied_between_the_reads_is_found_on_the_second_read(
        world, nats_cluster):
    """A credit in the stream when the SETs are listed, applied and acknowledged before
    the stream is read, is in none of the first reads: the receiver is read again after
    the stream, finds it applied, and there is no false alarm."""
    async def body():
        await world.traffic()
        await world.relay("a", "b")

        async def move_then_read() -> StreamState:
            await world.consume("b", "c")    # a's own credits from b stay in the stream
            return await read_stream(world.js)

        r = assert_balanced(await world.reconcile(stream=move_then_read))
        assert {"b", "c"} <= world.gathered.later.keys()
        ab = r.flows[("a", "b")]
        assert ab.late_fen == ab.sent_fen > 0 and ab.in_flight_fen == 0
        assert r.flows[("b", "a")].in_stream == 3

    scenario(world, nats_cluster, body)


def test_a_credit_sent_after_its_sender_was_read_is_no_false_alarm(world, nats_cluster):
    """A credit booked on a after a was listed, relayed and applied on b before b is
    listed: b shows it APPLIED, a's first listing does not show it SENT; a is read again
    and shows it, and the pair's skew explains x:b + x:a."""
    async def body():
        a = world.ledgers["a"]
        await _fund(a, "alice", 10_000)
        env = (await _send(a, "alice", 400, 2)).envelope_id
        share = (await a.grab("b-bob", env, "g")).amount_fen

        sources = world.sources()
        b = sources[1]

        async def meanwhile() -> None:
            if b.listings == 0:   # after a's first listing, before b's
                await a.apply_credits(10)          # the credit is booked only now
                await world.relay("a")
                await world.consume("b")

        b.before_listing = meanwhile
        r = assert_balanced(await world.reconcile(sources))
        assert "a" in world.gathered.later
        assert r.flows[("a", "b")].newer_fen == share

    scenario(world, nats_cluster, body)


# -- planted discrepancies, each found and named ---------------------------------------------

def test_a_credit_applied_with_another_amount_is_named(world, nats_cluster):
    """b applies a's credit for one fen more than a sent: both SETs balance alone, the
    cluster does not, and the line names the credit, both SETs and both amounts."""
    async def body():
        await world.traffic()
        c = next(c for c in await world.ledgers["a"].remote_credits_due(100) if c.home == "b")
        wrong = RemoteCredit("b", c.transfer_id, c.user_id, c.amount_fen + 1, "env_x")
        await world.ledgers["b"].apply_remote_credits("a", [wrong])
        r = await world.reconcile()
        assert all(r.sets[n]["balanced"] for n in SETS)
        only(r, c.transfer_id, f"SET a sent {c.amount_fen} fen",
             f"SET b applied {c.amount_fen + 1} fen")
        only(r, "SETs a and b")

    scenario(world, nats_cluster, body)


def test_a_credit_no_set_sent_is_named(world, nats_cluster):
    """A credit b applied as from a, which a never sent, is named once a has been read
    again (it could have been newer than a's first read)."""
    async def body():
        await world.traffic()
        forged = RemoteCredit("b", "c:env_forged:0", "b-bob", 50, "env_forged")
        await world.ledgers["b"].apply_remote_credits("a", [forged])
        r = await world.reconcile()
        assert "a" in world.gathered.later
        only(r, "c:env_forged:0", "applied on SET b", "50 fen from SET a",
             "never sent by SET a")

    scenario(world, nats_cluster, body)


def test_a_sent_credit_that_vanished_is_named(world, nats_cluster):
    """A credit taken off a's outbox without being published (the relay's bug) is in no
    outbox, not in the stream, applied nowhere: lost, with its id, SETs and amount."""
    async def body():
        await world.traffic()
        c = next(c for c in await world.ledgers["a"].remote_credits_due(100) if c.home == "c")
        await world.ledgers["a"].remote_credits_sent([c.seq])
        r = await world.reconcile()
        assert all(r.sets[n]["balanced"] for n in SETS)
        only(r, c.transfer_id, "a -> c", f"{c.amount_fen} fen", "lost")
        only(r, "credits a -> c", "in flight")

    scenario(world, nats_cluster, body)


def test_an_inter_set_balance_off_by_one_is_named(world, nats_cluster):
    """x:b on a one fen over what a's credits to and from b give (and a wallet one fen
    under, so a's accounts still sum to zero): named against a's own listing and in the
    pair check."""
    async def body():
        await world.traffic()
        before = (await world.ledgers["a"].interset_credits()).balances["b"]
        world.ledgers["a"].close()
        with offline_write(world.tmp_path / "a") as tx:
            for acct, delta in ((keys.interset_account(b"b"), 1),
                                (keys.wallet_account(b"alice"), -1)):
                held = hotpath.unpack_i64(tx.get(keys.ACCOUNTS, acct))
                tx.put(keys.ACCOUNTS, acct, hotpath.pack_i64(held + delta))
        world.ledgers["a"] = placed(LmdbLedger(world.tmp_path / "a"), "a")
        r = await world.reconcile()
        only(r, "SET a: x:b holds", f"{before + 1} fen", f"give {before} fen")
        only(r, "SETs a and b", f"x:b on a ({before + 1} fen)")
        assert not r.sets["a"]["balanced"]

    scenario(world, nats_cluster, body)


def test_stream_messages_no_set_sent_are_named(world, nats_cluster):
    """A credit in the stream that its named sender never sent, and a message that is not a
    credit at all, are each named with their stream sequence."""
    async def body():
        await world.traffic()
        fake = bus.encode("a", RemoteCredit("c", "c:env_fake:1", "c-cai", 70, "env_fake"))
        await world.js.publish("credit.c", fake, stream=bus.STREAM,
                               headers={"Nats-Msg-Id": "c:env_fake:1"})
        await world.js.publish("credit.b", b"not json", stream=bus.STREAM,
                               headers={"Nats-Msg-Id": "junk"})
        r = await world.reconcile()
        only(r, "stream message 1", "c:env_fake:1", "70 fen a -> c", "never sent")
        only(r, "stream message 2 on credit.b is not a credit")

    scenario(world, nats_cluster, body)


def test_an_unreachable_set_is_a_discrepancy_and_nothing_is_claimed_about_it(
        world, nats_cluster):
    """A SET whose calls fail is one line naming it and its address; credits bound for it
    are not called lost, and no pair with it is checked."""
    from gateway.cluster.reconcile import SetUnreachable

    class Down(LedgerSet):
        async def audit(self):
            raise SetUnreachable(f"SET {self.name} at {self.address} unreachable: gone")

        async def listing(self):
            raise SetUnreachable(f"SET {self.name} at {self.address} unreachable: gone")

    async def body():
        await world.traffic()
        await world.relay("a", "b")
        await world.consume("a", "b")   # what is bound for c waits in the stream
        sources = world.sources()
        sources[2] = Down("c", world.ledgers["c"])
        r = await world.reconcile(sources)
        assert r.discrepancies == ["SET c at 127.0.0.1:7102 unreachable: gone"]
        assert not r.sets["c"]["reached"]

    scenario(world, nats_cluster, body)


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


# -- the command ----------------------------------------------------------------------------

def reconcile_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile", *args],
                          capture_output=True, text=True, timeout=120)


def assert_refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hongbao reconcile: "), done.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_reconcile_cluster_cli_refuses_what_it_cannot_start_with(tmp_path, nats_cluster):
    """A bad cluster file, no ticket or no key file, NATS unreachable, no slot map: one
    line, exit 2."""
    keys_dir = tmp_path / "keys"
    from gateway.security import tickets
    tickets.KeyRing.load_or_create(keys_dir)
    key_file = str(keys_dir / "ticket_keys.json")
    bad = tmp_path / "bad.toml"
    bad.write_text('set = "s1"\naddress = "nowhere"\nnats = []\n')
    assert_refused(reconcile_cmd("--cluster", str(bad), "--key-file", key_file), "address")
    assert_refused(reconcile_cmd("--cluster", str(tmp_path / "none.toml"), "--key-file",
                                 key_file), "none.toml")
    good = tmp_path / "s1.toml"
    good.write_text(f'set = "s1"\naddress = "127.0.0.1:1"\n'
                    f'nats = ["nats://127.0.0.1:{free_port()}"]\n')
    assert_refused(reconcile_cmd("--cluster", str(good)), "--key-file", "--ticket")
    assert_refused(reconcile_cmd("--data-dir", str(tmp_path), "--ticket", "t"), "--cluster")
    assert_refused(reconcile_cmd("--cluster", str(good), "--key-file",
                                 str(tmp_path / "nokeys.json")), "nokeys.json")
    assert_refused(reconcile_cmd("--cluster", str(good), "--key-file", key_file),
                   "cannot reach NATS")

    async def no_map() -> None:
        nc = await nats.connect(servers=nats_cluster.urls)
        try:
            with contextlib.suppress(js_errors.NotFoundError):
                await nc.jetstream().delete_key_value(mapstore.BUCKET)
        finally:
            await nc.close()
    run(no_map())
    urls = ", ".join(f'"{u}"' for u in nats_cluster.urls)
    good.write_text(f'set = "s1"\naddress = "127.0.0.1:1"\nnats = [{urls}]\n')
    assert_refused(reconcile_cmd("--cluster", str(good), "--key-file", key_file),
                   "no slot map")


def test_reconcile_cluster_cli_over_running_sets(tmp_path, shared_nats):
    """Two ``hongbao serve --cluster`` SETs, one bank: a cross-SET grab landed, then
    ``hongbao reconcile --cluster FILE --key-file K --bank B`` is BALANCED (the bank's
    merchant balance is the sum over the SETs); with a SET killed it names it and exits 1."""
    with LocalCluster(tmp_path / "cluster", sets=2, nats=shared_nats) as cluster:
        alice, bob = user_on(cluster, "s1", "alice"), user_on(cluster, "s2", "bob")
        grabbed = run(_cross_set_grab(cluster, alice, bob))
        s1 = str(cluster.sets["s1"].cluster_file)
        key_file = str(cluster.key_file)
        done = reconcile_cmd("--cluster", s1, "--key-file", key_file, "--bank",
                             cluster.bank.target)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "BALANCED" in done.stdout and "credits s1 -> s2: sent 1" in done.stdout
        as_json = json.loads(reconcile_cmd("--cluster", s1, "--key-file", key_file,
                                           "--json").stdout)
        assert as_json["balanced"] and as_json["sets"]["s2"]["interset_fen"] == {"s1": -grabbed}
        bank = json.loads(reconcile_cmd("--cluster", s1, "--key-file", key_file, "--bank",
                                        cluster.bank.target, "--json").stdout)["bank"]
        assert bank["merchant_balance_fen"] == bank["expected_fen"] == 3_000
        cluster.sets["s2"].kill()
        down = reconcile_cmd("--cluster", s1, "--key-file", key_file)
        assert down.returncode == 1, down.stdout + down.stderr
        assert f"SET s2 at {cluster.sets['s2'].address} unreachable" in down.stdout


async def _cross_set_grab(cluster: LocalCluster, alice: str, bob: str) -> int:
    """alice (s1) and bob (s2) top up through s1; alice sends, bob grabs: the share
    crosses s1 -> stream -> s2. Returns it once it has landed."""
    def meta(user: str):
        return Client.bearer(cluster.ticket(user))

    async with Client(cluster.sets["s1"].address) as c:
        for user, amount in ((alice, 2_000), (bob, 1_000)):
            await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id=f"top-{user}", card_id=CARD, amount_fen=amount),
                metadata=meta(user), timeout=10)
        sent = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id="e1", total_fen=500, count=2, kind=envelope_pb2.ENVELOPE_KIND_LUCKY),
            metadata=meta(alice), timeout=10)
        got = await c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
            envelope_id=sent.envelope_id, request_id="g1"), metadata=meta(bob), timeout=10)
        deadline = asyncio.get_running_loop().time() + 20
        while (await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta(bob),
                                         timeout=10)).balance_fen != 1_000 + got.amount_fen:
            assert asyncio.get_running_loop().time() < deadline, "the credit did not land"
            await asyncio.sleep(0.05)
        return got.amount_fen
