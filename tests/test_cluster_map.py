"""The slot map: its rules, and its home in a real 3-node NATS JetStream cluster.

The cluster tests start three real ``nats-server`` processes (JetStream on, routes on
loopback, free ports, stores in the test's temp folder) and drive the map through the
real ``hongbao cluster`` command.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cluster import mapstore
from gateway.cluster.config import ClusterConfig, ClusterFileError
from gateway.cluster.slotmap import MapError, SlotMap, parse_slots
from gateway.domain.keys import SLOTS, slot_of
from gateway.ops.natsproc import NatsCluster

SETS = {"s1": "127.0.0.1:7101", "s2": "127.0.0.1:7102", "s3": "127.0.0.1:7103"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.ops.cli", "cluster", *args],
                          capture_output=True, text=True, timeout=60)


# -- the rules ---------------------------------------------------------------------------

def test_an_even_map_gives_each_set_a_contiguous_third_and_moves_make_new_versions():
    m = SlotMap.even(SETS)
    sizes = [len(m.slots_of(s)) for s in SETS]
    assert sum(sizes) == SLOTS and max(sizes) - min(sizes) <= 1
    assert [len(m.runs(s)) for s in SETS] == [1, 1, 1]
    moved = m.moved(parse_slots("0-9,500"), "s3")
    assert moved.version == 2 and m.version == 1          # a value: the old map is unchanged
    assert moved.owner(0) == moved.owner(500) == "s3" and m.owner(0) == "s1"
    assert SlotMap.from_json(moved.to_json()) == moved
    assert len(moved.to_json()) < 400                       # stored as runs, not 1,024 names
    # Users spread over the SETs about evenly.
    users = [f"user{i}" for i in range(30_000)]
    per_set = {s: sum(1 for u in users if m.owner(slot_of(u)) == s) for s in SETS}
    assert all(9_000 < n < 11_000 for n in per_set.values()), per_set


@pytest.mark.parametrize("make, message", [
    (lambda: SlotMap.even({}), "at least one SET"),
    (lambda: SlotMap.even({"S1": "127.0.0.1:1"}), "bad SET name"),
    (lambda: SlotMap.even({"s1": "nowhere"}), "bad address"),
    (lambda: SlotMap.even(SETS).moved([0], "s9"), "no SET 's9'"),
    (lambda: SlotMap.even(SETS).moved([1024], "s2"), "slots must be in 0..1023"),
    (lambda: parse_slots("0-x"), "bad slot list"),
    (lambda: SlotMap.from_json(b'{"version": 1, "addresses": {}, "runs": {}}'), "no owner"),
    (lambda: SlotMap.from_json(b"[]"), "not a slot map"),
])
def test_an_impossible_map_or_change_is_refused_with_the_reason(make, message):
    with pytest.raises(MapError, match=message):
        make()


def test_the_cluster_file_is_checked_key_by_key(tmp_path):
    good = tmp_path / "s1.toml"
    good.write_text('set = "s1"\naddress = "127.0.0.1:7101"\nnats = ["nats://127.0.0.1:4222"]\n')
    assert ClusterConfig.load(good) == ClusterConfig("s1", "127.0.0.1:7101",
                                                     ("nats://127.0.0.1:4222",))
    for text, message in (('set = "s1"\naddress = "h:1"\nnats = ["nats://h:1"]\nx = 1\n',
                           "unknown keys"),
                          ('set = 1\naddress = "h:1"\nnats = ["nats://h:1"]\n', "set must be"),
                          ('set = "s1"\naddress = "h"\nnats = ["nats://h:1"]\n', "address"),
                          ('set = "s1"\naddress = "h:1"\nnats = []\n', "nats must be"),
                          ("set = ", "bad.toml")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ClusterFileError, match=message):
            ClusterConfig.load(bad)


# -- in JetStream ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats")) as cluster:
        yield cluster


def test_init_show_move_through_the_command(nats_cluster):
    urls = ",".join(nats_cluster.urls)
    none = _cli("show", "--nats", urls)
    assert none.returncode == 2 and "no slot map yet" in none.stderr
    no_history = _cli("show", "--nats", urls, "--history")
    assert no_history.returncode == 2 and "no slot map yet" in no_history.stderr
    sets = [a for s, addr in SETS.items() for a in ("--set", f"{s}={addr}")]
    init = _cli("init", "--nats", urls, *sets)
    assert init.returncode == 0, init.stderr
    assert "version 1: 3 SETs" in init.stdout and "0-341" in init.stdout
    again = _cli("init", "--nats", urls, "--set", "s1=127.0.0.1:1")
    assert again.returncode == 2 and "has a slot map already (version 1)" in again.stderr
    moved = _cli("move", "--nats", urls, "--slots", "0-9", "--to", "s3", "--map-only")
    assert moved.returncode == 0 and "version 2" in moved.stdout
    assert "0-9 683-1023" in moved.stdout
    bad = _cli("move", "--nats", urls, "--slots", "0-9", "--to", "s9", "--map-only")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no SET 's9'" in bad.stderr
    history = _cli("show", "--nats", urls, "--history")
    assert history.stdout.count("slot map version") == 2
    cfg = Path(nats_cluster.root) / "s1.toml"
    cfg.write_text(f'set = "s1"\naddress = "{SETS["s1"]}"\nnats = {nats_cluster.urls!r}\n'
                   .replace("'", '"'))
    shown = _cli("show", "--cluster", str(cfg))
    assert shown.returncode == 0 and "version 2" in shown.stdout
    unreachable = _cli("show", "--nats", "nats://127.0.0.1:1")
    assert unreachable.returncode == 2 and "cannot reach NATS" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_concurrent_moves_both_land_by_compare_and_set(nats_cluster):
    import nats

    async def scenario() -> SlotMap:
        conns = [await nats.connect(servers=nats_cluster.urls) for _ in range(2)]
        try:
            js = [c.jetstream() for c in conns]
            before, _ = await mapstore.load(js[0])
            # Twenty rounds: nats-server 2.9 can accept both of two racing compare-and-sets
            # (nats-io/nats-server#4320); mapstore.move finds that and writes the merge.
            for i in range(20):
                a, b = ("s2", "s1") if i % 2 else ("s3", "s2")
                await asyncio.gather(mapstore.move(js[0], list(range(100, 110)), a),
                                     mapstore.move(js[1], list(range(900, 910)), b))
                after, _ = await mapstore.load(js[0])
                assert {after.owner(s) for s in range(100, 110)} == {a}, i
                assert {after.owner(s) for s in range(900, 910)} == {b}, i
            assert after.version >= before.version + 40
            return after
        finally:
            for c in conns:
                await c.close()

    after = asyncio.run(scenario())
    assert {after.owner(s) for s in range(100, 110)} == {"s2"}


def test_the_map_survives_one_node_of_three_and_its_return(nats_cluster):
    """Replicated three ways: with one node killed the map is read and moved through the
    other two; the node comes back on its ports and serves the newest version."""
    import nats

    victim = nats_cluster.nodes[0]
    victim.kill()
    try:
        others = ",".join(n.url for n in nats_cluster.nodes[1:])
        for _ in range(10):   # the two elect new leaders for what the victim led, in seconds
            moved = _cli("move", "--nats", others, "--slots", "1000-1023", "--to", "s2",
                         "--map-only")
            if moved.returncode == 0 or "try again" not in moved.stderr:
                break
        assert moved.returncode == 0, moved.stderr
        assert "Traceback" not in moved.stderr
        version = int(moved.stdout.split("version ")[1].split(":")[0])
    finally:
        victim.start()

    async def read_from_the_returned_node() -> int:
        for _ in range(100):   # it catches up with the others, then answers
            nc = await nats.connect(servers=[victim.url])
            try:
                m, _ = await mapstore.load(nc.jetstream())
                if m.version == version:
                    return m.version
            except Exception:
                pass
            finally:
                await nc.close()
            await asyncio.sleep(0.2)
        return -1

    assert asyncio.run(read_from_the_returned_node()) == version
