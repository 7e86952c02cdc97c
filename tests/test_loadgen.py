"""The load generator (gateway/ops/loadgen.py) against a real bank simulator and gateway:
spawned processes started together, tallies that add up, no process left behind."""

from __future__ import annotations

import multiprocessing

import pytest

from gateway.client import Client
from gateway.ops import loadgen
from tests.conftest import run
from tests.test_gateway import top_up

USERS = [f"lg{i}" for i in range(8)]
SECONDS = 2
RATE = 40.0  # calls/s per generator


def _topped_up(stack) -> list[str]:
    """One ticket per user, each wallet topped up (sends cost 50 fen, unlocks 100 fen)."""
    tickets = [stack.ticket(u) for u in USERS]

    async def scenario():
        async with Client(stack.target) as c:
            for i, t in enumerate(tickets):
                await top_up(c, Client.bearer(t), 20_000, rid=f"lg-top{i}")

    run(scenario())
    return tickets


def test_two_generators_tally_every_call_they_offer_and_end(stack):
    tickets = _topped_up(stack)
    specs = [{"target": stack.target, "users": USERS, "tickets": tickets, "gid": g,
              "seed": 7 + g, "rates": [RATE] * SECONDS} for g in range(2)]
    with loadgen.spawn(specs) as gens:
        procs = list(gens.procs)
        assert all(p.is_alive() for p in procs)  # ready, waiting for their start time
        gens.start()
        results = gens.results()
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)
    assert multiprocessing.active_children() == []

    assert len(results) == 2
    for r in results:
        assert len(r["tally"]) == SECONDS and r["throttle"] is None
        assert sum(r["unsent"]) == 0
    merged = loadgen.merge(results)
    assert merged["seconds"] == SECONDS
    total = 0
    for s, row in enumerate(merged["tiers"]):
        assert set(row) == set(loadgen.TIERS)
        for tier, counts in row.items():
            outcomes = sum(counts[o] for o in loadgen.OUTCOMES)
            assert counts["offered"] == outcomes, (s, tier, counts)
            total += counts["offered"]
        assert len(merged["p0_lat_ms"][s]) == row["P0"]["ok"]
    # The open loop starts every call of its schedule (those due after its last tick at
    # the end): rate * seconds per generator.
    assert total == 2 * RATE * SECONDS
    # Every tier's calls reach the server and are answered: served, or (on a machine busy
    # enough for the gateway to shed) shed by it, never an unknown answer.
    for tier in loadgen.TIERS:
        assert sum(row[tier][o] for row in merged["tiers"]
                   for o in ("ok", "degraded", "shed")) > 0, (tier, merged)
    assert sum(row["P0"]["ok"] for row in merged["tiers"]) > 0, merged
    assert merged["others"] == {}, merged["others"]


def test_a_closed_loop_generator_runs_p0_calls_only(stack):
    tickets = _topped_up(stack)
    spec = {"target": stack.target, "users": USERS, "tickets": tickets, "gid": 0,
            "seconds": 1, "in_flight": 2}
    with loadgen.spawn([spec]) as gens:
        gens.start(0.2)
        (result,) = gens.results()
    assert multiprocessing.active_children() == []
    merged = loadgen.merge([result])
    p0_ok = sum(row["P0"]["ok"] for row in merged["tiers"])
    assert p0_ok > 0 and sum(map(len, merged["p0_lat_ms"])) == p0_ok
    for row in merged["tiers"]:
        assert all(row[t]["offered"] == 0 for t in ("P1", "P2", "P3"))
        assert row["P0"]["offered"] == sum(row["P0"][o] for o in loadgen.OUTCOMES)


def test_specs_that_cannot_run_are_refused_before_any_process_starts():
    base = {"target": "127.0.0.1:1", "users": ["a", "b"], "tickets": ["x", "y"], "gid": 0,
            "rates": [1.0]}
    with pytest.raises(ValueError):
        loadgen.spawn([base, dict(base)])  # the same gid twice
    with pytest.raises(ValueError):
        loadgen.spawn([{**base, "rates": [], "seconds": 2}])  # closed loop without in_flight
    with pytest.raises(ValueError):
        loadgen.spawn([{**base, "users": ["a"], "tickets": ["x"]}])
    with pytest.raises(ValueError):
        loadgen.spawn([])
    assert multiprocessing.active_children() == []


def test_a_generator_that_cannot_reach_the_gateway_fails_and_is_ended():
    spec = {"target": "127.0.0.1:1", "users": ["a", "b"], "tickets": ["x", "y"], "gid": 3,
            "rates": [1.0]}
    with pytest.raises(RuntimeError, match="generator 3"):
        loadgen.spawn([spec], ready_timeout_s=20)
    assert multiprocessing.active_children() == []


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]   # 1 .. 100
    assert [loadgen.percentile(values, q) for q in (0.0, 0.5, 0.99, 1.0)] == [1, 50, 99, 100]
    assert loadgen.percentile([7.0], 0.99) == 7.0
    assert loadgen.percentile([1.0, 2.0], 0.5) == 1.0   # rank ceil(1.0): not rounded to even
    assert loadgen.percentile(values, 0.07) == 7.0     # 0.07 * 100 is 7.000000000000001
    with pytest.raises(ValueError):
        loadgen.percentile([], 0.5)
