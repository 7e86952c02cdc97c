"""Overload: one gateway worker offered up to 3x its capacity, admission control on and off.

A real bank simulator and ONE gateway worker (pinned to CPU 0 with ``taskset`` when
this process may use two CPUs or more); the load generators (``gateway.ops.loadgen``) are
separate processes (multiprocessing, spawned), each with its own asyncio loop and
``gateway.client.Client``, pinned to the other CPU(s) with this process and the bank
simulator.

1. Capacity: on a gateway with admission off, a closed loop of P0 calls (envelope sends
   and grabs of those envelopes, by users topped up beforehand; 1 s deadline) with
   enough calls in flight to saturate the worker. C = successful P0 calls/s over a few
   seconds after a warm-up.
2. The ramp, open loop (calls started on schedule whatever became of earlier ones):
   total offered rate 0.5C -> 3C in steps, held at 3C, then back to 0.5C, in a fixed
   mix of calls (``loadgen.MIX``) by hundreds of users, every call with a 1 s deadline. Run
   twice, each on a fresh data dir: admission ON (server defaults, clients
   ``throttle=True``: they drop locally what the last level sheds, and throttle
   adaptively) and OFF (``qos_enabled = false``, clients ``throttle=False``). A task
   polls ``AdminService/GetQosStatus`` every 200 ms for the level.
3. ``hongbao reconcile`` must report BALANCED after every stage; the benchmark fails
   loudly otherwise.

Each generator tallies per second (by the second a call was offered) and per tier:
offered, ok, degraded (GetBalance/ListTransactions answered ``stale``), shed by the
server (RESOURCE_EXHAUSTED ``SHED``), dropped locally (``SHED_LOCALLY``,
``THROTTLED_LOCALLY``), failed otherwise (deadline, cancelled, other), and the latency
of every successful P0 call.

Goals (ON run; figures are ratios to the C measured in the same invocation): P0
goodput at 3x >= 0.90 (of C, capped at what P0 offers at 3x: see ``_figures``), P0 p99
of admitted calls at 3x <= 100 ms, tiers start being shed in the order P3, P2, P1, P0
last, full admission (level 511) <= 5 s after the offered load is back at <= C (for
this mix 1.0C is below the worker's capacity: the way up serves it whole). The OFF run
shows what admission prevents. Writes a PNG report and the raw per-second figures as
JSON beside it. One generator per load CPU by default: two Python gRPC clients sharing
a CPU spend about 60 % more CPU per call than one. Run it as a script:

    python bench/bench_overload.py [--out bench/overload.png] [--step-s 5] [--users 400]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from gateway.client import Client
from gateway.ops import loadgen
from gateway.ops.loadgen import DEADLINE_S, KINDS, MIX, OUTCOMES, TIERS, merge, spawn
from gateway.ops.procs import Proc, banksim_proc, gateway_proc
from gateway.qos.controller import MAX_LEVEL, USER_LEVELS
from gateway.security import tickets
from hongbao.v1 import admin_pb2, wallet_pb2

HERE = Path(__file__).resolve().parent
# The ramp: total offered rate as multiples of C, one entry per step.
RAMP = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.5)
TOP_UP_FEN = 100_000  # per user; sends cost 50 fen, unlocks 100 fen
POLL_S = 0.2
GOALS = {"p0_goodput": 0.90, "p0_p99_ms": 100.0, "recovery_s": 5.0}



# -- the stack: bank simulator, one gateway worker ------------------------------------------


class _Stack:
    """A bank simulator and one gateway worker with ``qos_enabled`` as given, fresh dirs."""

    def __init__(self, root: Path, qos_enabled: bool, server_cpus: set[int] | None) -> None:
        self.root = root
        root.mkdir(parents=True)
        config = root / "gateway.toml"
        config.write_text(f"qos_enabled = {'true' if qos_enabled else 'false'}\n")
        self.bank: Proc = banksim_proc(root / "bank", "--log-level", "warning",
                                       log_path=root / "banksim.log")
        self.gateway: Proc | None = None
        self._gateway_args = ("--config", str(config))
        self._server_cpus = server_cpus

    def start(self) -> None:
        self.bank.start()
        self.gateway = gateway_proc(self.root / "gw", *self._gateway_args,
                                    bank=self.bank.target, log_path=self.root / "gateway.log")
        if self._server_cpus is not None:
            cpus = ",".join(str(c) for c in sorted(self._server_cpus))
            if shutil.which("taskset"):  # every thread of the worker inherits the mask
                self.gateway.cmd = ["taskset", "-c", cpus, *self.gateway.cmd]
        self.gateway.start()
        if self._server_cpus is not None and not shutil.which("taskset"):
            for tid in os.listdir(f"/proc/{self.gateway.pid}/task"):
                os.sched_setaffinity(int(tid), self._server_cpus)

    @property
    def target(self) -> str:
        assert self.gateway is not None
        return self.gateway.target

    def tickets(self, users: list[str], scopes: list[str]) -> list[str]:
        ring = tickets.KeyRing.load_or_create(self.root / "gw")
        return [tickets.mint(ring, u, scopes, 3600)[0] for u in users]

    def reconcile(self) -> str:
        """``hongbao reconcile`` against the live books and the bank; raises unless BALANCED."""
        rec = subprocess.run(
            [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
             str(self.root / "gw"), "--bank", self.bank.target],
            capture_output=True, text=True, timeout=120)
        if rec.returncode != 0 or "NOT BALANCED" in rec.stdout or "BALANCED" not in rec.stdout:
            raise SystemExit(f"RECONCILE FAILED in {self.root.name}:\n{rec.stdout}{rec.stderr}")
        return next(line.strip() for line in rec.stdout.splitlines()
                    if line.startswith("BALANCED"))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.bank.stop()


async def _top_up(target: str, ticket_list: list[str]) -> None:
    """Every user's wallet gets TOP_UP_FEN from a card, 16 at a time, retried when the
    butler refuses (BANK_BUSY: nothing reached the bank, a new request_id tries again)."""
    sem = asyncio.Semaphore(16)
    banks = ("icbc", "ccb", "abc", "boc")

    async def one(i: int, ticket: str) -> None:
        async with sem:
            for attempt in range(10):
                try:
                    await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                        request_id=f"top{attempt}", card_id=f"{banks[i % 4]}-{i:06d}",
                        amount_fen=TOP_UP_FEN), metadata=Client.bearer(ticket), timeout=10)
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:
                        raise
                    await asyncio.sleep(0.2)

    async with Client(target) as c:
        await asyncio.gather(*(one(i, t) for i, t in enumerate(ticket_list)))


# -- one stage: generators and the admission poller -------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _settle(target: str, admin: str, timeout_s: float = 20.0, calm_s: float = 2.5
                  ) -> None:
    """Waits for full admission held ``calm_s`` (two admission windows and more) before the
    ramp: the generators' warm-up sends are a burst that saturates the worker, and the
    window it ends in still closes tight after the burst is over."""
    meta = Client.bearer(admin)
    deadline = time.monotonic() + timeout_s
    calm_since = None
    async with Client(target) as c:
        while time.monotonic() < deadline:
            q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=meta,
                                           timeout=DEADLINE_S)
            now = time.monotonic()
            if q.admission.level != MAX_LEVEL:
                calm_since = None
            elif calm_since is None:
                calm_since = now
            elif now - calm_since >= calm_s:
                return
            await asyncio.sleep(POLL_S)


async def _poll(target: str, admin: str, pid: int, t0_box: list[float],
                stop: asyncio.Event, rows: list[dict]) -> None:
    """GetQosStatus every POLL_S: the level and signals, and the worker's CPU share."""
    meta = Client.bearer(admin)
    async with Client(target) as c:
        last_t, last_cpu = time.monotonic(), _proc_cpu_s(pid)
        while not stop.is_set():
            due = time.monotonic() + POLL_S
            try:
                q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=meta,
                                               timeout=DEADLINE_S)
                row: dict[str, Any] = {
                    "level": q.admission.level, "enabled": q.admission.enabled,
                    "queuing_delay_ms": round(q.admission.queuing_delay_ms, 3),
                    "loop_busy": round(q.admission.loop_busy, 3),
                    "loop_lag_ms": round(q.admission.loop_lag_ms, 3),
                    "rejected": {t.tier: t.rejected for t in q.tiers}}
            except grpc.aio.AioRpcError as err:
                row = {"level": None, "error": err.code().name}
            now, cpu = time.monotonic(), _proc_cpu_s(pid)
            row["t"] = round(now - t0_box[0], 3) if t0_box else None
            row["server_cpu"] = round((cpu - last_cpu) / max(1e-6, now - last_t), 3)
            last_t, last_cpu = now, cpu
            rows.append(row)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))


