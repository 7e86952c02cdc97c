"""``hongbao demo``: the Spring-Festival story, end to end, on loopback.

Starts the bank simulator and the gateway (or, with ``--cluster``, a local cluster: three
NATS JetStream nodes and three SETs) as real processes on embedded LMDB in a folder of
its own, and tells the story phase by phase (``gateway.ops.demo_story``): top-ups, the
evening's envelopes and grab races, the midnight peak with admission control at work
(``gateway.ops.demo_peak``; in cluster mode a SET is killed and restarted during it),
card payments while a bank fails, the expiry of what was never grabbed, and the
reconcile against the bank. Each phase has a live progress bar and a one-line result.

Then it writes the report to ``--out`` (default: a new temporary folder, printed):
``report.html`` (self-contained) with the PNGs beside it (``gateway.ops.report``), and
``record.json``, everything the report was drawn from, including the reconcile's own
figures (the ledger's ``flows_fen``) next to what the demo counted. Every process it
started is stopped by its pid, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from gateway.client import Client
from gateway.ops import demo_peak, demo_story, loadgen
from gateway.ops.clusterproc import LocalCluster
from gateway.ops.procs import Proc, banksim_proc, gateway_proc
from gateway.security import tickets

# Short bank deadline and resolve delay, so unclear payments settle while you watch.
GATEWAY_CONFIG = ("bank_timeout_s = 1.0\nresolve_delay_s = 1.0\nresolver_max_backoff_s = 2.0\n"
                  "expiry_sweep_s = 0.5\n")
KILLED_SET = "s3"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hongbao demo", description="The Spring-Festival story, end to end, on loopback: "
        "live phases, a summary, and a report with plots (report.html) in --out.")
    p.add_argument("--users", type=int, default=300, help="users (default 300)")
    p.add_argument("--envelopes", type=int, default=60, help="group envelopes (default 60)")
    p.add_argument("--peak-seconds", type=int, default=15,
                   help="seconds of the midnight peak's ramp (default 15)")
    p.add_argument("--out", type=Path, help="where the report goes (default: a new "
                   "temporary folder, printed at the end)")
    p.add_argument("--no-plots", action="store_true", help="the report without plots")
    p.add_argument("--cluster", action="store_true",
                   help="three SETs on a 3-node NATS JetStream cluster, one killed mid-peak")
    p.add_argument("--generators", type=int, default=1,
                   help="load-generator processes for the peak (default 1: on two cores, "
                   "a second one takes CPU from the gateway it measures)")
    p.add_argument("--seed", type=int, help="the story's random seed (default: random)")
    args = p.parse_args(argv)
    if not 20 <= args.users <= 100_000:
        p.error("--users must be in 20..100000")
    if not 5 <= args.envelopes <= args.users:
        p.error("--envelopes must be in 5..--users")
    if not 3 <= args.peak_seconds <= 120:
        p.error("--peak-seconds must be in 3..120")
    if not 1 <= args.generators <= 8:
        p.error("--generators must be in 1..8")
    return args


class Stack:
    """The processes of one run: the bank simulator and one gateway, or a local cluster."""

    def __init__(self, root: Path, cluster: bool) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        config = root / "gateway.toml"
        config.write_text(GATEWAY_CONFIG)
        self.cluster = LocalCluster(root / "cluster", 3, set_args=("--config", str(config))) \
            if cluster else None
        self.bank: Proc = self.cluster.bank if self.cluster is not None else banksim_proc(
            root / "bank", log_path=root / "banksim.log")  # type: ignore[assignment]
        self.gateway: Proc | None = None
        self.load_cpus: set[int] | None = None
        self._config = config

    def start(self) -> None:
        """Starts every process. One gateway gets the first CPU to itself (``taskset``)
        when there are two or more: this process, the bank simulator and the peak's load
        generators run on the others, so the peak measures the gateway, not their
        contention (``loadgen.split_cpus``)."""
        if self.cluster is not None:
            self.cluster.start()
            return
        server, self.load_cpus = loadgen.split_cpus()
        if self.load_cpus is not None:
            os.sched_setaffinity(0, self.load_cpus)  # children started from now inherit it
        self.bank.start()
        self.gateway = gateway_proc(self.root / "gateway", "--config", str(self._config),
                                    bank=self.bank.target, log_path=self.root / "gateway.log")
        if server is not None and shutil.which("taskset"):
            self.gateway.cmd = ["taskset", "-c", ",".join(map(str, server)), *self.gateway.cmd]
        self.gateway.start()

    @property
    def targets(self) -> list[str]:
        """Where clients call: the gateway, or the SETs that stay up (any SET serves any call)."""
        if self.cluster is not None:
            return [a for n, a in self.cluster.addresses.items() if n != KILLED_SET]
        assert self.gateway is not None
        return [self.gateway.target]

    def ticket(self, user: str, scopes: tuple[str, ...]) -> str:
        if self.cluster is not None:
            return self.cluster.ticket(user, scopes)
        ring = tickets.KeyRing.load_or_create(self.root / "gateway")
        return tickets.mint(ring, user, list(scopes), 3600)[0]

    def describe(self) -> str:
        if self.cluster is not None:
            sets = ", ".join(f"{n} on {s.address} (pid {s.proc.pid if s.proc else '?'})"
                             for n, s in self.cluster.sets.items())
            return (f"bank simulator pid {self.bank.pid}; NATS "
                    f"{', '.join(self.cluster.nats.urls)}; SETs {sets}")
        assert self.gateway is not None
        return (f"bank simulator pid {self.bank.pid} on {self.bank.target}; "
                f"gateway pid {self.gateway.pid} on {self.gateway.target}")

    def during_peak(self, peak_seconds: int) -> Callable[[float], Awaitable[dict]] | None:
        """In cluster mode: SET s3 killed a third of the way into the peak, back at two
        thirds; the marks are seconds from the peak's start."""
        if self.cluster is None:
            return None
        victim = self.cluster.sets[KILLED_SET]

        async def kill_and_restart(t0: float) -> dict[str, float]:
            await asyncio.sleep(max(0.0, t0 + peak_seconds / 3 - time.monotonic()))
            victim.kill()
            killed = time.monotonic() - t0
            await asyncio.sleep(max(0.0, t0 + 2 * peak_seconds / 3 - time.monotonic()))
            await asyncio.to_thread(victim.start)
            return {"killed": killed, "back": time.monotonic() - t0}
        return kill_and_restart

    def reconcile(self, json_out: bool) -> subprocess.CompletedProcess:
        if self.cluster is not None:
            set_file = self.cluster.sets["s1"].cluster_file
            cmd = ["reconcile", "--cluster", str(set_file), "--key-file",
                   str(self.cluster.key_file), "--bank", self.bank.target]
        else:
            cmd = ["reconcile", "--data-dir", str(self.root / "gateway"), "--bank",
                   self.bank.target]
        return subprocess.run([sys.executable, "-m", "gateway.ops.cli", *cmd,
                               *(["--json"] if json_out else [])],
                              capture_output=True, text=True, timeout=180)

    def ledger(self) -> tuple[dict[str, int], dict[str, int]]:
        """The ledger's own figures, summed over every SET: the flows (reconcile totals
        ``flows_fen``) and what is left in wallets, envelopes and pending credits."""
        dirs = ([s.data_dir for s in self.cluster.sets.values()] if self.cluster is not None
                else [self.root / "gateway"])
        flows: dict[str, int] = defaultdict(int)
        left = {"wallet_fen": 0, "escrow_fen": 0, "pending_fen": 0}
        for d in dirs:
            out = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile",
                                  "--data-dir", str(d), "--json"],
                                 capture_output=True, text=True, timeout=180)
            totals = json.loads(out.stdout)["totals"]
            for k, v in totals.get("flows_fen", {}).items():
                flows[k] += v
            for k in left:
                left[k] += totals.get(k, 0)
        return dict(flows), left

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            return
        if self.gateway is not None:
            self.gateway.stop()
        self.bank.stop()

    def kill(self) -> None:
        procs = ([g.proc for g in self.cluster.all_groups()] if self.cluster is not None
                 else [self.gateway]) + [self.bank]
        for p in procs:
            if p is not None:
                p.kill()


