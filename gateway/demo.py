"""``hongbao demo``: a Spring-Festival-eve evening, end to end, on loopback.

Starts the bank simulator and the gateway as real processes on an embedded
LMDB in a temporary folder; a few hundred users top up from their cards,
senders pay group envelopes from their wallets, and everyone in each group
races to grab. Prints a summary, runs ``hongbao reconcile`` against the live
books and the bank, and stops every process it started.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from gateway import tickets
from gateway.client import Client
from gateway.errors import reason_of
from gateway.procs import banksim_proc, gateway_proc
from hongbao.v1 import admin_pb2, envelope_pb2, wallet_pb2

USERS = 300
SENDERS = 60
GROUP_SIZE = 40
TOP_UP_FEN = 50_000
CONCURRENCY = 128


class Progress:
    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()

    def show(self, phase: str, done: int, total: int) -> None:
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            sys.stdout.write(f"\r  {phase:<22} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done}/{total}")
            sys.stdout.flush()

    def end(self, phase: str, total: int, seconds: float) -> None:
        if self.tty:
            sys.stdout.write("\r" + " " * 78 + "\r")
        print(f"  {phase:<22} {total:>6} in {seconds:6.2f} s")


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(p * len(sorted_ms)))]


async def _run_all(coros, phase: str, progress: Progress) -> list:
    sem = asyncio.Semaphore(CONCURRENCY)
    done = 0
    total = len(coros)
    started = time.monotonic()

    async def one(c):
        nonlocal done
        async with sem:
            r = await c
        done += 1
        if done % 25 == 0 or done == total:
            progress.show(phase, done, total)
        return r

    results = await asyncio.gather(*(one(c) for c in coros))
    progress.end(phase, total, time.monotonic() - started)
    return results


async def _scenario(target: str, data_dir: Path, rng: random.Random) -> dict:
    ring = tickets.KeyRing.load_or_create(data_dir)
    users = [f"user{i:04d}" for i in range(USERS)]
    meta = {u: Client.bearer(tickets.mint(ring, u, ["pay", "grab", "read"], 3600)[0])
            for u in users}
    admin = Client.bearer(tickets.mint(ring, "operator", ["admin"], 3600)[0])
    progress = Progress()
    stats: dict = {"grab_ms": [], "outcomes": {}, "errors": {}}
    async with Client(target) as c:
        async def top_up(u):
            card = f"{rng.choice(['icbc', 'ccb', 'abc', 'boc'])}-{rng.randrange(10**15, 10**16)}"
            req = wallet_pb2.TopUpRequest(request_id=f"topup-{u}", card_id=card,
                                          amount_fen=TOP_UP_FEN)
            return await c.wallet.TopUp(req, metadata=meta[u], timeout=30)

        await _run_all([top_up(u) for u in users], "top-ups", progress)

        senders = rng.sample(users, SENDERS)
        plans = []
        for i, s in enumerate(senders):
            count = rng.randint(5, 30)
            lucky = rng.random() < 0.8
            total = rng.randint(count * 100, min(count * 2000, TOP_UP_FEN))
            if not lucky:
                total -= total % count
            plans.append((s, envelope_pb2.SendEnvelopeRequest(
                request_id=f"send-{i}", total_fen=total, count=count,
                kind=envelope_pb2.ENVELOPE_KIND_LUCKY if lucky
                else envelope_pb2.ENVELOPE_KIND_NORMAL,
                greeting="恭喜发财, 大吉大利", pay_method=envelope_pb2.PAY_METHOD_AUTO)))

        async def send(s, req):
            return await c.envelopes.SendEnvelope(req, metadata=meta[s], timeout=30)

        sent = await _run_all([send(s, r) for s, r in plans], "envelopes sent", progress)
        envelope_ids = [r.envelope_id for r in sent]
        stats["sent_fen"] = sum(r.total_fen for _s, r in plans)
        stats["shares"] = sum(r.count for _s, r in plans)

        async def grab(u, env_id):
            t0 = time.perf_counter()
            try:
                r = await c.envelopes.GrabEnvelope(
                    envelope_pb2.GrabEnvelopeRequest(envelope_id=env_id,
                                                     request_id=f"g-{env_id}"),
                    metadata=meta[u], timeout=30)
            except grpc.aio.AioRpcError as err:
                key = reason_of(err) or err.code().name
                stats["errors"][key] = stats["errors"].get(key, 0) + 1
                return 0
            stats["grab_ms"].append((time.perf_counter() - t0) * 1000)
            name = envelope_pb2.GrabOutcome.Name(r.outcome).removeprefix("GRAB_OUTCOME_")
            stats["outcomes"][name] = stats["outcomes"].get(name, 0) + 1
            return r.amount_fen

        attempts = [(u, e) for e in envelope_ids for u in rng.sample(users, GROUP_SIZE)]
        rng.shuffle(attempts)
        t0 = time.monotonic()
        amounts = await _run_all([grab(u, e) for u, e in attempts], "grabs", progress)
        stats["grab_s"] = time.monotonic() - t0
        stats["attempts"] = len(attempts)
        stats["grabbed_fen"] = sum(amounts)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin)
            if all(t.lag == 0 for t in qos.topics):
                break
            await asyncio.sleep(0.1)
        stats["credit_lag"] = sum(t.lag for t in qos.topics)

        views = []
        for env_id in envelope_ids[:60]:
            v = await c.envelopes.GetEnvelope(
                envelope_pb2.GetEnvelopeRequest(envelope_id=env_id), metadata=meta[users[0]])
            views.append(v.envelope)
        stats["views"] = views
        balances = []
        for u in users:
            b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta[u])
            balances.append((b.balance_fen, b.pending_credit_fen))
        stats["wallet_fen"] = sum(b for b, _p in balances)
        stats["pending_fen"] = sum(p for _b, p in balances)
    return stats


def _print_summary(stats: dict) -> None:
    ms = sorted(stats["grab_ms"])
    fen = lambda v: f"{v / 100:,.2f} yuan"  # noqa: E731
    print("\nWhat happened")
    print(f"  users                  {USERS} (each topped up {fen(TOP_UP_FEN)} from a card)")
    print(f"  envelopes              {SENDERS} "
          f"({stats['shares']} shares, {fen(stats['sent_fen'])})")
    print(f"  grab attempts          {stats['attempts']}  "
          + "  ".join(f"{k}={v}" for k, v in sorted(stats["outcomes"].items())))
    if stats["errors"]:
        print(f"  grab errors            {stats['errors']}")
    print(f"  money grabbed          {fen(stats['grabbed_fen'])}")
    print(f"  grabs/s (client view)  {stats['attempts'] / max(stats['grab_s'], 1e-9):,.0f}")
    print(f"  grab latency           p50 {_pct(ms, 0.50):.1f} ms   p99 {_pct(ms, 0.99):.1f} ms")
    print(f"  credit backlog         {stats['credit_lag']} after the rush")
    print(f"  wallets hold           {fen(stats['wallet_fen'])} "
          f"(+ {fen(stats['pending_fen'])} pending)")
    print("\nBest luck (手气最佳), a few envelopes")
    shown = 0
    for v in stats["views"]:
        if v.best_luck_user_id and v.kind == envelope_pb2.ENVELOPE_KIND_LUCKY and shown < 5:
            best = max(g.amount_fen for g in v.grabs)
            least = min(g.amount_fen for g in v.grabs)
            print(f"  {v.envelope_id}  {v.count:>2} shares of {fen(v.total_fen):>14}: "
                  f"{v.best_luck_user_id} got {fen(best)} (smallest {fen(least)})")
            shown += 1


def main() -> int:
    rng = random.Random(secrets.randbits(64))
    with tempfile.TemporaryDirectory(prefix="hongbao-demo-") as tmp:
        root = Path(tmp)
        print(f"Spring Festival eve on loopback (data in {root})")
        bank = banksim_proc(root / "bank", log_path=root / "banksim.log")
        gw = gateway_proc(root / "gateway", log_path=root / "gateway.log")
        try:
            bank.start()
            gw.bank = bank.target  # type: ignore[attr-defined]
            gw.cmd += ["--bank", bank.target]
            gw.start()
            print(f"  bank simulator pid {bank.pid} on {bank.target}; "
                  f"gateway pid {gw.pid} on {gw.target}\n")
            stats = asyncio.run(_scenario(gw.target, root / "gateway", rng))
            _print_summary(stats)
            print("\nhongbao reconcile (live, cross-checked with the bank)")
            rec = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "reconcile", "--data-dir",
                 str(root / "gateway"), "--bank", bank.target],
                capture_output=True, text=True, timeout=120)
            print("\n".join("  " + line for line in rec.stdout.splitlines()))
            if rec.returncode != 0:
                print(rec.stderr, file=sys.stderr)
                return 1
        except Exception:
            for p, name in ((gw, "gateway.log"), (bank, "banksim.log")):
                log = root / name
                if log.exists():
                    print(f"--- last lines of {name}", file=sys.stderr)
                    print("\n".join(log.read_text().splitlines()[-20:]), file=sys.stderr)
                p.kill()
            raise
        finally:
            gw.stop()
            bank.stop()
        print("\nstopped every process the demo started")
    return 0
