"""The seeded simulation (gateway/sim, `hongbao sim`): the product holds every invariant
over seeded scenarios, a seed replays exactly, and a planted defect is caught, shrunk and
replayed from its saved plan.

``HONGBAO_SIM_SEEDS`` sets how many scenarios the first test runs (default 200, about
ten seconds); ``make chaos`` runs 20,000 through ``hongbao sim``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import pytest

from gateway.ops.sim import run_seeds
from gateway.payments.bank import BankUnclear, OrderStatus
from gateway.sim.bank import Faults, SimBank
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
                                    "late_debit", "down"}
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
    failing = next(s for s in range(1, 200) if not run_plan(generate(s), mutant).ok)
    found = run_plan(generate(failing), mutant)
    assert found.signature == "bank-agrees", found.failures
    small, runs = shrink(found.plan, found.signature, lambda p: run_plan(p, mutant), 200)
    assert 0 < runs <= 200
    assert small.size < found.plan.size
    assert run_plan(small, mutant).signature == "bank-agrees"
    assert run_plan(small).ok, "the shrunk plan fails only because of the defect"
    path = tmp_path / "plan.json"
    path.write_text(small.to_json())
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "sim", "--plan", str(path),
                           "--mutant", mutant, "--shrink-budget", "0",
                           "--save", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED bank-agrees" in done.stdout
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
