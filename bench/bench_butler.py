"""Bank protection: Debits offered at 10x a bank's capacity, through the payment butler and not.

A bank simulator process with one bank of small capacity (200 calls/s by default) that
collapses after 2 s over capacity (answering nothing for 5 s). For a bounded time (8 s),
concurrent asyncio tasks start Debits at 10x that capacity (open loop: one task per call,
started on schedule whatever became of the earlier ones). Every second the benchmark asks the
bank for its counters (GetStats) and prints what it saw. The same then runs with the butler
off (``enabled=False``: every call goes straight to the bank), on a fresh simulator.

Goals: with the butler, the bank never sees more than its capacity + 5% in any second (its own
``peak_tps``, counted per second of its clock) and never collapses; without it, it collapses.

    python bench/bench_butler.py [--capacity-tps 200] [--factor 10] [--duration-s 8]

**The takeover run** (``--takeover``): a real gateway process and a bank simulator
(one bank, both channels) under steady card traffic: TopUps started open loop at
``--rate`` per second for ``--duration-s`` (10) seconds, from many users and cards. At
``--kill-at-s`` (3) the bank's direct channel is killed: ``--kill down`` takes it down
(every call through it is refused at once, CHANNEL_DOWN), ``--kill silent`` makes it
answer nothing (every call times out: an unclear result). Per second it prints the
payments started and how those that ended came out; then the payments completed per
second before, in the second after, and after the kill, the p50/p99 latency of each
phase, when the butler's direct breaker opened (GetQosStatus, polled every 50 ms), the
time to route around the failure (from the kill until every later payment completed),
and the money: each request asked again until final, the bank's per-channel totals
against the payments that succeeded (zero lost, zero doubled), and ``hongbao reconcile
--bank`` over the gateway's books.

    python bench/bench_butler.py --takeover [--rate 200] [--kill down|silent]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.errors import Unavailable
from gateway.ops.procs import banksim_proc
from gateway.payments.bank import BankBusy, BankClient, BankUnclear
from gateway.payments.butler import ButlerOptions, PaymentButler

BANK = "icbc"
CARDS = 1000
# Calls started but not finished, at most; past it a due call is counted as not offered.
MAX_OUTSTANDING = 50_000
CALL_TIMEOUT_S = 1.0
PEAK_SLACK = 0.05


async def _one(butler: PaymentButler, order_id: str, card_id: str, t0: float,
               seconds: list[Counter]) -> None:
    """One Debit; its outcome is tallied in the second it ended (counted from ``t0``)."""
    try:
        answer = await butler.debit(order_id, card_id, 1)
        outcome = "settled" if answer.settled else "declined"
    except Unavailable as err:  # failed fast by the butler: nothing sent
        outcome = err.reason
    except BankBusy:
        outcome = "bank_refused"
    except BankUnclear:
        outcome = "unclear"
    seconds[min(int(time.monotonic() - t0), len(seconds) - 1)][outcome] += 1


async def _offer(butler: PaymentButler, rate_per_s: float, duration_s: float, prefix: str,
                 seconds: list[Counter]) -> None:
    """Starts Debits on schedule for ``duration_s``; ``seconds[k]`` tallies second k: calls
    started (offered) and calls that ended, by outcome."""
    tasks: set[asyncio.Task[None]] = set()
    started = 0
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < duration_s:
        tally = seconds[int(elapsed)]
        due = int(elapsed * rate_per_s) + 1
        while started < due:
            started += 1
            if len(tasks) >= MAX_OUTSTANDING:
                tally["not_offered"] += 1
                continue
            tally["offered"] += 1
            task = asyncio.ensure_future(
                _one(butler, f"{prefix}-{started}", f"{BANK}-{started % CARDS:06d}", t0, seconds))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.002)
    if tasks:  # every call ends within its deadline; the bound is a backstop
        await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S + 2.0)


async def _poll(client: BankClient, butler: PaymentButler, seconds: int,
                rows: list[dict[str, Any]]) -> None:
    """Once a second: the bank's counters since the previous poll, and the butler's limit."""
    previous = (await client.stats()).banks[0]
    t0 = time.monotonic()
    for k in range(1, seconds + 1):
        await asyncio.sleep(max(0.0, t0 + k - time.monotonic()))
        try:
            now = (await client.stats()).banks[0]
        except (BankUnclear, BankBusy):
            rows.append({"second": k, "bank_requests": None})
            continue
        rows.append({
            "second": k,
            "bank_requests": now.requests - previous.requests,
            "bank_rejected": now.rejected_over_capacity - previous.rejected_over_capacity,
            "bank_settled": now.debits_settled - previous.debits_settled,
            "collapsed": now.collapsed,
            "limit": butler.health()[0]["limit"] if butler.enabled else "-",
        })
        previous = now


async def _run(target: str, enabled: bool, capacity_tps: float, rate_per_s: float,
               duration_s: float) -> dict[str, Any]:
    client = BankClient(target, timeout_s=CALL_TIMEOUT_S)
    butler = PaymentButler(client, {BANK: capacity_tps},
                           ButlerOptions(call_timeout_s=CALL_TIMEOUT_S), enabled=enabled)
    # One more second for the calls that end after the last start.
    seconds = [Counter() for _ in range(math.ceil(duration_s) + 2)]
    rows: list[dict[str, Any]] = []
    try:
        poller = asyncio.ensure_future(_poll(client, butler, math.ceil(duration_s), rows))
        await _offer(butler, rate_per_s, duration_s, "on" if enabled else "off", seconds)
        await poller
        final = (await client.stats()).banks[0]
    finally:
        await butler.close()
        await client.close()
    for row in rows:
        row.update(seconds[row["second"] - 1])
    totals = sum(seconds, Counter())
    return {
        "butler": "on" if enabled else "off",
        "seconds": rows,
        "calls": dict(totals),
        "peak_tps": final.peak_tps,
        "rejected_over_capacity": final.rejected_over_capacity,
        "collapses": final.collapses,
        "held_while_collapsed": final.held_while_collapsed,
        "health": butler.health()[0],
    }


def _measure(enabled: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    proc = banksim_proc(root / ("on" if enabled else "off"), "--banks", BANK,
                        "--capacity-tps", str(args.capacity_tps), "--collapse-after-s",
                        str(args.collapse_after_s), "--collapse-for-s", str(args.collapse_for_s),
                        "--latency-ms", str(args.latency_ms), "--log-level", "warning",
                        log_path=root / "banksim.log")
    try:
        proc.start()
        return asyncio.run(_run(proc.target, enabled, args.capacity_tps,
                                args.factor * args.capacity_tps, args.duration_s))
    finally:
        proc.stop()


def _table(run: dict[str, Any]) -> None:
    print(f"\nbutler {run['butler']}:")
    print(f"{'s':>3} {'offered':>8} {'fast-failed':>11} {'answered':>9} {'unclear':>8} "
          f"{'bank saw':>9} {'refused':>8} {'settled':>8} {'limit':>6} {'collapsed':>9}")
    for row in run["seconds"]:
        fast = row.get("BANK_BUSY", 0) + row.get("BANK_CIRCUIT_OPEN", 0)
        answered = row.get("settled", 0) + row.get("declined", 0) + row.get("bank_refused", 0)
        saw = "?" if row["bank_requests"] is None else row["bank_requests"]
        print(f"{row['second']:>3} {row.get('offered', 0):>8} {fast:>11} {answered:>9} "
              f"{row.get('unclear', 0):>8} {saw:>9} {row.get('bank_rejected', '?'):>8} "
              f"{row.get('bank_settled', '?'):>8} {row.get('limit', '?'):>6} "
              f"{'yes' if row.get('collapsed') else 'no':>9}")
    print(f"    bank: peak {run['peak_tps']} calls in one second, "
          f"{run['rejected_over_capacity']} refused over capacity, "
          f"{run['collapses']} collapse(s); calls: {run['calls']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity-tps", type=float, default=200.0)
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / capacity")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="seconds of load (default 8, or 10 with --takeover)")
    parser.add_argument("--collapse-after-s", type=float, default=2.0)
    parser.add_argument("--collapse-for-s", type=float, default=5.0)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--takeover", action="store_true",
                        help="the takeover run: kill the direct channel under card traffic")
    parser.add_argument("--rate", type=float, default=200.0, help="takeover: TopUps/s")
    parser.add_argument("--kill-at-s", type=float, default=3.0)
    parser.add_argument("--kill", choices=("down", "silent"), default="down")
    args = parser.parse_args(argv)
    if args.takeover:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)  # takeover.py beside this file
        from takeover import takeover  # the gateway stack, loaded for this run only
        args.duration_s = args.duration_s or 10.0
        if not (0 < args.kill_at_s < args.duration_s <= 30 and 0 < args.rate <= 1000):
            parser.error("--kill-at-s < --duration-s <= 30, 0 < --rate <= 1000")
        return takeover(args)
    args.duration_s = args.duration_s or 8.0
    if not (0 < args.duration_s <= 15 and 0 < args.capacity_tps <= 2000 and args.factor > 0):
        parser.error("duration 0..15 s, capacity 0..2000 calls/s, factor > 0")

    root = Path(tempfile.mkdtemp(prefix="bench_butler."))
    t0 = time.monotonic()
    try:
        runs = {"on": _measure(True, args, root), "off": _measure(False, args, root)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    allowed = args.capacity_tps * (1 + PEAK_SLACK)
    goals = {
        "butler on: the bank never sees more than capacity + 5% in a second":
            runs["on"]["peak_tps"] <= allowed,
        "butler on: the bank never collapses": runs["on"]["collapses"] == 0,
        "butler off: the bank collapses": runs["off"]["collapses"] > 0,
    }
    print(f"bank protection: one bank of {args.capacity_tps:g} calls/s (collapses after "
          f"{args.collapse_after_s:g} s over capacity, for {args.collapse_for_s:g} s), "
          f"Debits offered at {args.factor:g}x = {args.factor * args.capacity_tps:g}/s "
          f"for {args.duration_s:g} s")
    print("(per second: offered = Debits started; fast-failed (by the butler, nothing sent), "
          "answered (settled, declined or refused by the bank) and unclear = calls that ended "
          "in that second; bank saw / refused / settled = the bank's GetStats counters since "
          "the previous poll; peak = the bank's own most calls in one second of its clock)")
    for run in runs.values():
        _table(run)
    print()
    for goal, met in goals.items():
        print(f"  [{'met' if met else 'NOT MET'}] {goal}")
    print(f"  (allowed peak {allowed:g}; butler on peak {runs['on']['peak_tps']}, "
          f"butler off peak {runs['off']['peak_tps']}; {time.monotonic() - t0:.1f} s in all)")
    return {"capacity_tps": args.capacity_tps, "offered_tps": args.factor * args.capacity_tps,
            "duration_s": args.duration_s, "allowed_peak_tps": allowed, "runs": runs,
            "goals": goals}


if __name__ == "__main__":
    main()
