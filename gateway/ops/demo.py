"""``hongbao demo``: a Spring-Festival-eve evening, end to end, on loopback.

Starts the bank simulator and the gateway as real processes on an embedded
LMDB in a temporary folder; a few hundred users top up from their cards,
senders pay group envelopes from their wallets, and everyone in each group
races to grab; then, with the bank misbehaving, users pay envelopes by card
and withdraw, and every unclear payment is resolved. Prints a summary, runs
``hongbao reconcile`` against the live books and the bank, and stops every
process it started.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from gateway.client import Client, call_patiently
from gateway.errors import reason_of
from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.payments.bank import BankClient
from gateway.qos.controller import MAX_LEVEL
from gateway.security import tickets
from hongbao.v1 import admin_pb2, envelope_pb2, wallet_pb2

Metadata = tuple[tuple[str, str], ...]  # a call's metadata: here, its ticket

USERS = 300
SENDERS = 60
GROUP_SIZE = 40
TOP_UP_FEN = 50_000
CONCURRENCY = 128
CARD_PAYERS = 120
# The bank misbehaves during the card phase: each a probability per new order.
CARD_FAULTS = {"decline_rate": 0.05, "timeout_rate": 0.05, "lost_response_rate": 0.05,
               "late_debit_rate": 0.05, "late_debit_delay_ms": 500, "latency_ms": 20}
ENV_STATE = {envelope_pb2.ENVELOPE_STATUS_ACTIVE: "succeeded",
             envelope_pb2.ENVELOPE_STATUS_PAY_UNKNOWN: "unknown",
             envelope_pb2.ENVELOPE_STATUS_PAYING: "paying",
             envelope_pb2.ENVELOPE_STATUS_REFUNDED: "refunded",
             envelope_pb2.ENVELOPE_STATUS_FAILED: "failed (order locked)",
             envelope_pb2.ENVELOPE_STATUS_SOLD_OUT: "succeeded",
             envelope_pb2.ENVELOPE_STATUS_EXPIRED: "succeeded"}
PAY_STATE = {wallet_pb2.PAYMENT_STATUS_SUCCEEDED: "succeeded",
             wallet_pb2.PAYMENT_STATUS_UNKNOWN: "unknown",
             wallet_pb2.PAYMENT_STATUS_PENDING: "pending",
             wallet_pb2.PAYMENT_STATUS_REFUNDED: "refunded",
             wallet_pb2.PAYMENT_STATUS_FAILED: "failed (order locked)"}


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


async def _set_faults(bank_target: str, **faults) -> None:
    bank = BankClient(bank_target, timeout_s=5)
    try:
        await bank.set_faults("", faults)
    finally:
        await bank.close()


async def _card_phase(c: Client, bank_target: str, users: list[str], meta: dict,
                      rng: random.Random, progress: Progress) -> dict:
    """Card-paid envelopes and withdrawals with the bank misbehaving; every one resolved."""
    await _set_faults(bank_target, **CARD_FAULTS)
    payers = rng.sample(users, CARD_PAYERS)

    def envelope_req(i: int, u: str):
        return envelope_pb2.SendEnvelopeRequest(
            request_id=f"card-{i}", total_fen=1_000, count=5,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, card_id=f"icbc-{7000 + i}",
            pay_method=envelope_pb2.PAY_METHOD_CARD, greeting="新春快乐")

    def withdraw_req(i: int, u: str):
        return wallet_pb2.WithdrawRequest(request_id=f"wd-{i}", card_id=f"ccb-{8000 + i}",
                                          amount_fen=2_000)

    async def first(i: int, u: str):
        try:
            if i % 2 == 0:
                r = await c.envelopes.SendEnvelope(envelope_req(i, u), metadata=meta[u],
                                                   timeout=10)
                return ENV_STATE.get(r.status, "other")
            r = await c.wallet.Withdraw(withdraw_req(i, u), metadata=meta[u], timeout=10)
            return PAY_STATE.get(r.status, "other")
        except grpc.aio.AioRpcError as err:
            return reason_of(err) or err.code().name

    initial = await _run_all([first(i, u) for i, u in enumerate(payers)],
                             "card payments (faults)", progress)
    await _set_faults(bank_target)
    final = list(initial)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        open_ = [i for i, s in enumerate(final) if s in ("unknown", "paying", "pending")]
        if not open_:
            break
        await asyncio.sleep(0.5)
        for i in open_:
            final[i] = await first(i, payers[i])
    unknown = [i for i, s in enumerate(initial) if s == "unknown"]
    return {"total": len(payers), "initial": Counter(initial),
            "resolved": Counter(final[i] for i in unknown), "still_open": sum(
                1 for s in final if s in ("unknown", "paying", "pending"))}


async def _scenario(target: str, bank_target: str, data_dir: Path,
                    rng: random.Random) -> dict:
    """The whole evening against a running gateway; returns what the summary prints."""
    users = [f"user{i:04d}" for i in range(USERS)]
    meta, admin = _tickets(data_dir, users)
    progress = Progress()
    stats: dict = {"grab_ms": [], "outcomes": {}, "errors": {}}
    async with Client(target) as c:
        await _top_ups(c, users, meta, rng, progress)
        plans = _envelope_plans(users, rng)
        envelope_ids = await _send_envelopes(c, plans, meta, progress, stats)
        await _grab_rush(c, users, envelope_ids, meta, rng, progress, stats)
        stats["credit_lag"] = await _credit_backlog(c, admin)
        stats["card"] = await _card_phase(c, bank_target, users, meta, rng, progress)
        stats["views"] = await _envelope_views(c, envelope_ids[:60], meta[users[0]])
        stats.update(await _wallet_totals(c, users, meta))
    return stats


def _tickets(data_dir: Path, users: list[str]) -> tuple[dict[str, Metadata], Metadata]:
    """Each user's call metadata (a ticket for pay, grab and read) and the operator's."""
    ring = tickets.KeyRing.load_or_create(data_dir)
    meta = {u: Client.bearer(tickets.mint(ring, u, ["pay", "grab", "read"], 3600)[0])
            for u in users}
    admin = Client.bearer(tickets.mint(ring, "operator", ["admin"], 3600)[0])
    return meta, admin


async def _top_ups(c: Client, users: list[str], meta: dict[str, Metadata],
                   rng: random.Random, progress: Progress) -> None:
    """Every user tops up TOP_UP_FEN from a card of a random bank."""
    async def top_up(u: str) -> wallet_pb2.TopUpResponse:
        card = f"{rng.choice(['icbc', 'ccb', 'abc', 'boc'])}-{rng.randrange(10**15, 10**16)}"
        req = wallet_pb2.TopUpRequest(request_id=f"topup-{u}", card_id=card,
                                      amount_fen=TOP_UP_FEN)
        return await c.wallet.TopUp(req, metadata=meta[u], timeout=30)

    await _run_all([top_up(u) for u in users], "top-ups", progress)


def _envelope_plans(users: list[str], rng: random.Random
                    ) -> list[tuple[str, envelope_pb2.SendEnvelopeRequest]]:
    """SENDERS group envelopes paid from wallets: (sender, request), mostly LUCKY."""
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
    return plans


async def _send_envelopes(c: Client, plans: list[tuple[str, envelope_pb2.SendEnvelopeRequest]],
                          meta: dict[str, Metadata], progress: Progress,
                          stats: dict) -> list[str]:
    """Sends the planned envelopes; returns their ids and counts money and shares."""
    async def send(s: str, req: envelope_pb2.SendEnvelopeRequest
                   ) -> envelope_pb2.SendEnvelopeResponse:
        return await c.envelopes.SendEnvelope(req, metadata=meta[s], timeout=30)

    sent = await _run_all([send(s, r) for s, r in plans], "envelopes sent", progress)
    stats["sent_fen"] = sum(r.total_fen for _s, r in plans)
    stats["shares"] = sum(r.count for _s, r in plans)
    return [r.envelope_id for r in sent]


async def _grab_rush(c: Client, users: list[str], envelope_ids: list[str],
                     meta: dict[str, Metadata], rng: random.Random, progress: Progress,
                     stats: dict) -> None:
    """GROUP_SIZE random users race for each envelope, all envelopes at once, shuffled."""
    async def grab(u: str, env_id: str) -> int:
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


async def _credit_backlog(c: Client, admin: Metadata, timeout_s: float = 60.0) -> int:
    """Waits (at most ``timeout_s``) for the bus consumers to catch up and for full
    admission (the summary's reads must not be shed or answered from a cache); the credit
    lag left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin)
        if all(t.lag == 0 for t in qos.topics) and qos.admission.level == MAX_LEVEL:
            break
        await asyncio.sleep(0.1)
    return sum(t.lag for t in qos.topics if t.topic == "credit")