async def _drive(stack: _Stack, specs: list[dict], admin: str) -> tuple[list[dict], list[dict]]:
    """Spawns the generators, starts them together, polls the level while they run."""
    rows: list[dict] = []
    stop, t0_box = asyncio.Event(), []
    assert stack.gateway is not None
    gens = await asyncio.to_thread(spawn, specs)
    try:
        await _settle(stack.target, admin)
        poller = asyncio.ensure_future(_poll(stack.target, admin, stack.gateway.pid, t0_box,
                                             stop, rows))
        t0_box.append(gens.start(0.5))
        results = await asyncio.to_thread(gens.results)
        stop.set()
        await poller
    finally:
        stop.set()
        gens.close()
    return results, rows


def _specs(stack: _Stack, users: list[str], user_tickets: list[str], generators: int,
           throttle: bool, load_cpus: set[int] | None, rates: list[float] | None = None,
           seconds: int = 0, in_flight: int = 0) -> list[dict]:
    return [{"target": stack.target, "users": users, "tickets": user_tickets, "gid": g,
             "seed": 1000 + g, "throttle": throttle, "seconds": seconds, "in_flight": in_flight,
             "rates": [r / generators for r in rates] if rates else [], "cpus": load_cpus}
            for g in range(generators)]


def _stage(root: Path, qos_enabled: bool, throttle: bool, args: argparse.Namespace,
           cpus: tuple, rates: list[float] | None = None) -> dict:
    """One fresh stack: top-ups, the generators (ramp when ``rates``, else the closed-loop
    capacity measurement), reconcile. Every process it started is stopped."""
    stack = _Stack(root, qos_enabled, cpus[0])
    users = [f"u{i:04d}" for i in range(args.users)]
    try:
        stack.start()
        user_tickets = stack.tickets(users, ["pay", "grab", "read"])
        admin = stack.tickets(["ops"], ["admin"])[0]
        asyncio.run(_top_up(stack.target, user_tickets))
        if rates:
            specs = _specs(stack, users, user_tickets, args.generators, throttle, cpus[1], rates)
        else:
            specs = _specs(stack, users, user_tickets, args.generators, False, cpus[1],
                           seconds=args.warmup_s + args.capacity_s,
                           in_flight=args.in_flight // args.generators)
        results, polls = asyncio.run(_drive(stack, specs, admin))
        reconciled = stack.reconcile()
    finally:
        stack.stop()
    return {"results": results, "polls": polls, "reconcile": reconciled,
            "qos_enabled": qos_enabled, "throttle": throttle}


# -- figures -------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _seconds(stage: dict, rates: list[float], capacity: float) -> list[dict]:
    """The generators' tallies merged, one row per second, with the polled level."""
    results, rows = stage["results"], []
    merged = merge(results)
    for s in range(merged["seconds"]):
        tiers, lat = merged["tiers"][s], merged["p0_lat_ms"][s]
        polls = [p for p in stage["polls"] if p["t"] is not None and s <= p["t"] < s + 1]
        levels = [p["level"] for p in polls if p.get("level") is not None]
        rows.append({
            "t": s, "rate_x": rates[s] / capacity if rates else None,
            "offered_per_s": rates[s] if rates else None, "tiers": tiers,
            "p0_p50_ms": _pct(lat, 0.50), "p0_p99_ms": _pct(lat, 0.99), "p0_ok_latencies": len(lat),
            "level_min": min(levels, default=None), "level_last": levels[-1] if levels else None,
            "server_cpu": max((p["server_cpu"] for p in polls), default=None),
            "generator_lag_ms": round(max(r["lag_ms"][s] for r in results), 1),
            "generators_cpu": round(sum(r["cpu_s"][s] - r["cpu_s"][s - 1] for r in results), 3)
            if s and all(r["cpu_s"][s - 1] for r in results) else None,
            "unsent": sum(r["unsent"][s] for r in results)})
    return rows


def _refused(tier: dict) -> int:
    return tier["shed"] + tier["shed_locally"] + tier["throttled"] + tier["degraded"]


def _failed(tier: dict) -> int:
    return tier["deadline"] + tier["cancelled"] + tier["other"]


def _first(rows: list[dict], tier: str, count) -> int | None:
    """The first second where ``count(tier row)`` reached >= 1 % of the tier's offered
    calls (and at least 3 calls)."""
    for row in rows:
        t = row["tiers"][tier]
        n = count(t)
        if n >= 3 and n >= 0.01 * t["offered"]:
            return row["t"]
    return None


def _recovery(stage: dict, rows: list[dict], step_s: int) -> dict:
    """From the start of the first step after the peak offering at most C (mixed calls are
    cheaper than P0 ones, so 1.0C is below the worker's capacity: it served every call
    there on the way up), the time until the polled level is back at MAX_LEVEL (full
    admission), and until the clients refuse nothing more (no second with >= 1 %)."""
    peak_end = max(i for i, x in enumerate(RAMP) if x == max(RAMP))
    below = next(i for i in range(peak_end, len(RAMP)) if RAMP[i] <= 1.0)
    t_below = below * step_s
    polls = [p for p in stage["polls"] if p["t"] is not None and p.get("level") is not None]
    back, back_at = None, None  # None: never shed, nothing to recover from
    low = [p["t"] for p in polls if p["level"] < MAX_LEVEL]
    if low:
        back_at = next((p["t"] for p in polls if p["t"] > low[-1]), math.inf)
        back = round(max(0.0, back_at - t_below), 2)
    calm = [r["t"] for r in rows if r["t"] >= t_below and all(
        _refused(x) < max(3, 0.01 * x["offered"]) for x in r["tiers"].values())]
    busy = [r["t"] for r in rows if r["t"] >= t_below and r["t"] not in set(calm)]
    if busy and busy[-1] == rows[-1]["t"]:
        clients = None  # still refusing when the run ended
    else:
        clients = max(0, (busy[-1] + 1 if busy else t_below) - t_below)
    return {"t_below_s": t_below, "full_admission_after_s": back,
            "level_511_for_good_at_s": back_at, "level_never_dropped": back is None,
            "clients_calm_after_s": clients}


def _order_ok(first: dict) -> bool:
    """P3, then P2, then P1, then P0, each strictly later than the one before; a tier that
    never started may only be followed by tiers that never started either."""
    seq = [first[t] for t in reversed(TIERS)]
    if seq[0] is None:
        return False  # nothing was ever refused: the goal is not shown
    return all(b is None or (a is not None and a < b) for a, b in itertools.pairwise(seq))


def _hold(rows: list[dict], step_s: int) -> list[dict]:
    peak = max(RAMP)
    return [r for r in rows if RAMP[min(r["t"] // step_s, len(RAMP) - 1)] == peak]


def _level_crossed(stage: dict) -> dict:
    """For each tier, the first poll at which the level refused part of it."""
    out: dict[str, float | None] = {}
    for k, tier in enumerate(TIERS):
        top = k * USER_LEVELS + USER_LEVELS - 1
        out[tier] = next((round(p["t"], 1) for p in stage["polls"] if p["t"] is not None
                          and p.get("level") is not None and p["level"] < top), None)
    return out


def _peak_kinds(stage: dict, hold: list[dict]) -> dict:
    kinds = {}
    for k, kind in enumerate(KINDS):
        n = [sum(res["by_kind"][h["t"]][k][i] for res in stage["results"] for h in hold)
             for i in range(1 + len(OUTCOMES))]
        kinds[kind] = {"offered": n[0], **dict(zip(OUTCOMES, n[1:], strict=True))}
    return kinds


def _figures(stage: dict, rows: list[dict], capacity: float, step_s: int,
             load_cpus: int) -> dict:
    """The goals' figures. P0 offers loadgen.P0_SHARE * 3C at the peak (0.90 C with this
    mix), so ">= 0.90 of C" would need every P0 call served: goodput is compared with
    min(C, P0 offered), which is the same test whenever P0 alone could fill the worker."""
    hold = _hold(rows, step_s)
    p0 = [r["tiers"]["P0"] for r in hold]
    ok = sum(t["ok"] for t in p0) / len(hold)
    offered = sum(t["offered"] for t in p0) / len(hold)
    lat = [x for r in stage["results"] for s in (h["t"] for h in hold) for x in r["lat_ms"][s]]
    first_shed = {t: _first(rows, t, _refused) for t in TIERS}
    gen_cpu = [r["generators_cpu"] for r in hold if r["generators_cpu"] is not None]
    return {
        "p0_goodput_per_s": round(ok, 1), "p0_offered_per_s": round(offered, 1),
        "p0_goodput_of_c": round(ok / capacity, 3),
        "p0_goodput_of_offered": round(ok / offered, 3) if offered else None,
        "p0_goodput_goal_share": round(ok / min(capacity, offered), 3) if offered else None,
        "p0_p99_ms": _pct(lat, 0.99), "p0_p50_ms": _pct(lat, 0.50),
        "first_refused_s": first_shed, "shed_order_ok": _order_ok(first_shed),
        "first_refused_by_level_s": {t: _first(rows, t, lambda x: x["shed"] + x["shed_locally"]
                                               + x["degraded"]) for t in TIERS},
        "first_throttled_s": {t: _first(rows, t, lambda x: x["throttled"]) for t in TIERS},
        "first_failed_s": {t: _first(rows, t, _failed) for t in TIERS},
        "level_crossed_s": _level_crossed(stage),
        "level_min": min((p["level"] for p in stage["polls"] if p.get("level") is not None),
                         default=None),
        "recovery": _recovery(stage, rows, step_s),
        "kinds_at_peak": _peak_kinds(stage, hold),
        "hold_seconds": [hold[0]["t"], hold[-1]["t"]],
        "server_cpu_at_peak": round(sum(r["server_cpu"] or 0 for r in hold) / len(hold), 3),
        "generators_cpu_at_peak": round(sum(gen_cpu) / len(gen_cpu), 3) if gen_cpu else None,
        "generators_saturated": bool(gen_cpu) and sum(gen_cpu) / len(gen_cpu) >= 0.85 * load_cpus,
        "max_generator_lag_ms": max(r["generator_lag_ms"] for r in rows),
        "unsent": sum(r["unsent"] for r in rows),
    }


def _capacity(stage: dict, args: argparse.Namespace) -> dict:
    rows = _seconds(stage, [], 1.0)
    measured = rows[args.warmup_s:args.warmup_s + args.capacity_s]
    ok = sum(r["tiers"]["P0"]["ok"] for r in measured) / len(measured)
    failed = sum(_failed(r["tiers"]["P0"]) for r in measured)
    lat = [x for r in stage["results"] for s in range(args.warmup_s, len(rows))
           for x in r["lat_ms"][s]]
    return {"c_per_s": round(ok, 1), "failed": failed, "p50_ms": _pct(lat, 0.5),
            "p99_ms": _pct(lat, 0.99), "seconds": rows, "reconcile": stage["reconcile"]}


# -- report ----------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _print_seconds(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: per second (ok+degraded / offered per tier; refused = shed by the server "
          f"+ dropped locally + degraded; failed = deadline, cancelled, other)")
    print("   t  load   " + "  ".join(f"{t + ' ok/off refused failed':>25}" for t in TIERS)
          + "  level  P0 p99 ms  cpu  gen cpu  gen lag ms")
    for r in rows:
        cells = []
        for t in TIERS:
            x = r["tiers"][t]
            cells.append(f"{x['ok'] + x['degraded']:>6}/{x['offered']:<6} {_refused(x):>6} "
                         f"{_failed(x):>6}")
        print(f"{r['t']:>4}  {r['rate_x']:.1f}x   " + "  ".join(f"{c:>25}" for c in cells)
              + f"  {_fmt(r['level_min']):>5}  {_fmt(r['p0_p99_ms'], '.1f'):>9}"
              f"  {_fmt(r['server_cpu'], '.2f'):>4}  {_fmt(r['generators_cpu'], '.2f'):>7}"
              f"  {r['generator_lag_ms']:>10.1f}")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _order(first: dict) -> str:
    known = sorted((s, -TIERS.index(t), t) for t, s in first.items() if s is not None)
    never = [t for t, s in first.items() if s is None]
    text = ", ".join(f"{t} at {s} s" for s, _, t in known)
    return text + (f"; never: {', '.join(never)}" if never else "")


def _calm(rec: dict) -> str:
    after = rec["clients_calm_after_s"]
    return "not in the run" if after is None else f"{after} s"


def _recovery_verdict(rec: dict) -> str:
    back, at = rec["full_admission_after_s"], rec["level_511_for_good_at_s"]
    if back is None:
        return "n/a (the level never dropped)"
    verdict = _verdict(back <= GOALS["recovery_s"])
    if at < rec["t_below_s"]:  # back at 511 before the load came down: not a recovery
        verdict += f" (only literally: back at 511 from t={at:.1f} s, before the load came down)"
    return verdict


def _goal_lines(on: dict, off: dict) -> list[tuple[str, str, str, str]]:
    g = GOALS
    rec, rec_off = on["recovery"], off["recovery"]
    back = rec["full_admission_after_s"]
    share_ok = on["p0_goodput_goal_share"] is not None and \
        on["p0_goodput_goal_share"] >= g["p0_goodput"]
    p99_ok = on["p0_p99_ms"] is not None and on["p0_p99_ms"] <= g["p0_p99_ms"]
    return [
        ("P0 goodput / C", f"{on['p0_goodput_of_c']:.3f}", f"{off['p0_goodput_of_c']:.3f}", ""),
        ("P0 goodput / P0 offered", f"{on['p0_goodput_of_offered']:.3f}",
         f"{off['p0_goodput_of_offered']:.3f}", ""),
        ("P0 goodput / min(C, P0 offered)", f"{on['p0_goodput_goal_share']:.3f}",
         f"{off['p0_goodput_goal_share']:.3f}", f">= {g['p0_goodput']:.2f}: {_verdict(share_ok)}"),
        ("P0 p99 of successful calls", f"{_fmt(on['p0_p99_ms'], '.1f')} ms",
         f"{_fmt(off['p0_p99_ms'], '.1f')} ms",
         f"<= {g['p0_p99_ms']:.0f} ms: {_verdict(p99_ok)}"),
        ("lowest admission level", _fmt(on["level_min"]), _fmt(off["level_min"]), ""),
        (f"level 511 again after load <= C (t={rec['t_below_s']})",
         "never shed" if back is None else f"{_fmt(back, '.1f')} s", "never sheds",
         f"<= {g['recovery_s']:.0f} s: " + _recovery_verdict(rec)),
        ("clients refuse nothing after load <= C", _calm(rec), _calm(rec_off), ""),
        ("worker CPU share at the peak", f"{on['server_cpu_at_peak']:.2f}",
         f"{off['server_cpu_at_peak']:.2f}", ""),
        ("generators' CPU at the peak", _fmt(on["generators_cpu_at_peak"], ".2f"),
         _fmt(off["generators_cpu_at_peak"], ".2f"), ""),
    ]


def _print_figures(report: dict) -> None:
    c = report["capacity"]["c_per_s"]
    on, off = report["on"]["figures"], report["off"]["figures"]
    print(f"\nCapacity C = {c:,.0f} P0 calls/s (closed loop, {report['config']['in_flight']} in "
          f"flight, admission off; p50 {_fmt(report['capacity']['p50_ms'], '.1f')} ms)")
    print(f"At the peak ({max(RAMP):.1f}C = {max(RAMP) * c:,.0f} calls/s offered, P0 "
          f"{on['p0_offered_per_s']:,.0f}/s; seconds {on['hold_seconds'][0]}-"
          f"{on['hold_seconds'][1]}):")
    print(f"  {'figure':<44} {'ON':>14} {'OFF':>14}  goal (ON)")
    for name, a, b, goal in _goal_lines(on, off):
        print(f"  {name:<44} {a:>14} {b:>14}  {goal}")
    print(f"  tiers start being refused to clients (ON): {_order(on['first_refused_s'])}  "
          f"[P3, then P2, then P1, P0 last: {_verdict(on['shed_order_ok'])}]")
    print(f"    of which by the level (SHED, SHED_LOCALLY, stale): "
          f"{_order(on['first_refused_by_level_s'])}")
    print(f"    of which by the adaptive throttle (THROTTLED_LOCALLY): "
          f"{_order(on['first_throttled_s'])}")
    print(f"    the polled level first refusing part of a tier: "
          f"{_order(on['level_crossed_s'])}")
    print(f"  tiers start failing, deadline or other (ON):  {_order(on['first_failed_s'])}")
    print(f"  tiers start failing, deadline or other (OFF): {_order(off['first_failed_s'])}")
    for name, f in (("ON", on), ("OFF", off)):
        print(f"  answered / offered per call at the peak ({name}): " + ", ".join(
            f"{k} {v['ok'] + v['degraded']}/{v['offered']}" for k, v in f["kinds_at_peak"].items()))
        if f["generators_saturated"] or f["max_generator_lag_ms"] > 100:
            print(f"  WARNING ({name}): the load generators ran at "
                  f"{_fmt(f['generators_cpu_at_peak'], '.2f')} CPU at the peak (worst loop lag "
                  f"{f['max_generator_lag_ms']:.0f} ms): client-side delays are in the latencies")
    for name in ("on", "off"):
        print(f"  reconcile ({name}): {report[name]['reconcile']}")


_SERIES = (("offered", lambda x: x["offered"], "0.55", "--"),
           ("ok", lambda x: x["ok"], "tab:green", "-"),
           ("degraded (stale)", lambda x: x["degraded"], "tab:olive", "-"),
           ("shed by the server", lambda x: x["shed"], "tab:red", "-"),
           ("dropped locally by level", lambda x: x["shed_locally"], "tab:purple", "-"),
           ("throttled locally (adaptive)", lambda x: x["throttled"], "tab:pink", "-"),
           ("failed (deadline etc.)", _failed, "black", ":"))


def _plot_run(axes: Any, title: str, run: dict, step_s: int) -> None:
    rows = run["seconds"]
    t = [r["t"] + 0.5 for r in rows]
    hold = _hold(rows, step_s)
    below = run["figures"]["recovery"]["t_below_s"]
    for ax in axes:
        ax.axvspan(hold[0]["t"], hold[-1]["t"] + 1, color="0.93", zorder=0)
        ax.axvline(below, color="0.6", linewidth=0.8, linestyle="-.")
    for ax, tier in zip(axes[:4], TIERS, strict=True):
        for label, fn, color, style in _SERIES:
            ax.plot(t, [fn(r["tiers"][tier]) for r in rows], label=label, color=color,
                    linestyle=style, linewidth=1.2)
        ax.set_ylabel(f"{tier} calls/s")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, loc="upper left")
    lv = axes[4]
    pt = [p["t"] for p in run["polls"] if p.get("level") is not None and p["t"] is not None]
    lv.step(pt, [p["level"] for p in run["polls"] if p.get("level") is not None
                 and p["t"] is not None], where="post", color="tab:blue",
            label="admission level (GetQosStatus, every 200 ms)")
    for k in range(1, 4):
        lv.axhline(k * USER_LEVELS - 0.5, color="0.8", linewidth=0.8)
    lv.set_ylim(-10, MAX_LEVEL + 20)
    lv.set_ylabel("level (P0 | P1 | P2 | P3)")
    cpu = lv.twinx()
    cpu.plot(t, [r["server_cpu"] for r in rows], color="tab:orange", linewidth=0.8,
             label="worker CPU share")
    cpu.plot(t, [r["generators_cpu"] for r in rows], color="tab:brown", linewidth=0.8,
             linestyle=":", label="generators' CPU")
    cpu.set_ylim(0, 1.5)
    lv.legend(fontsize=7, loc="lower left")
    cpu.legend(fontsize=7, loc="lower right")
    p99 = axes[5]
    p99.plot(t, [r["p0_p99_ms"] for r in rows], color="tab:red", label="P0 p99")
    p99.plot(t, [r["p0_p50_ms"] for r in rows], color="tab:green", label="P0 p50")
    p99.axhline(GOALS["p0_p99_ms"], color="0.5", linestyle="--", linewidth=0.8)
    p99.set_yscale("log")
    p99.set_ylabel("ms, successful P0 calls")
    p99.set_xlabel("seconds (grey: the peak; dash-dot: the load back at <= C)")
    p99.legend(fontsize=7, loc="upper left")
    p99.grid(alpha=0.3)


def _plot(report: dict, out: Path) -> None:
    import matplotlib  # the bench dependency group; imported here, not in the generators

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(6, 2, figsize=(14, 17), sharex=True)
    c = report["capacity"]["c_per_s"]
    for col, name in enumerate(("on", "off")):
        run = report[name]
        title = (f"admission {name.upper()} (qos_enabled={str(run['qos_enabled']).lower()}, "
                 f"client throttle={run['throttle']})")
        _plot_run(axes[:, col], title, run, report["config"]["step_s"])
    cfg = report["config"]
    fig.suptitle(f"One gateway worker, open-loop mixed load "
                 f"{', '.join(f'{x:g}' for x in RAMP)} x C, {cfg['step_s']} s a step "
                 f"(C = {c:,.0f} P0 calls/s, measured first); every call 1 s deadline\n"
                 f"{cfg['cpus']}; python bench/bench_overload.py", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(out, dpi=64)
    plt.close(fig)


def _config(args: argparse.Namespace, cpus: tuple) -> dict:
    server, load = cpus
    pinning = ("gateway worker on CPU " + ",".join(map(str, sorted(server)))
               + " (taskset), generators, bank simulator and this process on CPU "
               + ",".join(map(str, sorted(load)))) if server else "not pinned (one CPU)"
    return {"nproc": os.cpu_count(), "cpus": pinning, "generators": args.generators,
            "users": args.users, "deadline_s": DEADLINE_S, "step_s": args.step_s,
            "ramp_x_c": list(RAMP), "warmup_s": args.warmup_s, "capacity_s": args.capacity_s,
            "in_flight": args.in_flight, "poll_s": POLL_S,
            "mix_pct": {k: w for k, _, w in MIX}, "python": sys.version.split()[0]}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "overload.png",
                    help="the PNG report; the JSON goes beside it (.json)")
    ap.add_argument("--step-s", type=int, default=5, help="seconds per ramp step")
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--generators", type=int, help="load generator processes (default: one "
                    "per load CPU; several on one CPU cost more CPU per call)")
    ap.add_argument("--in-flight", type=int, default=64, help="capacity loop: calls in flight")
    ap.add_argument("--warmup-s", type=int, default=3)
    ap.add_argument("--capacity-s", type=int, default=5)
    ap.add_argument("--work-dir", type=Path, help="keep data dirs and logs here (default: a "
                    "temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    if args.generators is None:
        args.generators = len(loadgen.split_cpus()[1] or {0})
    if args.users < 2 or args.generators < 1 or args.step_s < 1 or args.in_flight < 1:
        ap.error("--users >= 2, --generators >= 1, --step-s >= 1, --in-flight >= 1")
    return args


def _run_all(args: argparse.Namespace, root: Path, cpus: tuple) -> dict:
    cap_stage = _stage(root / "capacity", False, False, args, cpus)
    capacity = _capacity(cap_stage, args)
    c = capacity["c_per_s"]
    if c <= 0:
        raise SystemExit("capacity measured as 0: see the logs under " + str(root))
    print(f"capacity C = {c:,.0f} P0 calls/s; {capacity['reconcile']}", flush=True)
    rates = [x * c for x in RAMP for _ in range(args.step_s)]
    report: dict[str, Any] = {"config": _config(args, cpus), "capacity": capacity}
    for name, qos in (("on", True), ("off", False)):
        stage = _stage(root / name, qos, qos, args, cpus, rates)
        rows = _seconds(stage, rates, c)
        report[name] = {"qos_enabled": qos, "throttle": qos, "seconds": rows,
                        "polls": stage["polls"], "reconcile": stage["reconcile"],
                        "figures": _figures(stage, rows, c, args.step_s,
                                            len(cpus[1] or {0})),
                        "client_refusals": [r["throttle"] for r in stage["results"]],
                        "other_errors": merge(stage["results"])["others"]}
        print(f"ramp with admission {name.upper()} done; {stage['reconcile']}", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    cpus = loadgen.split_cpus()
    if cpus[1] is not None:  # children (generators, bank simulator) inherit the mask
        os.sched_setaffinity(0, cpus[1])
    started = time.monotonic()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=False)
        report = _run_all(args, args.work_dir, cpus)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
            report = _run_all(args, Path(tmp), cpus)
    report["config"]["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nHow: {report['config']['cpus']}; {args.generators} generator processes; "
          f"{args.users} users; every call has a {DEADLINE_S:g} s deadline; ramp "
          f"{', '.join(f'{x:g}' for x in RAMP)} x C, {args.step_s} s a step; mix (% of calls) "
          + ", ".join(f"{k} {w}" for k, _, w in MIX) + f"; {report['config']['wall_s']} s in all")
    for name in ("on", "off"):
        _print_seconds(f"admission {name.upper()}", report[name]["seconds"])
    _print_figures(report)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, separators=(",", ":")) + "\n")
    _plot(report, out)
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
