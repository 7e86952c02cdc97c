"""Cython hot path against its pure-Python twin.

Prints, and returns from :func:`main`, two figures for each implementation:

- ``envelope_us``: one whole envelope's hot-path work: split_lucky of 100 shares
  (unseeded, so os.urandom is included, as in production), pack_envelope, a fresh
  GrabGate tracking it, then for each of 100 users one admit and one claim_share.
  Goal: Cython at least 20x faster than the twin.
- ``admits_per_s``: GrabGate.admit calls, one per distinct user, spread round-robin
  over 2,000 envelopes of 100 shares.  Goal: at least 1M/s from Cython.
- ``admit_many_users_per_s`` (no goal): the same admits in batches of 100 users of one
  envelope through admit_many, which probes without the GIL.

Each figure is the median over several timed chunks, in CPU time of the benchmarking
thread (so other processes on a shared machine disturb it less than wall time would),
with gc left on for both.
Every loop body is the same Python code for both implementations, so the calling
overhead (roughly 30-60 ns per call) is in both figures and caps the ratio.

What `cython -a` still shows yellow, and why (the hot loops themselves, lucky_fill,
the xoshiro256** draws, the gate's probe/CAS loop and claim_share_into, are white):
the `def` lines (argument parsing), building the returned Python objects (lists,
tuples, bytes), raising exceptions, os.urandom (one Python call per unseeded split)
and the dict/deque bookkeeping in GrabGate.track, which is not on the per-grab path.

Runs in about 10 s: ``python bench/bench_hotpath.py [--seconds S] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import hotpath

GOAL_ENVELOPE_SPEEDUP = 20.0
GOAL_ADMITS_PER_S = 1_000_000
SHARES = 100
TOTAL_FEN = 100 * SHARES * 3          # 3 yuan average share
SOLD_OUT_STATUS = 2
ENVELOPES = 2_000                     # for the admit throughput figures
USERS = [b"user-%08d" % i for i in range(SHARES)]


def _median_per_unit(run_chunk: Callable[[], int], seconds: float) -> float:
    """Median seconds per unit of work over chunks run for about `seconds`."""
    per_unit = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(per_unit) < 3:
        start = time.thread_time()
        units = run_chunk()
        per_unit.append((time.thread_time() - start) / units)
    return statistics.median(per_unit)


def _envelope_chunk(impl: Any, envelopes: int) -> Callable[[], int]:
    split_lucky, pack_envelope, claim_share = impl.split_lucky, impl.pack_envelope, impl.claim_share
    grab_gate = impl.GrabGate
    key = b"envelope-0001"

    def run() -> int:
        for _ in range(envelopes):
            shares = split_lucky(TOTAL_FEN, SHARES)
            buf = pack_envelope(TOTAL_FEN, TOTAL_FEN, 0, 86_400_000, SHARES, 0, 1, 1, 0, shares)
            gate = grab_gate()
            gate.track(key, SHARES)
            admit = gate.admit
            for user in USERS:
                if admit(key, user) >= 0:
                    buf, _index, _amount_fen = claim_share(buf, SOLD_OUT_STATUS)
        return envelopes

    return run


def _tracked_gate(impl: Any) -> tuple[Any, list[bytes]]:
    gate = impl.GrabGate(ENVELOPES)
    keys = [b"envelope-%06d" % i for i in range(ENVELOPES)]
    for key in keys:
        gate.track(key, SHARES)
    return gate, keys


def _admit_rate(impl: Any, seconds: float) -> float:
    # Round-robin over envelopes: user u of every envelope, then user u + 1, ...
    # A fresh gate for every run, built outside the timed part, so every admit
    # is a first grab (no ALREADY short cuts).
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        gate, keys = _tracked_gate(impl)
        admit = gate.admit
        pairs = [(key, user) for user in USERS for key in keys]
        start = time.thread_time()
        for key, user in pairs:
            admit(key, user)
        rates.append(len(pairs) / (time.thread_time() - start))
    return statistics.median(rates)


def _admit_many_rate(impl: Any, seconds: float) -> float:
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        gate, keys = _tracked_gate(impl)
        admit_many = gate.admit_many
        start = time.thread_time()
        for key in keys:
            admit_many(key, USERS)
        rates.append(len(keys) * len(USERS) / (time.thread_time() - start))
    return statistics.median(rates)


def measure(seconds: float) -> dict[str, Any]:
    """Run every measurement; `seconds` bounds each (implementation, figure) pair."""
    figures: dict[str, dict[str, float]] = {
        "envelope_us": {}, "admits_per_s": {}, "admit_many_users_per_s": {}}
    for name in hotpath.IMPLEMENTATIONS:
        impl = hotpath.load(name)
        chunk = 50 if name == "cython" else 3
        figures["envelope_us"][name] = 1e6 * _median_per_unit(
            _envelope_chunk(impl, chunk), seconds)
        figures["admits_per_s"][name] = _admit_rate(impl, seconds / 2)
        figures["admit_many_users_per_s"][name] = _admit_many_rate(impl, seconds / 2)
    speedup = figures["envelope_us"]["pure"] / figures["envelope_us"]["cython"]
    return {
        **figures,
        "envelope_speedup": speedup,
        "admits_speedup": figures["admits_per_s"]["cython"] / figures["admits_per_s"]["pure"],
        "goals": {"envelope_speedup": GOAL_ENVELOPE_SPEEDUP,
                  "admits_per_s": GOAL_ADMITS_PER_S},
        "met": {"envelope_speedup": speedup >= GOAL_ENVELOPE_SPEEDUP,
                "admits_per_s": figures["admits_per_s"]["cython"] >= GOAL_ADMITS_PER_S},
    }


def _print_table(result: dict[str, Any]) -> None:
    env, adm, many = result["envelope_us"], result["admits_per_s"], result[
        "admit_many_users_per_s"]
    rows = [
        ("envelope: split+pack+100x(admit+claim)",
         f"{env['cython']:.1f} us", f"{env['pure']:.1f} us",
         f"{result['envelope_speedup']:.1f}x", f">= {GOAL_ENVELOPE_SPEEDUP:.0f}x",
         result["met"]["envelope_speedup"]),
        ("gate admits/s (distinct users)",
         f"{adm['cython'] / 1e6:.2f}M", f"{adm['pure'] / 1e6:.2f}M",
         f"{result['admits_speedup']:.1f}x", f">= {GOAL_ADMITS_PER_S / 1e6:.0f}M/s (cython)",
         result["met"]["admits_per_s"]),
        ("gate admit_many users/s (batches of 100)",
         f"{many['cython'] / 1e6:.2f}M", f"{many['pure'] / 1e6:.2f}M",
         f"{many['cython'] / many['pure']:.1f}x", "-", None),
    ]
    header = ("figure", "cython", "pure", "ratio", "goal", "met")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  met")
    for row in rows:
        met = "-" if row[5] is None else ("yes" if row[5] else "NO")
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + f"  {met}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time budget per implementation and figure (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = measure(max(0.1, min(args.seconds, 4.0)))   # bounded: < 30 s in all
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


if __name__ == "__main__":
    main()
