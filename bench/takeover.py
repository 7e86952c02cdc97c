"""The payment butler's takeover run (``python bench/bench_butler.py --takeover``).

See bench_butler's docstring. A bank simulator (one bank, ``icbc``, direct and clearing
channels, no collapse) and a gateway process; TopUps of 100 fen started open loop, each
its own request id, user and card; the direct channel killed at ``kill_at_s``. Everything
runs on loopback with ports chosen by the OS, and both processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from banksim.v1 import bank_pb2
from gateway.client import Client
from gateway.errors import reason_of
from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.payments.bank import BankClient
from gateway.security import tickets
from hongbao.v1 import admin_pb2, wallet_pb2

BANK = "icbc"
AMOUNT_FEN = 100
USERS = 200  # a request a second per user at 200/s: far from the per-user rate limit
CARDS = 500
SETTLE_S = 30.0
OPEN = (wallet_pb2.PAYMENT_STATUS_PENDING, wallet_pb2.PAYMENT_STATUS_UNKNOWN)
OK = wallet_pb2.PAYMENT_STATUS_SUCCEEDED
GATEWAY_CONFIG = ("bank_timeout_s = 1.0\nresolve_delay_s = 0.5\nresolver_max_backoff_s = 2.0\n"
                  "user_rate_per_s = 1000\nuser_burst = 1000\n")


class Load:
    """The run's requests: when each started and ended, and what it came to."""

    def __init__(self, metas: list, t0: float) -> None:
        self.metas = metas
        self.t0 = t0
        self.calls: list[dict[str, Any]] = []

    def request(self, k: int) -> tuple[wallet_pb2.TopUpRequest, Any]:
        return (wallet_pb2.TopUpRequest(request_id=f"p{k}", card_id=f"{BANK}-{k % CARDS:06d}",
                                        amount_fen=AMOUNT_FEN), self.metas[k % len(self.metas)])

    async def one(self, c: Client, k: int) -> None:
        req, meta = self.request(k)
        start = time.monotonic() - self.t0
        try:
            r = await c.wallet.TopUp(req, metadata=meta, timeout=10)
            outcome = wallet_pb2.PaymentStatus.Name(r.status).removeprefix("PAYMENT_STATUS_")
        except grpc.aio.AioRpcError as err:
            outcome = reason_of(err) or err.code().name
        self.calls.append({"k": k, "start": start, "end": time.monotonic() - self.t0,
                           "outcome": outcome})

    async def offer(self, c: Client, rate_per_s: float, duration_s: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        started = 0
        while (elapsed := time.monotonic() - self.t0) < duration_s:
            while started < int(elapsed * rate_per_s) + 1:
                task = asyncio.ensure_future(self.one(c, started))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                started += 1
            await asyncio.sleep(0.002)
        if tasks:
            await asyncio.wait(tasks, timeout=15)


async def _kill(bank_target: str, at_s: float, t0: float, how: str, capacity_tps: float,
                marks: dict[str, float]) -> None:
    """At ``at_s``: the direct channel down (refusing at once) or silent (timing out)."""
    await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
    bank = BankClient(bank_target, timeout_s=5)
    try:
        faults = {"capacity_tps": capacity_tps}
        if how == "silent":
            faults["timeout_rate"] = 1.0
        await bank.set_faults(BANK, faults, channel="direct", down=how == "down")
        marks["killed"] = time.monotonic() - t0
    finally:
        await bank.close()


async def _watch(c: Client, admin_meta: Any, t0: float, until_s: float,
                 marks: dict[str, float]) -> None:
    """Polls GetQosStatus; marks when the direct breaker first left ``closed``."""
    while time.monotonic() - t0 < until_s and "direct_open" not in marks:
        q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin_meta,
                                       timeout=5)
        if any(h.bank_id == BANK and h.channel == "direct" and h.breaker_state != "closed"
               for h in q.banks):
            marks["direct_open"] = time.monotonic() - t0
        await asyncio.sleep(0.05)