async def _story(stack: Stack, args: argparse.Namespace, console: Console,
                 rng: random.Random) -> dict[str, Any]:
    users = [f"user{i:04d}" for i in range(args.users)]
    raw = {u: stack.ticket(u, ("pay", "grab", "read")) for u in users}
    admin = Client.bearer(stack.ticket("operator", ("admin",)))
    async with Client(stack.targets[0]) as c:
        s = demo_story.Story(c, stack.bank.target, users, raw, admin, rng, console,
                             args.envelopes)
        await demo_story.top_ups(s)
        await demo_story.evening(s)
        await demo_peak.peak(s, stack.targets, args.peak_seconds, args.generators,
                             stack.during_peak(args.peak_seconds), stack.load_cpus)
        await demo_story.card_phase(s)
        await demo_story.expiry(s)
        await demo_story.splits(s)
        s.record["timeline"] = _timeline(s.record)
        return s.record


def _timeline(record: dict[str, Any]) -> dict[str, list]:
    """Grabs per second and their latency p50/p99, over the whole run: the evening's
    grabs one by one, the peak's per second (its P0 calls' latencies)."""
    count: dict[int, int] = defaultdict(int)
    lat: dict[int, list[float]] = defaultdict(list)
    for t, ms in record["grabs"]:
        count[int(t)] += 1
        lat[int(t)].append(ms)
    peak = record.get("peak", {})
    for t, n, ms in zip(peak.get("t_s", []), peak.get("grab_ok", []),
                        peak.get("p0_lat_ms", []), strict=False):
        count[int(t)] += n
        lat[int(t)].extend(ms)
    seconds = range(min(count, default=0), max(count, default=-1) + 1)
    ordered = {t: sorted(lat[t]) for t in seconds}
    def q(t: int, p: float) -> float | None:  # a second without grabs has no latency
        return loadgen.percentile(ordered[t], p) if ordered[t] else None

    return {"t_s": [t + 0.5 for t in seconds], "grabs_per_s": [count[t] for t in seconds],
            "p50_ms": [q(t, 0.50) for t in seconds], "p99_ms": [q(t, 0.99) for t in seconds]}


