"""The demo's midnight peak: load well past one worker's measured capacity, for a few seconds.

Separate load-generator processes (``gateway.ops.loadgen``) first measure the capacity C:
a closed loop of P0 calls (sends and grabs) for two seconds. Then they offer the call mix
(P0 sends and grabs, P1 envelope reads, P2 balances and statements, P3 photo unlocks and
notification streams) open loop, ramped 1x, 2x, then 3x C and held there, then back to
0.5x for a last second. The clients throttle as the product's client does (they drop
locally what the server's last answers say it sheds). Meanwhile the admission level is
polled (``GetQosStatus``, every 200 ms); in cluster mode a SET is killed a third of the way
in and started again two thirds in. Then the demo waits for full admission again.

The record's ``peak`` has, per second of the ramp: each tier's offered, admitted (ok or
degraded) and shed (by the server, or dropped locally) calls, the lowest admission level
seen, and P0 goodput (successful P0 calls); and, from the server's own counters, what it
shed and served degraded over the whole peak.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.client import call_patiently
from gateway.ops import loadgen
from gateway.ops.demo_story import Story
from hongbao.v1 import admin_pb2

PROBE_S = 2
POLL_S = 0.2
RAMP = (1.0, 2.0, 3.0)  # multiples of C: the steps up, the last one held
TAIL = 0.5  # the last second
PROBE_IN_FLIGHT = 96


async def peak(s: Story, targets: list[str], peak_seconds: int, generators: int,
               during: Callable[[float], Awaitable[dict[str, float]]] | None = None,
               cpus: set[int] | None = None) -> None:
    """The peak phase (see the module docstring); ``during(t0)`` runs beside the ramp
    (``t0``: its start, monotonic) and returns marks for the record; the generators are
    pinned to ``cpus`` when given."""
    users = s.users
    tickets = [s.tickets[u] for u in users]
    await s.settle()  # the evening's rush may have left admission below full
    async with s.phase("the midnight peak", peak_seconds + PROBE_S) as ph:
        capacity = await _capacity(s, targets[0], users, tickets, cpus)
        ph.advance(PROBE_S)
        await s.settle()  # the probe ran the worker flat out: start the ramp from calm
        rates = [capacity * m for m in _multiples(peak_seconds)]
        before = await _server(s)
        specs = [{"target": targets[g % len(targets)], "users": users, "tickets": tickets,
                  "gid": 10 + g, "rates": [r / generators for r in rates], "throttle": True,
                  "cpus": cpus}
                 for g in range(generators)]
        levels: list[tuple[float, int]] = []
        marks: dict[str, float] = {}
        merged, t0 = await _ramp(s, specs, ph, levels, marks, during)
        after = await _server(s)
        await s.settle()
        ph.result = _summary(s, capacity, rates, merged, levels, before, after, t0, marks)


def _multiples(seconds: int) -> list[float]:
    """The ramp as multiples of C, one a second: each step up of RAMP held a fifth of the
    peak (at least a second, while at least two seconds of the top remain), the top
    held, and TAIL in the last second. 15 s: 1x for 3 s, 2x for 3 s, 3x for 8 s, 0.5x."""
    step = max(1, seconds // 5)
    up = [m for m in RAMP[:-1] for _ in range(step)][:max(0, seconds - 3)]
    return up + [RAMP[-1]] * (seconds - 1 - len(up)) + [TAIL]


async def _capacity(s: Story, target: str, users: list[str], tickets: list[str],
                    cpus: set[int] | None) -> float:
    """Successful P0 calls per second of a closed loop, over its last second."""
    spec = {"target": target, "users": users, "tickets": tickets, "gid": 1, "rates": [],
            "seconds": PROBE_S, "in_flight": PROBE_IN_FLIGHT, "cpus": cpus}
    results = await asyncio.to_thread(_run_generators, [spec])
    last = loadgen.merge(results)["tiers"][-1]["P0"]
    return max(50.0, float(last["ok"]))


def _run_generators(specs: list[dict], on_start: Callable[[float], None] | None = None
                    ) -> list[dict]:
    with loadgen.spawn(specs) as gens:
        t0 = gens.start()
        if on_start is not None:
            on_start(t0)
        return gens.results()


async def _ramp(s: Story, specs: list[dict], ph: Any, levels: list[tuple[float, int]],
                marks: dict[str, float],
                during: Callable[[float], Awaitable[dict[str, float]]] | None
                ) -> tuple[dict, float]:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[float] = loop.create_future()

    def on_start(t0: float) -> None:
        loop.call_soon_threadsafe(started.set_result, t0)

    run: asyncio.Future[list[dict]] = asyncio.ensure_future(
        asyncio.to_thread(_run_generators, specs, on_start))
    pending: list[asyncio.Future[Any]] = [run, started]
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await run  # the generators failed before the start: their error
    t0 = started.result()
    watch = asyncio.ensure_future(_watch(s, t0, len(specs[0]["rates"]), ph, levels))
    side = asyncio.ensure_future(during(t0)) if during is not None else None
    results = await run
    await watch
    if side is not None:
        marks.update(await side)
    merged = loadgen.merge(results)
    grab = loadgen.KINDS.index("grab")
    merged["grab_ok"] = [sum(r["by_kind"][i][grab][1 + loadgen.OK] for r in results)
                         for i in range(merged["seconds"])]
    return merged, t0


async def _watch(s: Story, t0: float, seconds: int, ph: Any,
                 levels: list[tuple[float, int]]) -> None:
    """The admission level every POLL_S until the ramp ends; advances the bar each second."""
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    shown = 0
    while (elapsed := time.monotonic() - t0) < seconds:
        try:
            q = await s.c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                             metadata=s.admin, timeout=1)
            levels.append((elapsed, q.admission.level))
        except grpc.aio.AioRpcError:  # a poll lost to the overload it watches: skipped
            pass
        while shown < min(seconds, int(elapsed)):
            shown += 1
            ph.advance()
        await asyncio.sleep(POLL_S)
    ph.advance(seconds - shown)


async def _server(s: Story) -> dict[str, dict[str, int]]:
    """The server's own counters: per tier offered/admitted/rejected, degraded answers."""
    q = await call_patiently(lambda: s.c.admin.GetQosStatus(
        admin_pb2.GetQosStatusRequest(), metadata=s.admin, timeout=5))
    return {"tiers": {t.tier: t.rejected for t in q.tiers},
            "offered": {t.tier: t.offered for t in q.tiers},
            "degraded": {d.name: d.served for d in q.degradations}}


