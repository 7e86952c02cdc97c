"""``hongbao sim``: seeded simulations of the money flows, thousands a minute (gateway/sim).

    hongbao sim                      # 1,000 scenarios, seeds 1..1000, both cores
    hongbao sim --seeds 20000 --start 5000 --jobs 2
    hongbao sim --seed 4242          # replay one scenario and print what happened
    hongbao sim --plan sim-failures/seed-4242.json   # replay a saved (shrunk) plan
    hongbao sim --mutant resolver-skips-void         # prove the checks catch a known bug

Each seed is one scenario (``gateway.sim.plan.generate``): the same seed runs the same
way on every machine. A failing seed is shrunk to a smaller plan that fails the same
check, the plan is saved as JSON under ``--save`` and its trace printed; exit 1. A run
where every scenario holds exits 0 and prints one table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gateway.sim.mutants import MUTANTS
from gateway.sim.plan import Plan, generate
from gateway.sim.run import Result, run_plan
from gateway.sim.shrink import shrink


def _batch(seeds: list[int], mutant: str) -> dict:
    """Runs seeds in one process; returns the counters and the failing seeds."""
    out: dict = {"scenarios": 0, "outcomes": Counter(), "faults": Counter(),
                 "routing": Counter(), "crashes": 0, "checks": 0, "failed": []}
    for seed in seeds:
        r = run_plan(generate(seed), mutant)
        out["scenarios"] += 1
        out["outcomes"].update(r.outcomes)
        out["faults"].update(r.faults_injected)
        out["routing"].update(r.routing)
        out["crashes"] += len(r.crashes)
        out["checks"] += r.checks
        if not r.ok:
            out["failed"].append((seed, r.signature, r.failures[0][1]))
    return out


def run_seeds(start: int, count: int, mutant: str, jobs: int) -> dict:
    seeds = list(range(start, start + count))
    chunks = [seeds[i::jobs] for i in range(jobs)]
    total: dict = {"scenarios": 0, "outcomes": Counter(), "faults": Counter(),
                   "routing": Counter(), "crashes": 0, "checks": 0, "failed": []}
    if jobs == 1:
        parts = [_batch(seeds, mutant)]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_batch, chunks, [mutant] * jobs))
    for p in parts:
        for k in ("scenarios", "crashes", "checks"):
            total[k] += p[k]
        total["outcomes"].update(p["outcomes"])
        total["faults"].update(p["faults"])
        total["routing"].update(p["routing"])
        total["failed"] += p["failed"]
    total["failed"].sort()
    return total


def render(total: dict, start: int, count: int, mutant: str, seconds: float) -> Table:
    t = Table(title=f"hongbao sim: seeds {start}..{start + count - 1}"
              + (f", mutant {mutant}" if mutant != "none" else ""))
    t.add_column("measure")
    t.add_column("value")
    o, f, r = total["outcomes"], total["faults"], total["routing"]
    failed = len(total["failed"])
    for name, value in (
            ("scenarios", f"{total['scenarios']:,} in {seconds:.1f} s "
                          f"({total['scenarios'] / seconds * 60:,.0f} a minute)"),
            ("calls by outcome", ", ".join(f"{k} {o[k]:,}"
                                           for k in ("ok", "fail", "unknown", "skipped"))),
            ("bank faults injected", ", ".join(f"{k} {v:,}" for k, v in sorted(f.items()))),
            ("bank orders by channel", f"direct {r['via direct']:,}, clearing "
                                       f"{r['via clearing']:,}; calls moved {r['moved']:,}"),
            ("process crashes", f"{total['crashes']:,}"),
            ("invariant checks", f"{total['checks']:,}"),
            ("result", "PASS" if not failed else f"FAIL ({failed} scenarios)")):
        t.add_row(name, value)
    return t


def _report(console: Console, r: Result, title: str) -> None:
    console.print(f"[bold]{title}[/bold]: {'PASS' if r.ok else 'FAIL'} "
                  f"(seed {r.plan.seed}, {len(r.plan.ops)} calls, {len(r.plan.faults)} fault "
                  f"phases, crashes {list(r.plan.crashes)}, {r.checks} checks)")
    for line in r.trace:
        console.print("  " + line, markup=False, highlight=False, soft_wrap=True)


def _one(console: Console, plan: Plan, mutant: str, save: Path, budget: int) -> int:
    r = run_plan(plan, mutant, trace_logs=True)
    _report(console, r, f"plan of seed {plan.seed}")
    if r.ok:
        return 0
    return _shrink_and_save(console, r, mutant, save, budget)


def _shrink_and_save(console: Console, r: Result, mutant: str, save: Path, budget: int) -> int:
    small, runs = shrink(r.plan, r.signature, lambda p: run_plan(p, mutant), budget)
    save.mkdir(parents=True, exist_ok=True)
    path = save / f"seed-{r.plan.seed}{'-' + mutant if mutant != 'none' else ''}.json"
    path.write_text(small.to_json())
    console.print(f"shrunk in {runs} runs: {r.plan.size} -> {small.size} plan items; "
                  f"saved {path} (replay: hongbao sim --plan {path}"
                  f"{' --mutant ' + mutant if mutant != 'none' else ''})")
    _report(console, run_plan(small, mutant, trace_logs=True), "shrunk plan")
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hongbao sim", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, help="run this one scenario and print its trace")
    ap.add_argument("--plan", type=Path, help="replay a saved plan (JSON)")
    ap.add_argument("--seeds", type=int, default=1000, help="how many scenarios (default 1000)")
    ap.add_argument("--start", type=int, default=1, help="the first seed (default 1)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes (default: 2, or 1 on one core)")
    ap.add_argument("--mutant", choices=sorted(MUTANTS), default="none",
                    help="plant a known defect (the checks must catch it)")
    ap.add_argument("--save", type=Path, default=Path("sim-failures"),
                    help="where shrunk failing plans go (default ./sim-failures)")
    ap.add_argument("--shrink-budget", type=int, default=400, help="runs the shrinker may use")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.shrink_budget < 0:
        ap.error("--seeds and --jobs must be at least 1, --shrink-budget at least 0")
    console = Console()
    if args.plan is not None:
        try:
            plan = Plan.load(args.plan)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--plan {args.plan}: not a saved plan ({exc})")
        return _one(console, plan, args.mutant, args.save, args.shrink_budget)
    if args.seed is not None:
        return _one(console, generate(args.seed), args.mutant, args.save, args.shrink_budget)
    started = time.perf_counter()
    total = run_seeds(args.start, args.seeds, args.mutant, args.jobs)
    console.print(render(total, args.start, args.seeds, args.mutant,
                         time.perf_counter() - started))
    for seed, check, detail in total["failed"][:10]:
        console.print(f"  FAILED seed {seed}: {check}: {detail}", markup=False,
                      soft_wrap=True)
    if not total["failed"]:
        return 0
    seed = total["failed"][0][0]
    return _shrink_and_save(console, run_plan(generate(seed), args.mutant), args.mutant,
                            args.save, args.shrink_budget)
