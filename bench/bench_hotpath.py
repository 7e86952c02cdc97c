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
thread, with gc left on for both; the two implementations' chunks alternate, so on a
shared machine both sample the same background load and the ratio stays fair.
Every loop body is the same Python code for both implementations, so the calling
overhead (roughly 30-60 ns per call) is in both figures and caps the ratio.

What `cython -a` still shows yellow, and why (the hot loops themselves, lucky_fill,
the xoshiro256** draws, the gate's probe/CAS loop and claim_share_into, are white):
the `def` lines (argument parsing), building the returned Python objects (lists,
tuples, bytes), raising exceptions, os.urandom (one Python call per unseeded split)
and the dict/deque bookkeeping in GrabGate.track, which is not on the per-grab path.

Runs in about 8 s (at most about 25 s): ``python bench/bench_hotpath.py [--seconds S] [--json]``.
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


def _interleaved(runs: dict[str, Callable[[], float]], seconds: float) -> dict[str, float]:
    """Median of each run's result (seconds per unit of work) over about `seconds`.

    The runs alternate, so on a shared machine every implementation samples the
    same background load and the ratio between them stays meaningful.
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, samples.values())) < 3:
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def _envelope_run(impl: Any, envelopes: int) -> Callable[[], float]:
    split_lucky, pack_envelope, claim_share = impl.split_lucky, impl.pack_envelope, impl.claim_share
    grab_gate = impl.GrabGate
    key = b"envelope-0001"

    def run() -> float:
        start = time.thread_time()
        for _ in range(envelopes):
            shares = split_lucky(TOTAL_FEN, SHARES)
            buf = pack_envelope(TOTAL_FEN, TOTAL_FEN, 0, 86_400_000, SHARES, 0, 1, 1, 0, shares)
            gate = grab_gate()
            gate.track(key, SHARES)
            admit = gate.admit
            for user in USERS:
                if admit(key, user) >= 0:
                    buf, _index, _amount_fen = claim_share(buf, SOLD_OUT_STATUS)
        return (time.thread_time() - start) / envelopes

    return run


def _tracked_gate(impl: Any) -> tuple[Any, list[bytes]]:
    gate = impl.GrabGate(ENVELOPES)
    keys = [b"envelope-%06d" % i for i in range(ENVELOPES)]
    for key in keys:
        gate.track(key, SHARES)
    return gate, keys


def _admit_run(impl: Any) -> Callable[[], float]:
    # Round-robin over envelopes: user u of every envelope, then user u + 1, ...
    # A fresh gate for every run, built outside the timed part, so every admit
    # is a first grab (no ALREADY short cuts).
    def run() -> float:
        gate, keys = _tracked_gate(impl)
        admit = gate.admit
        pairs = [(key, user) for user in USERS for key in keys]
        start = time.thread_time()
        for key, user in pairs:
            admit(key, user)
        return (time.thread_time() - start) / len(pairs)

    return run


def _admit_many_run(impl: Any) -> Callable[[], float]:
    def run() -> float:
        gate, keys = _tracked_gate(impl)
        admit_many = gate.admit_many
        start = time.thread_time()
        for key in keys:
            admit_many(key, USERS)
        return (time.thread_time() - start) / (len(keys) * len(USERS))

    return run


def measure(seconds: float) -> dict[str, Any]:
    """Run every measurement; each figure takes about `seconds` (both implementations)."""
    impls = {name: hotpath.load(name) for name in hotpath.IMPLEMENTATIONS}
    chunk = {"cython": 50, "pure": 3}   # about a millisecond of work each
    envelope_s = _interleaved(
        {name: _envelope_run(impl, chunk[name]) for name, impl in impls.items()}, seconds)
    admit_s = _interleaved({name: _admit_run(impl) for name, impl in impls.items()}, seconds)
    admit_many_s = _interleaved(
        {name: _admit_many_run(impl) for name, impl in impls.items()}, seconds)
    speedup = envelope_s["pure"] / envelope_s["cython"]
    admits_per_s = {name: 1 / t for name, t in admit_s.items()}
    return {
        "envelope_us": {name: 1e6 * t for name, t in envelope_s.items()},
        "admits_per_s": admits_per_s,
        "admit_many_users_per_s": {name: 1 / t for name, t in admit_many_s.items()},
        "envelope_speedup": speedup,
        "admits_speedup": admits_per_s["cython"] / admits_per_s["pure"],
        "goals": {"envelope_speedup": GOAL_ENVELOPE_SPEEDUP,
                  "admits_per_s": GOAL_ADMITS_PER_S},
        "met": {"envelope_speedup": speedup >= GOAL_ENVELOPE_SPEEDUP,
                "admits_per_s": admits_per_s["cython"] >= GOAL_ADMITS_PER_S},
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
                        help="time budget per figure, both implementations (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = measure(max(0.1, min(args.seconds, 6.0)))   # bounded: < 30 s in all
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


if __name__ == "__main__":
    main()