def _ledger_figures(stack: Stack, record: dict[str, Any], console: Console) -> bool:
    """The reconcile against the bank (printed), and the ledger's flows for the report."""
    started = time.monotonic()
    shown = stack.reconcile(json_out=False)
    balanced = shown.returncode == 0 and "BALANCED" in shown.stdout
    flows, totals = stack.ledger()
    pick = lambda prefix, to="": sum(v for k, v in flows.items()  # noqa: E731
                                     if k.startswith(prefix) and k.endswith(to))
    record["ledger"] = {"flows_fen": flows, **totals}
    record["flows"] = {
        "top_ups_fen": pick("top_up:clearing->wallet"),
        "card_sends_fen": pick("envelope_sent:clearing->"),
        "balance_sends_fen": pick("envelope_sent:wallet->"),
        "grabs_credited_fen": pick("envelope_credit:", "->wallet"),
        "expiry_refunds_fen": pick("expiry_refund:"),
        "withdrawals_fen": pick("withdraw:hold->clearing"),
        "unlocks_fen": pick("photo_unlock:"),
        "wallets_fen": totals["wallet_fen"], "escrow_fen": totals["escrow_fen"],
        "pending_fen": totals["pending_fen"]}
    record["reconcile"] = {"balanced": balanced, "text": shown.stdout.strip()}
    record["phases"].append({"name": "reconcile", "start_s": record["phases"][-1]["end_s"],
                             "end_s": record["phases"][-1]["end_s"]
                             + time.monotonic() - started,
                             "result": "BALANCED" if balanced else "NOT BALANCED"})
    console.print(f"  [bold]{'reconcile':<22}[/bold] "
                  + ("[green]BALANCED[/green]: every fen is accounted for, the bank agrees"
                     if balanced else "[red]NOT BALANCED[/red]"))
    for line in shown.stdout.splitlines():
        console.print("    " + line, highlight=False, markup=False)
    if not balanced:
        console.print(shown.stderr, markup=False)
    return balanced


def _summary(record: dict[str, Any], console: Console) -> None:
    f = record["flows"]
    y = demo_story.yuan
    console.print("\n[bold]Where every yuan went[/bold] (from the ledger)")
    for label, key in (("cards -> wallets (top-ups)", "top_ups_fen"),
                       ("cards -> envelopes", "card_sends_fen"),
                       ("wallets -> envelopes", "balance_sends_fen"),
                       ("envelopes -> wallets (grabs)", "grabs_credited_fen"),
                       ("envelopes -> senders (expiry)", "expiry_refunds_fen"),
                       ("wallets -> cards (withdrawals)", "withdrawals_fen"),
                       ("wallets -> wallets (unlocks)", "unlocks_fen"),
                       ("left in wallets", "wallets_fen"), ("left in envelopes", "escrow_fen"),
                       ("credits on their way", "pending_fen")):
        console.print(f"  {label:<32} {y(f[key]):>18}")
    console.print("\n[bold]Best luck[/bold] (手气最佳), a few envelopes")
    for e in record.get("envelopes", [])[:5]:
        best = max(e["shares_fen"], default=0)
        console.print(f"  {e['id']}  {len(e['shares_fen']):>2} shares of "
                      f"{y(e['total_fen']):>14}: {e['best_luck_user']} got {y(best)}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console(highlight=False, soft_wrap=True)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    out = args.out or Path(tempfile.mkdtemp(prefix="hongbao-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    stack = Stack(out / "data", args.cluster)
    title = "Spring Festival eve on loopback" + (" (cluster: 3 SETs)" if args.cluster else "")
    console.print(f"[bold]{title}[/bold]: {args.users} users, {args.envelopes} envelopes, "
                  f"seed {seed}; report and data in {out}")
    try:
        stack.start()
        console.print(f"  {stack.describe()}\n")
        record = asyncio.run(_story(stack, args, console, random.Random(seed)))
        balanced = _ledger_figures(stack, record, console)
    except BaseException:
        _tails(out / "data", console)
        stack.kill()
        raise
    finally:
        stack.stop()
    console.print("\nstopped every process the demo started")
    record.update(title=title, mode="cluster" if args.cluster else "embedded", seed=seed,
                  users=args.users, counted=dict(record["counted"]))
    _summary(record, console)
    (out / "record.json").write_text(json.dumps(record, indent=1, default=str))
    from gateway.ops.report import write_report  # matplotlib: loaded only to draw
    html = write_report(record, out, plots=not args.no_plots)
    console.print(f"\nreport: {html}")
    return 0 if balanced else 1


def _tails(root: Path, console: Console) -> None:
    """The last lines of every process log of the run, to see why it failed."""
    for log in sorted(root.rglob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        console.print(f"--- last lines of {log.relative_to(root)}", markup=False)
        console.print("\n".join(lines), markup=False)
