"""Durable grabs per second through group commit, against one synced commit per grab.

Both runs use the real LmdbLedger on disk with sync on commit (fsync), in
this process, driven by concurrent asyncio tasks the way the gRPC servicers
drive it. The baseline is the same ledger with max_batch=1: every grab pays
its own fsync. Ratios, not absolute numbers, are the point on a shared machine.

    python bench/bench_ledger.py [--grabs 60000] [--concurrency 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time

import hotpath
from gateway.domain import reads
from gateway.domain.keys import payment_id_for
from gateway.domain.model import EnvelopeKind, Payment, PaymentKind, PaymentStatus
from gateway.ledger import LmdbLedger

SHARES = 100


async def _prepare(led: LmdbLedger, envelopes: int) -> list[str]:
    amount = envelopes * SHARES * 200
    p, _created = await led.begin_payment(
        Payment(payment_id_for("sender", PaymentKind.TOP_UP, "fund"), "sender",
                PaymentKind.TOP_UP, "icbc-1",
                "icbc", amount, PaymentStatus.PENDING), b"f" * 16, 60_000)
    await led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)
    ids = []
    for i in range(envelopes):
        r = await led.send_from_balance(
            "sender", f"e{i}", b"x" * 16, total_fen=SHARES * 200, count=SHARES,
            kind=EnvelopeKind.LUCKY, greeting="", expires_in_s=3600,
            shares=hotpath.split_lucky(SHARES * 200, SHARES))
        ids.append(r.envelope_id)
    return ids


async def _grab_all(led: LmdbLedger, ids: list[str], grabs: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await led.grab(f"u{i}", ids[i // SHARES], "r")
            assert r.amount_fen > 0

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(grabs)))
    return time.perf_counter() - t0


async def _grab_batched(led: LmdbLedger, ids: list[str], grabs: int, batch: int) -> float:
    """The BatchGrab path: an upstream sends batches; each batch is one writer request."""
    sem = asyncio.Semaphore(8)

    async def one(start: int) -> None:
        items = [(f"u{i}", ids[i // SHARES], "r") for i in range(start, min(start + batch, grabs))]
        async with sem:
            results = await led.grab_many(items)
        assert all(r.amount_fen > 0 for r in results)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, grabs, batch)))
    return time.perf_counter() - t0


def _run(root: str, grabs: int, concurrency: int, batch: int = 0, **ledger_args) -> dict:
    path = tempfile.mkdtemp(dir=root)
    led = LmdbLedger(path, **ledger_args)
    try:
        ids = asyncio.run(_prepare(led, (grabs + SHARES - 1) // SHARES))
        before = asyncio.run(led.stats())
        seconds = asyncio.run(_grab_batched(led, ids, grabs, batch) if batch
                              else _grab_all(led, ids, grabs, concurrency))
        after = asyncio.run(led.stats())
        batches = after.batches - before.batches
        apply_us = (after.apply_s_total - before.apply_s_total) / grabs * 1e6
    finally:
        led.close()
        shutil.rmtree(path, ignore_errors=True)
    return {"grabs": grabs, "seconds": seconds, "per_s": grabs / seconds,
            "batches": batches, "mean_batch": grabs / max(batches, 1), "apply_us": apply_us}


def _read_cost(root: str, calls: int = 50_000) -> tuple[float, float]:
    """Microseconds per balance read: the query run directly, and awaited through the contract."""
    path = tempfile.mkdtemp(dir=root)
    led = LmdbLedger(path)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            led.read(reads.balance, "sender")
        direct_us = (time.perf_counter() - t0) / calls * 1e6

        async def awaited() -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                await led.balance("sender")
            return (time.perf_counter() - t0) / calls * 1e6

        return direct_us, asyncio.run(awaited())
    finally:
        led.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grabs", type=int, default=60_000)
    ap.add_argument("--baseline-grabs", type=int, default=1_000)
    ap.add_argument("--concurrency", type=int, default=4096)
    ap.add_argument("--dir", default=os.environ.get("HONGBAO_BENCH_DIR", "."),
                    help="where the LMDB files go (a real disk, so fsync is real)")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-ledger-", dir=args.dir)
    try:
        group = _run(root, args.grabs, args.concurrency)
        batched = _run(root, args.grabs, args.concurrency, batch=1000)
        single = _run(root, args.baseline_grabs, args.concurrency, max_batch=1)
        relaxed = _run(root, args.grabs, args.concurrency, batch=1000, durable=False)
        direct_us, awaited_us = _read_cost(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = group["per_s"] / single["per_s"]
    batched_ratio = batched["per_s"] / single["per_s"]
    print(f"durable grabs, hotpath={hotpath.IMPLEMENTATION}")
    print(f"  {'mode':<34}{'grabs':>8}{'grabs/s':>12}{'grabs/commit':>14}"
          f"{'rules us/grab':>15}")
    for name, r in (("one synced commit per grab", single),
                    ("group commit, one request a grab", group),
                    ("group commit, BatchGrab of 1000", batched),
                    ("BatchGrab, durability relaxed", relaxed)):
        print(f"  {name:<34}{r['grabs']:>8}{r['per_s']:>12,.0f}{r['mean_batch']:>14.1f}"
              f"{r['apply_us']:>15.2f}")
    print(f"  group commit / per-grab commit: {ratio:.1f}x (one request a grab), "
          f"{batched_ratio:.1f}x (BatchGrab)")
    print(f"  a balance read: {direct_us:.2f} us run directly, {awaited_us:.2f} us awaited "
          f"through the async contract (+{awaited_us - direct_us:.2f} us)")
    best = max(group["per_s"], batched["per_s"])
    print(f"  goal >= 100,000 durable grabs/s: {'met' if best >= 100_000 else 'NOT met'} "
          f"(best {best:,.0f}/s)")
    return {"group_per_s": group["per_s"], "single_per_s": single["per_s"],
            "batched_per_s": batched["per_s"], "batched_ratio": batched_ratio,
            "relaxed_per_s": relaxed["per_s"], "ratio": ratio,
            "mean_batch": group["mean_batch"], "batched_apply_us": batched["apply_us"],
            "read_direct_us": direct_us,
            "read_awaited_us": awaited_us}


if __name__ == "__main__":
    main()