async def _settle(c: Client, load: Load) -> Counter:
    """Every request asked again (same request id) until none is open; final outcomes."""
    deadline = time.monotonic() + SETTLE_S
    final: dict[int, str] = {}
    pending = sorted(call["k"] for call in load.calls)
    while pending and time.monotonic() < deadline:
        still = []
        for k in pending:
            req, meta = load.request(k)
            r = await c.wallet.TopUp(req, metadata=meta, timeout=10)
            final[k] = wallet_pb2.PaymentStatus.Name(r.status).removeprefix("PAYMENT_STATUS_")
            if r.status in OPEN:
                still.append(k)
        pending = still
        if pending:
            await asyncio.sleep(0.5)
    return Counter(final.values())


async def _bank_channels(target: str) -> dict[str, dict[str, int]]:
    bank = BankClient(target, timeout_s=5)
    try:
        stats = await bank.stats()
    finally:
        await bank.close()
    names = {bank_pb2.CHANNEL_DIRECT: "direct", bank_pb2.CHANNEL_CLEARING: "clearing"}
    return {names[ch.channel]: {"debited_fen": ch.debited_fen, "refunded_fen": ch.refunded_fen,
                                "debits_settled": ch.debits_settled,
                                "refused_while_down": ch.refused_while_down,
                                "requests": ch.requests}
            for b in stats.banks if b.bank_id == BANK for ch in b.channels}


async def _run(args: argparse.Namespace, gw_target: str, bank_target: str,
               data_dir: Path, capacity: float) -> dict[str, Any]:
    ring = tickets.KeyRing.load_or_create(data_dir)
    metas = [Client.bearer(tickets.mint(ring, f"u{i}", ["pay"], 3600)[0]) for i in range(USERS)]
    admin = Client.bearer(tickets.mint(ring, "bench", ["admin"], 3600)[0])
    marks: dict[str, float] = {}
    async with Client(gw_target) as c:
        t0 = time.monotonic()
        load = Load(metas, t0)
        await asyncio.gather(
            load.offer(c, args.rate, args.duration_s),
            _kill(bank_target, args.kill_at_s, t0, args.kill, capacity, marks),
            _watch(c, admin, t0, args.duration_s, marks))
        final = await _settle(c, load)
    return {"calls": load.calls, "marks": marks, "final": dict(final),
            "bank": await _bank_channels(bank_target)}


def _phases(calls: list[dict[str, Any]], killed_s: float, duration_s: float) -> dict[str, Any]:
    """Completed payments per second and latency, by the phase the payment started in."""
    bounds = {"before": (0.0, killed_s), "first second after": (killed_s, killed_s + 1.0),
              "after": (killed_s + 1.0, duration_s)}
    out = {}
    for name, (lo, hi) in bounds.items():
        inside = [c for c in calls if lo <= c["start"] < hi]
        done = sorted((c["end"] - c["start"]) * 1000 for c in inside if c["outcome"] == "SUCCEEDED")
        out[name] = {"started": len(inside), "completed": len(done),
                     "completed_per_s": len(done) / (hi - lo) if hi > lo else 0.0,
                     "p50_ms": _pct(done, 0.50), "p99_ms": _pct(done, 0.99)}
    return out


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _route_around_s(calls: list[dict[str, Any]], killed_s: float) -> float:
    """From the kill until the start of the first payment after which every later one
    completed at once (0: none after the kill failed to complete)."""
    bad = [c["start"] for c in calls if c["start"] >= killed_s and c["outcome"] != "SUCCEEDED"]
    return max(bad) - killed_s if bad else 0.0


def _per_second(calls: list[dict[str, Any]], duration_s: float) -> list[Counter]:
    seconds = [Counter() for _ in range(math.ceil(duration_s) + 1)]
    for c in calls:
        seconds[min(int(c["start"]), len(seconds) - 1)]["started"] += 1
        seconds[min(int(c["end"]), len(seconds) - 1)][c["outcome"]] += 1
    return seconds


