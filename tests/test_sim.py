"""The seeded simulation (gateway/sim, `hongbao sim`): the product holds every invariant
over seeded scenarios, a seed replays exactly, and a planted defect is caught, shrunk and
replayed from its saved plan.

``HONGBAO_SIM_SEEDS`` sets how many scenarios the first test runs (default 200, about
ten seconds); ``make chaos`` runs 20,000 through ``hongbao sim``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from gateway.ops.sim import run_seeds
from gateway.payments.bank import BankBusy, BankUnclear, ChannelDown, OrderStatus
from gateway.sim.bank import BankRefused, Faults, SimBank, SimPayer
from gateway.sim.mutants import MUTANTS
from gateway.sim.plan import Plan, generate
from gateway.sim.run import run_plan
from gateway.sim.shrink import shrink
from gateway.sim.vloop import Stuck, VirtualLoop
from gateway.sim.world import POINTS

SEEDS = int(os.environ.get("HONGBAO_SIM_SEEDS", "200"))
DEFECTS = sorted(m for m in MUTANTS if m != "none")


def test_the_product_holds_every_invariant_over_seeded_scenarios():
    total = run_seeds(1, SEEDS, "none", jobs=1)
    assert total["failed"] == [], total["failed"][:5]
    assert total["scenarios"] == SEEDS
    # The scenarios did what they claim: every outcome, every bank fault, crashes.
    assert all(total["outcomes"][k] > 0 for k in ("ok", "fail", "unknown")), total["outcomes"]
    assert set(total["faults"]) == {"busy", "timeout", "decline", "lost_response",
                                    "late_debit", "down", "channel_down"}
    # Payments moved to the clearing channel, and the bank holds orders on both channels.
    assert total["routing"]["moved"] > 0, total["routing"]
    assert total["routing"]["via clearing"] > 0 < total["routing"]["via direct"]
    assert total["crashes"] >= SEEDS // 2
    assert total["checks"] > 20 * SEEDS


def test_every_crash_point_is_reached_and_the_process_dies_there():
    died_at = Counter()
    for seed in range(1, 150):
        for why in run_plan(generate(seed)).crashes:
            died_at[why.split(" #")[0]] += 1
    assert set(died_at) == set(POINTS), died_at


@pytest.mark.parametrize("seed", [3, 12, 77])
def test_a_seed_replays_exactly_and_so_does_its_saved_plan(seed):
    first = run_plan(generate(seed))
    again = run_plan(generate(seed))
    saved = run_plan(Plan.from_json(generate(seed).to_json()))
    assert first.trace == again.trace == saved.trace
    assert len(first.trace) > 10
    assert run_plan(generate(seed + 1)).trace != first.trace


@pytest.mark.parametrize("mutant", DEFECTS)
def test_a_planted_defect_is_caught_shrunk_and_replayed(mutant, tmp_path):
    caught_by = MUTANTS[mutant].caught_by
    failing = next(s for s in range(1, 200) if not run_plan(generate(s), mutant).ok)
    found = run_plan(generate(failing), mutant)
    assert found.signature == caught_by, found.failures
    small, runs = shrink(found.plan, found.signature, lambda p: run_plan(p, mutant), 200)
    assert 0 < runs <= 200
    assert small.size < found.plan.size
    assert run_plan(small, mutant).signature == caught_by
    assert run_plan(small).ok, "the shrunk plan fails only because of the defect"
    path = tmp_path / "plan.json"
    path.write_text(small.to_json())
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "sim", "--plan", str(path),
                           "--mutant", mutant, "--shrink-budget", "0",
                           "--save", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED {caught_by}" in done.stdout
    assert (tmp_path / "out" / f"seed-{small.seed}-{mutant}.json").exists()


def test_the_command_runs_seeds_on_two_processes_and_prints_one_table():
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "sim", "--seeds", "40",
                           "--start", "500", "--jobs", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "seeds 500..539" in done.stdout and "PASS" in done.stdout
    assert "40 in" in done.stdout


def test_the_command_refuses_a_file_that_is_not_a_plan(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 1}')
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "sim", "--plan", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not a saved plan" in done.stderr and "Traceback" not in done.stderr


def test_virtual_time_moves_only_when_nothing_is_ready_and_a_stuck_world_says_so():
    async def sleeps() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(60), 1.5)
        return loop.time()

    with asyncio.Runner(loop_factory=VirtualLoop) as r:
        assert r.run(sleeps()) == pytest.approx(3601.5)

    async def forever() -> None:
        await asyncio.get_running_loop().create_future()

    with asyncio.Runner(loop_factory=VirtualLoop) as r, pytest.raises(Stuck):
        r.run(forever())


def test_the_simulated_bank_keeps_the_bank_simulators_rules():
    """The rules the simulation relies on, call by call (banksim's own are tested against
    the real process in tests/test_banksim.py)."""
    import random

    async def script() -> None:
        bank = SimBank(random.Random(1), opening_fen=1_000, timeout_s=3.0)
        assert (await bank.debit("o1", "icbc-1", 600)).settled
        assert (await bank.debit("o1", "icbc-1", 600)).settled          # a repeat: same answer
        again = await bank.debit("o1", "icbc-1", 601)
        assert again.decline_reason == "BANK_ORDER_ID_REUSED"
        short = await bank.debit("o2", "icbc-1", 600)
        assert short.decline_reason == "CARD_INSUFFICIENT_FUNDS"
        assert await bank.void("o2") == OrderStatus.VOIDED              # declined -> locked
        assert await bank.void("o1") == OrderStatus.SETTLED             # settled stays settled
        assert await bank.refund("o1") == OrderStatus.REFUNDED
        assert await bank.refund("o1") == OrderStatus.REFUNDED          # once
        assert bank.card_balance("icbc-1") == 1_000 and bank.merchant_fen == 0
        bank.faults = Faults(late_debit=1.0, late_s=2.0)
        with pytest.raises(BankUnclear):
            await bank.debit("o3", "icbc-2", 100)
        assert await bank.query("o3") == OrderStatus.NOT_FOUND
        assert await bank.void("o3") == OrderStatus.VOIDED              # beats the late debit
        await asyncio.sleep(10)
        assert bank.status("o3") == OrderStatus.VOIDED and bank.card_balance("icbc-2") == 1_000
        bank.faults = Faults(lost_response=1.0)
        with pytest.raises(BankUnclear):
            await bank.credit("o4", "icbc-2", 50)
        assert await bank.query("o4") == OrderStatus.SETTLED            # applied, answer lost

    with asyncio.Runner(loop_factory=VirtualLoop) as r:
        r.run(script())


def test_a_plan_saved_before_channels_loads_with_every_channel_up():
    plan = generate(3)
    assert any(f.down_channels for _t, f in plan.faults)
    assert Plan.from_json(plan.to_json()) == plan
    saved = json.loads(plan.to_json())
    for _t, faults in saved["faults"]:
        faults.pop("down_channels", None)
    old = Plan.from_json(json.dumps(saved))
    assert all(f.down_channels == () for _t, f in old.faults)
    assert Faults.from_json({"busy": 0.5}) == Faults(busy=0.5)


def test_the_simulated_bank_keeps_the_channel_rules():
    """An order id belongs to the channel it was first recorded through; a down channel
    refuses before that; an id the bank never saw passes no channel gate."""
    import random

    async def script() -> None:
        bank = SimBank(random.Random(1), opening_fen=1_000, timeout_s=3.0)
        assert (await bank.debit("o1", "icbc-1", 100, "clearing")).settled
        assert await bank.query("o1", "clearing") == OrderStatus.SETTLED
        with pytest.raises(BankRefused, match="WRONG_CHANNEL"):
            await bank.query("o1")
        with pytest.raises(BankRefused, match="WRONG_CHANNEL"):
            await bank.debit("o1", "icbc-1", 100, "direct")   # moves nothing
        with pytest.raises(BankRefused, match="WRONG_CHANNEL"):
            await bank.refund("o1", "direct")
        assert bank.card_balance("icbc-1") == 900 and len(bank.wrong_channel) == 3
        heard: list[str] = []
        bank.on_wrong_channel = heard.append
        assert await bank.void("o2", "clearing") == OrderStatus.VOIDED  # locked on clearing
        with pytest.raises(BankRefused, match="WRONG_CHANNEL"):
            await bank.void("o2", "direct")
        assert heard and bank.owner("o2") == "clearing"

        bank.faults = Faults(down_channels=("clearing",))
        with pytest.raises(ChannelDown):
            await bank.query("o1", "clearing")          # a known id: its channel's gate
        with pytest.raises(ChannelDown):                # before WRONG_CHANNEL
            await bank.query("o1", "clearing")
        with pytest.raises(ChannelDown):
            await bank.credit("o3", "icbc-1", 5, "clearing")    # nothing recorded
        assert bank.status("o3") == OrderStatus.NOT_FOUND and bank.owner("o3") is None
        assert await bank.query("o3", "clearing") == OrderStatus.NOT_FOUND  # no bank: no gate
        assert await bank.void("o3", "clearing") == OrderStatus.VOIDED
        assert bank.owner("o3") == "clearing"
        assert (await bank.credit("o4", "icbc-1", 5)).settled  # direct is up
        assert bank.injected["channel_down"] == 3

        bank.faults = Faults(late_debit=1.0, late_s=2.0)
        with pytest.raises(BankUnclear):
            await bank.debit("o5", "icbc-2", 100, "clearing")
        assert bank.owner("o5") == "clearing"                # the waiting late debit's
        with pytest.raises(BankRefused, match="WRONG_CHANNEL"):
            await bank.void("o5", "direct")
        await asyncio.sleep(10)
        assert bank.status("o5") == OrderStatus.SETTLED and bank.owner("o5") == "clearing"
        assert bank.merchant_fen == 100 + 100 - 5

    with asyncio.Runner(loop_factory=VirtualLoop) as r:
        r.run(script())


def test_the_simulated_payer_moves_a_refused_call_to_the_next_channel():
    """The butler's twin: CHANNEL_DOWN moves a money call (after ``switch``); an unclear or
    busy answer never does; a channel found down is passed over for a while."""
    import random

    async def script() -> None:
        bank = SimBank(random.Random(1), opening_fen=1_000, timeout_s=3.0)
        payer = SimPayer(bank, cool_down_s=2.0)
        switched: list[str] = []

        async def switch(channel: str) -> None:
            switched.append(channel)

        assert payer.route("icbc") == "direct" and payer.usable("icbc")
        bank.faults = Faults(down_channels=("direct",))
        assert payer.route("icbc") == "direct"     # it knows only what the bank answered
        with pytest.raises(ChannelDown):           # no switch: it stays on its channel
            await payer.debit("o1", "icbc-1", 100)
        assert payer.route("icbc") == "clearing"   # direct answered CHANNEL_DOWN just now
        await asyncio.sleep(2.5)
        assert payer.route("icbc") == "direct"     # cooled down: tried again
        assert (await payer.debit("o2", "icbc-1", 100, "direct", switch)).settled
        assert switched == ["clearing"] and bank.owner("o2") == "clearing"
        assert bank.moved == 1

        bank.faults = Faults(down_channels=("direct", "clearing"))
        await asyncio.sleep(2.5)
        with pytest.raises(ChannelDown):           # every channel tried: the last refusal
            await payer.credit("o3", "icbc-1", 5, "direct", switch)
        assert switched == ["clearing", "clearing"] and bank.owner("o3") is None
        assert payer.route("icbc") is None and not payer.usable("icbc")

        await asyncio.sleep(2.5)
        bank.faults = Faults(busy=1.0)
        with pytest.raises(BankBusy):
            await payer.debit("o4", "icbc-1", 100, "direct", switch)
        bank.faults = Faults(lost_response=1.0)
        with pytest.raises(BankUnclear):
            await payer.debit("o5", "icbc-1", 100, "direct", switch)
        assert len(switched) == 2 and bank.owner("o5") == "direct"

    with asyncio.Runner(loop_factory=VirtualLoop) as r:
        r.run(script())