def _summary(s: Story, capacity: float, rates: list[float], merged: dict,
             levels: list[tuple[float, int]], before: dict, after: dict, t0: float,
             marks: dict[str, float]) -> str:
    """Fills the record's ``peak`` and returns the phase's one line."""
    start = t0 - s.t0
    tiers: dict[str, dict[str, list[int]]] = {t: {"offered": [], "admitted": [], "shed": []}
                                              for t in loadgen.TIERS}
    for row in merged["tiers"]:
        for t, c in row.items():
            tiers[t]["offered"].append(c["offered"])
            tiers[t]["admitted"].append(c["ok"] + c["degraded"])
            tiers[t]["shed"].append(c["shed"] + c["shed_locally"] + c["throttled"])
    level = [min((lv for e, lv in levels if i <= e < i + 1), default=None)
             for i in range(merged["seconds"])]
    shed = {t: after["tiers"].get(t, 0) - before["tiers"].get(t, 0) for t in loadgen.TIERS}
    served = {k: v - before["degraded"].get(k, 0) for k, v in after["degraded"].items()}
    p0_ok = [row["P0"]["ok"] for row in merged["tiers"]]
    held = [i for i, r in enumerate(rates) if r >= capacity * RAMP[-1] - 1e-9]
    goodput = sum(p0_ok[i] for i in held) / max(1, len(held))
    s.record["peak"] = {
        "t_s": [round(start + i + 0.5, 3) for i in range(merged["seconds"])],
        "level": level, "tiers": tiers, "p0_goodput_per_s": p0_ok,
        "capacity_per_s": round(capacity, 1), "offered_per_s": [round(r) for r in rates],
        "server_shed": shed, "degraded_served": served,
        "p0_lat_ms": merged["p0_lat_ms"], "grab_ok": merged["grab_ok"],
        "set_killed_s": marks.get("killed"), "set_back_s": marks.get("back")}
    share = {t: sum(tiers[t]["shed"]) / max(1, sum(tiers[t]["offered"])) for t in tiers}
    low = min((lv for _e, lv in levels), default=None)
    return (f"C = {capacity:,.0f} P0 calls/s, offered up to {max(rates):,.0f}/s "
            f"({max(rates) / capacity:.1f}x); shed " + ", ".join(
                f"{t} {share[t]:.0%}" for t in loadgen.TIERS)
            + f"; P0 goodput {goodput:,.0f}/s ({goodput / capacity:.0%} of C) at {RAMP[-1]:g}x; "
            f"level down to {low}; {served.get('balance_cache', 0)} stale balances, "
            f"{served.get('moments_free', 0)} free unlocks")