def _reconcile(data_dir: Path, bank_target: str) -> tuple[bool, str]:
    rec = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
                          str(data_dir), "--bank", bank_target],
                         capture_output=True, text=True, timeout=120)
    return rec.returncode == 0 and "BALANCED" in rec.stdout, rec.stdout.strip()


def _measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Each channel takes ``capacity`` calls/s, twice the offered rate (at least 500): the
    run is about a channel dying, not about load."""
    capacity = max(500.0, 2 * args.rate)
    bank = banksim_proc(root / "bank", "--banks", BANK, "--capacity-tps", f"{capacity:g}",
                        "--collapse-after-s", "0", "--latency-ms", f"{args.latency_ms:g}",
                        "--log-level", "warning", log_path=root / "banksim.log")
    config = root / "gateway.toml"
    config.write_text(GATEWAY_CONFIG + f"bank_capacity_tps = {{ {BANK} = {capacity:g} }}\n")
    gw = None
    try:
        bank.start()
        gw = gateway_proc(root / "gw", "--config", str(config), bank=bank.target,
                          log_path=root / "gateway.log")
        gw.start()
        result = asyncio.run(_run(args, gw.target, bank.target, root / "gw", capacity))
        gw.stop()  # a stopped ledger: reconcile reads its snapshot, nothing moves under it
        result["reconcile"] = _reconcile(root / "gw", bank.target)
        return result
    finally:
        if gw is not None:
            gw.stop()
        bank.stop()


def takeover(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench_takeover."))
    t0 = time.monotonic()
    try:
        r = _measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    killed = r["marks"].get("killed", args.kill_at_s)
    phases = _phases(r["calls"], killed, args.duration_s)
    kept = r["final"].get("SUCCEEDED", 0) * AMOUNT_FEN
    bank = r["bank"]
    taken = sum(ch["debited_fen"] - ch["refunded_fen"] for ch in bank.values())
    figures = {
        "rate_per_s": args.rate, "kill": args.kill, "killed_at_s": round(killed, 3),
        "direct_open_at_s": r["marks"].get("direct_open"),
        "route_around_s": round(_route_around_s(r["calls"], killed), 3),
        "phases": phases, "final": r["final"], "bank": bank,
        "lost_fen": max(0, kept - taken), "doubled_fen": max(0, taken - kept),
        "balanced": r["reconcile"][0], "seconds": time.monotonic() - t0,
    }
    _print(figures, _per_second(r["calls"], args.duration_s), r["reconcile"][1])
    return figures


def _print(f: dict[str, Any], seconds: list[Counter], reconcile: str) -> None:
    print(f"takeover: TopUps of {AMOUNT_FEN} fen at {f['rate_per_s']:g}/s, bank {BANK}'s "
          f"direct channel killed ({f['kill']}) at {f['killed_at_s']:.2f} s")
    print(f"{'s':>3} {'started':>8}  ended by outcome")
    for k, row in enumerate(seconds):
        ended = {o: n for o, n in sorted(row.items()) if o != "started"}
        print(f"{k:>3} {row.get('started', 0):>8}  {ended}")
    for name, p in f["phases"].items():
        print(f"  {name:<19} {p['completed_per_s']:>7.1f} completed/s   "
              f"({p['completed']}/{p['started']} started)   p50 {p['p50_ms']:.1f} ms   "
              f"p99 {p['p99_ms']:.1f} ms")
    opened = f["direct_open_at_s"]
    print(f"  direct breaker open at {'-' if opened is None else f'{opened:.2f} s'}; "
          f"route-around {f['route_around_s']:.2f} s after the kill")
    print(f"  final answers {f['final']}; bank per channel {f['bank']}")
    print(f"  lost {f['lost_fen']} fen, doubled {f['doubled_fen']} fen; reconcile "
          f"{'BALANCED' if f['balanced'] else 'NOT BALANCED'}")
    print("  " + "\n  ".join(line for line in reconcile.splitlines() if "bank" in line
                              or "via" in line))