async def _envelope_views(c: Client, envelope_ids: list[str], meta: Metadata) -> list:
    """The envelopes as GetEnvelope shows them, one call after another."""
    views = []
    for env_id in envelope_ids:
        v = await call_patiently(lambda e=env_id: c.envelopes.GetEnvelope(
            envelope_pb2.GetEnvelopeRequest(envelope_id=e), metadata=meta))
        views.append(v.envelope)
    return views


async def _wallet_totals(c: Client, users: list[str], meta: dict[str, Metadata]) -> dict:
    """The money in all wallets: ``wallet_fen`` held and ``pending_fen`` on its way."""
    balances = []
    for u in users:
        for _ in range(100):   # a stale answer (the degraded read under load) is not the total
            b = await call_patiently(lambda u=u: c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                                 metadata=meta[u]))
            if not b.stale:
                break
            await asyncio.sleep(0.1)
        balances.append((b.balance_fen, b.pending_credit_fen))
    return {"wallet_fen": sum(b for b, _p in balances),
            "pending_fen": sum(p for _b, p in balances)}


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
    card = stats["card"]
    fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
    print(f"  card payments          {card['total']} with bank faults on "
          f"(half envelopes paid by card, half withdrawals)")
    print(f"    first answers        {fmt(card['initial'])}")
    print(f"    unknown, resolved as {fmt(card['resolved'])}")
    print(f"    still unclear        {card['still_open']}")
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
        config = root / "gateway.toml"
        # Short bank deadline and resolve delay, so unclear payments settle while you watch.
        config.write_text("bank_timeout_s = 1.0\nresolve_delay_s = 1.0\n"
                          "resolver_max_backoff_s = 2.0\n")
        gw = gateway_proc(root / "gateway", "--config", str(config),
                          log_path=root / "gateway.log")
        try:
            bank.start()
            gw.cmd += ["--bank", bank.target]
            gw.start()
            print(f"  bank simulator pid {bank.pid} on {bank.target}; "
                  f"gateway pid {gw.pid} on {gw.target}\n")
            stats = asyncio.run(_scenario(gw.target, bank.target, root / "gateway", rng))
            _print_summary(stats)
            print("\nhongbao reconcile (live, cross-checked with the bank)")
            rec = subprocess.run(
                [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
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
