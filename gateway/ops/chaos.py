"""``hongbao chaos``: a seeded fault campaign against real processes, with a Jepsen-style history.

A bank simulator and a ``hongbao serve --workers 2`` run on loopback. ``--clients``
client processes (this module with ``--client``) run a mixed load without pause: top-ups
and withdrawals by card, sends by balance and by card, grabs by many users, BatchGrab,
balance and transaction reads; one call in ten gets a 1 ms deadline and is then retried
with the same request id. Every call is written to the client's history as invoked, then
``ok``, ``failed`` (a definite refusal: nothing was applied) or ``unknown`` (deadline,
cancellation, a dead connection: it may or may not have been applied).

Meanwhile, at moments drawn from ``--seed`` (printed, so a run can be replayed), the
campaign injects one fault per cycle: SIGKILL of the whole gateway (supervisor and
workers), SIGKILL of one worker (the supervisor restarts it and the background role
moves), SIGTERM (a graceful drain), SIGKILL of the bank simulator (restarted on the same
port), or a bank fault switched on for a few seconds (timeouts, lost responses, late
debits, declines). The LMDB map starts small (4 MiB) so it fills and grows during the run.

Afterwards, with every process restarted clean: ``hongbao reconcile --bank`` must pass
(the totals are conserved, no balance is negative, no grab is credited twice, the bank
agrees); every payment is resolved; every acknowledged operation is present and answers
the same when retried with its request id; every unknown one is either fully applied or
not at all, and its retry answers one final state. The campaign prints a table and can
write it to ``docs/RELIABILITY.md`` (``--report``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from gateway.client import Client, call_patiently
from gateway.errors import reason_of
from gateway.ops.procs import Proc, banksim_proc, free_port, gateway_proc
from gateway.payments.bank import BankClient
from gateway.security import tickets
from hongbao.v1 import envelope_pb2, wallet_pb2

UNKNOWN_CODES = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL"}
FAULTS = ("kill_gateway", "kill_worker", "term_gateway", "kill_bank", "bank_faults")
BANK_FAULTS = ({"timeout_rate": 0.3}, {"lost_response_rate": 0.3}, {"late_debit_rate": 0.3},
               {"decline_rate": 0.5}, {"latency_ms": 300.0})
SETTINGS = ("bank_timeout_s = 1.0\nresolve_delay_s = 0.3\nresolver_max_backoff_s = 2.0\n"
            "map_size_mb = 4\nuser_rate_per_s = 0\n")
USERS_PER_CLIENT = 40
LUCKY, BALANCE, CARD = (envelope_pb2.ENVELOPE_KIND_LUCKY, envelope_pb2.PAY_METHOD_BALANCE,
                        envelope_pb2.PAY_METHOD_CARD)


# -- the client process ----------------------------------------------------------------------


class History:
    """One JSON line per finished call: what was asked, and what came of it."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("a", buffering=1)
        self.outcomes: Counter = Counter()

    def record(self, op: str, user: str, rid: str, outcome: str, **fields: Any) -> None:
        self.outcomes[outcome] += 1
        self._f.write(json.dumps({"op": op, "user": user, "rid": rid, "outcome": outcome,
                                  **fields}) + "\n")


def _outcome_of(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    code = err.code().name
    return ("unknown" if code in UNKNOWN_CODES else "failed"), (reason_of(err) or code)


class Load:
    """One client's mixed load; the target is re-read from a file when the gateway moves."""

    def __init__(self, cid: int, target_file: Path, keys: Path, history: History,
                 rng: random.Random) -> None:
        self.cid, self.target_file, self.history, self.rng = cid, target_file, history, rng
        ring = tickets.KeyRing.from_file(keys)
        self.users = [f"c{cid}u{i}" for i in range(USERS_PER_CLIENT)]
        self.meta = {u: Client.bearer(tickets.mint(ring, u, ["pay", "grab", "read"], 86400)[0])
                     for u in self.users}
        self.batch_meta = Client.bearer(tickets.mint(ring, f"c{cid}up", ["batch"], 86400)[0])
        self.envelopes: list[str] = []
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"c{self.cid}-{self.n}"

    async def call(self, op: str, user: str, rid: str, fn, **fields) -> Any:
        """``fn(timeout)`` once (a 1 ms deadline one time in ten), recorded; then, if the
        outcome is unknown, retried once with the same request id, recorded too."""
        for attempt, timeout in enumerate((0.001 if self.rng.random() < 0.1 else 5.0, 5.0)):
            try:
                result = await fn(timeout)
            except asyncio.CancelledError:
                # grpc ends a stream whose connection died with CancelledError, not an
                # AioRpcError; this client cancels nothing itself, so it is that.
                self.history.record(op, user, rid, "unknown", why="CANCELLED", attempt=attempt,
                                    **fields)
                await asyncio.sleep(0.05)
                continue
            except grpc.aio.AioRpcError as err:
                outcome, why = _outcome_of(err)
                self.history.record(op, user, rid, outcome, why=why, attempt=attempt, **fields)
                if outcome == "failed":
                    return None
                if why == "UNAVAILABLE":   # no gateway to talk to: do not spin
                    await asyncio.sleep(0.05)
                continue
            self.history.record(op, user, rid, "ok", attempt=attempt, **fields,
                                **_result_fields(result))
            return result
        return None

    async def step(self, c: Client) -> None:
        u = self.rng.choice(self.users)
        m, rid = self.meta[u], self.rid()
        r = self.rng.random()
        card = f"{self.rng.choice(['icbc', 'ccb', 'abc', 'boc'])}-{self.rng.randrange(10**6)}"
        if r < 0.15:
            amount = self.rng.randrange(500, 5_000)
            await self.call("top_up", u, rid, lambda t: c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id=rid, card_id=card, amount_fen=amount), metadata=m, timeout=t),
                amount=amount, card=card)
        elif r < 0.22:
            amount = self.rng.randrange(100, 1_000)
            await self.call("withdraw", u, rid, lambda t: c.wallet.Withdraw(
                wallet_pb2.WithdrawRequest(request_id=rid, card_id=card, amount_fen=amount),
                metadata=m, timeout=t), amount=amount, card=card)
        elif r < 0.45:
            await self._send(c, u, rid, card)
        elif r < 0.85 and self.envelopes:
            env = self.rng.choice(self.envelopes[-20:])
            await self.call("grab", u, rid, lambda t: c.envelopes.GrabEnvelope(
                envelope_pb2.GrabEnvelopeRequest(envelope_id=env, request_id=rid),
                metadata=m, timeout=t), envelope=env)
        elif r < 0.92 and self.envelopes:
            await self._batch(c, rid)
        else:
            await self.call("balance", u, rid, lambda t: c.wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(), metadata=m, timeout=t))

    async def _send(self, c: Client, u: str, rid: str, card: str) -> None:
        by_card = self.rng.random() < 0.3
        count = self.rng.randrange(1, 11)
        total = self.rng.randrange(count, count * 300)
        req = envelope_pb2.SendEnvelopeRequest(
            request_id=rid, total_fen=total, count=count, kind=LUCKY,
            pay_method=CARD if by_card else BALANCE, card_id=card if by_card else "")
        sent = await self.call("send", u, rid, lambda t: c.envelopes.SendEnvelope(
            req, metadata=self.meta[u], timeout=t), total=total, count=count, by_card=by_card,
            card=card if by_card else "")
        if sent is not None and sent.envelope_id:
            self.envelopes.append(sent.envelope_id)

    async def _batch(self, c: Client, rid: str) -> None:
        env = self.rng.choice(self.envelopes[-20:])
        users = self.rng.sample(self.users, 5)
        items = [envelope_pb2.BatchGrabItem(user_id=u, envelope_id=env, request_id=f"{rid}-{u}")
                 for u in users]

        async def batch(t: float):
            got = [r async for r in c.envelopes.BatchGrab(
                iter([envelope_pb2.BatchGrabRequest(batch_id=self.n, items=items)]),
                metadata=self.batch_meta, timeout=t)]
            return got[0] if got else None
        await self.call("batch", f"c{self.cid}up", rid, batch, envelope=env,
                        users=users)


def _result_fields(result: Any) -> dict:
    """The parts of an answer a retry must repeat."""
    out: dict[str, Any] = {}
    for name in ("payment_id", "envelope_id", "amount_fen", "outcome", "status"):
        if result is not None and hasattr(result, name):
            value = getattr(result, name)
            key = "grab_outcome" if name == "outcome" else name   # not the call's outcome
            out[key] = value if isinstance(value, int | str) else str(value)
    if isinstance(result, envelope_pb2.BatchGrabResponse):
        out["results"] = [(x.outcome, x.amount_fen) for x in result.results]
    return out


async def _client_main(cid: int, target_file: Path, keys: Path, history_path: Path,
                       seed: int, stop_file: Path) -> None:
    load = Load(cid, target_file, keys, History(history_path), random.Random(seed * 1000 + cid))
    while not stop_file.exists():
        target = target_file.read_text().strip()
        try:
            async with Client(target) as c:
                while not stop_file.exists() and target_file.read_text().strip() == target:
                    await asyncio.gather(*(load.step(c) for _ in range(8)))
        except (grpc.aio.AioRpcError, OSError):
            await asyncio.sleep(0.1)


# -- the campaign ----------------------------------------------------------------------------


class Cluster:
    """The bank (on a fixed port, so it can come back where the gateway expects it) and the
    gateway with its workers; the current target in ``target_file`` for the clients."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root, self.workers = root, workers
        self.bank_port = free_port()
        self.target_file = root / "target"
        (root / "chaos.toml").write_text(SETTINGS)
        self.bank = banksim_proc(root / "bank", "--port", str(self.bank_port),
                                 log_path=root / "bank.log")
        self.gateway: Proc | None = None
        self.start_failures: list[str] = []

    @property
    def bank_target(self) -> str:
        return f"127.0.0.1:{self.bank_port}"

    def start_gateway(self) -> None:
        """Starts the gateway; a start that fails is a finding (recorded), then retried."""
        for attempt in range(3):
            self.gateway = gateway_proc(
                self.root / "gw", "--config", str(self.root / "chaos.toml"),
                "--workers", str(self.workers), bank=self.bank_target,
                log_path=self.root / "gateway.log")
            try:
                self.gateway.start()
            except (RuntimeError, TimeoutError) as exc:
                tail = (self.root / "gateway.log").read_text(errors="replace")[-1500:]
                self.start_failures.append(f"start {attempt + 1} failed: {exc}; log: {tail}")
                self.gateway.kill()
                continue
            self.target_file.write_text(self.gateway.target)
            return
        raise RuntimeError("the gateway did not start three times in a row")

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.bank.stop()


def _inject(cluster: Cluster, fault: str, rng: random.Random) -> str:
    """One fault; returns what was done, for the table."""
    if fault == "kill_gateway":
        assert cluster.gateway is not None
        cluster.gateway.kill()
        cluster.start_gateway()
        return "SIGKILL gateway (all workers), restart"
    if fault == "kill_worker":
        workers = cluster.gateway.children() if cluster.gateway else []
        if workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
        return "SIGKILL one worker (the supervisor restarts it)"
    if fault == "term_gateway":
        assert cluster.gateway is not None
        cluster.gateway.stop()
        cluster.start_gateway()
        return "SIGTERM gateway (drain), restart"
    if fault == "kill_bank":
        cluster.bank.kill()
        time.sleep(rng.uniform(0.2, 1.5))
        cluster.bank.start()
        return "SIGKILL bank simulator, restart on the same port"
    faults = rng.choice(BANK_FAULTS)

    async def toggle() -> None:
        bank = BankClient(cluster.bank_target)
        try:
            await bank.set_faults("", faults)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            await bank.set_faults("")
        finally:
            await bank.close()
    asyncio.run(toggle())
    return f"bank faults {faults} for 1-3 s"


def _spawn_clients(cluster: Cluster, n: int, seed: int) -> tuple[list[subprocess.Popen], Path]:
    stop = cluster.root / "stop"
    keys = cluster.root / "gw" / "ticket_keys.json"
    procs = [subprocess.Popen([sys.executable, "-m", "gateway.ops.chaos", "--client", str(i),
                               "--target-file", str(cluster.target_file), "--keys", str(keys),
                               "--history", str(cluster.root / f"history-{i}.jsonl"),
                               "--seed", str(seed), "--stop-file", str(stop)],
                              start_new_session=True)
             for i in range(n)]
    return procs, stop


def run_campaign(root: Path, *, seed: int, cycles: int, gap_s: tuple[float, float],
                 clients: int = 3) -> dict:
    """The load, the faults and the checks; returns the report's figures."""
    rng = random.Random(seed)
    cluster = Cluster(root)
    faults: Counter = Counter()
    t0 = time.monotonic()
    try:
        cluster.bank.start()
        cluster.start_gateway()
        procs, stop = _spawn_clients(cluster, clients, seed)
        try:
            for _ in range(cycles):
                time.sleep(rng.uniform(*gap_s))
                faults[_inject(cluster, rng.choice(FAULTS), rng)] += 1
            time.sleep(gap_s[1])
        finally:
            stop.touch()
            crashed = []
            for i, p in enumerate(procs):
                try:
                    if p.wait(30) != 0:
                        crashed.append(f"client {i} exited with {p.returncode}")
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
                    crashed.append(f"client {i} did not stop")
        if cluster.gateway is not None:
            cluster.gateway.stop()
        cluster.start_gateway()   # clean: no faults, the resolver finishes what is open
        checks = asyncio.run(_verify(cluster, root))
        checks["violations"] = crashed + cluster.start_failures + checks["violations"]
    finally:
        cluster.stop()
    return {"seed": seed, "cycles": cycles, "seconds": round(time.monotonic() - t0),
            "clients": clients, "faults": dict(faults), **checks}


# -- the checks ------------------------------------------------------------------------------


def _histories(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("history-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


async def _wait_resolved(c: Client, admin, timeout_s: float = 120.0) -> int:
    from hongbao.v1 import admin_pb2
    deadline = time.monotonic() + timeout_s
    while True:
        r = await c.admin.Reconcile(admin_pb2.ReconcileRequest(), metadata=admin, timeout=60)
        open_ = len(json.loads(r.report_json).get("in_flight", []))
        lag = sum(t.lag for t in (await c.admin.GetQosStatus(
            admin_pb2.GetQosStatusRequest(), metadata=admin, timeout=10)).topics)
        if (open_ == 0 and lag == 0) or time.monotonic() > deadline:
            return open_ + lag
        await asyncio.sleep(0.5)


async def _verify(cluster: Cluster, root: Path) -> dict:
    """Every invariant; a list of violations (empty when the run passed)."""
    rows = _histories(root)
    ring = tickets.KeyRing.load_or_create(root / "gw")
    admin = Client.bearer(tickets.mint(ring, "chaos-admin", ["admin"], 3600)[0])
    violations: list[str] = []
    async with Client(cluster.gateway.target) as c:  # type: ignore[union-attr]
        still_open = await _wait_resolved(c, admin)
        if still_open:
            violations.append(f"{still_open} payments or credits still open after 120 s")
        meta_of: dict[str, Any] = {}
        for row in rows:
            if row["op"] in ("top_up", "withdraw", "send", "grab") and row["outcome"] != "failed":
                meta_of.setdefault(row["user"], Client.bearer(
                    tickets.mint(ring, row["user"], ["pay", "grab", "read"], 3600)[0]))
        violations += await _replays(c, rows, meta_of)
    rec = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
                          str(root / "gw"), "--bank", cluster.bank_target],
                         capture_output=True, text=True, timeout=600)
    if rec.returncode != 0:
        violations.append("reconcile: " + rec.stdout[-2000:])
    by_op: Counter = Counter((r["op"], r["outcome"]) for r in rows)
    return {"operations": dict(sorted((f"{op} {o}", n) for (op, o), n in by_op.items())),
            "calls": len(rows), "violations": violations,
            "reconcile": "BALANCED" if rec.returncode == 0 else "NOT BALANCED"}


async def _replays(c: Client, rows: list[dict], meta_of: dict) -> list[str]:
    """Each acknowledged or unknown money call, retried with its request id, must answer
    one final state, the same as its acknowledgement when there was one. An answer that
    said "still paying" is not an acknowledgement of the outcome, only of the request."""
    bad: list[str] = []
    last: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        if row["op"] in ("top_up", "withdraw", "send", "grab"):
            key = (row["op"], row["user"], row["rid"])
            if row["outcome"] == "ok" or key not in last:
                last[key] = row
    sem = asyncio.Semaphore(8)

    async def check(op: str, user: str, rid: str, row: dict) -> None:
        if row["outcome"] == "failed":
            return
        async with sem:
            again = await call_patiently(lambda: _retry(c, op, user, rid, row, meta_of[user]))
        acked = row["outcome"] == "ok" and row.get("status") not in OPEN_STATUSES[op]
        if isinstance(again, str):
            if acked:
                bad.append(f"{op} {rid} was acknowledged, its retry says {again}")
            return
        if again.get("status") in OPEN_STATUSES[op]:
            bad.append(f"{op} {rid} still {again['status']} after the resolver finished")
        if acked:
            for name in ("payment_id", "envelope_id", "amount_fen", "grab_outcome"):
                if name in row and name in again and row[name] != again[name]:
                    bad.append(f"{op} {rid}: {name} {row[name]} acknowledged, {again[name]} now")
    await asyncio.gather(*(check(op, u, rid, row) for (op, u, rid), row in last.items()))
    return bad


# An answer's status while its payment is still in flight.
_OPEN_PAYMENT = {int(wallet_pb2.PAYMENT_STATUS_PENDING), int(wallet_pb2.PAYMENT_STATUS_UNKNOWN)}
OPEN_STATUSES: dict[str, set[int]] = {
    "top_up": _OPEN_PAYMENT, "withdraw": _OPEN_PAYMENT, "grab": set(),
    "send": {int(envelope_pb2.ENVELOPE_STATUS_PAYING)}}


async def _retry(c: Client, op: str, user: str, rid: str, row: dict, meta) -> dict | str:
    try:
        if op == "top_up":
            r: Any = await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id=rid, card_id=row["card"], amount_fen=row["amount"]),
                metadata=meta, timeout=10)
        elif op == "withdraw":
            r = await c.wallet.Withdraw(wallet_pb2.WithdrawRequest(
                request_id=rid, card_id=row["card"], amount_fen=row["amount"]),
                metadata=meta, timeout=10)
        elif op == "grab":
            r = await c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=row["envelope"], request_id=rid), metadata=meta, timeout=10)
        else:
            r = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id=rid, total_fen=row["total"], count=row["count"], kind=LUCKY,
                pay_method=CARD if row["by_card"] else BALANCE, card_id=row["card"]),
                metadata=meta, timeout=10)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise   # shed: call_patiently asks again after the pushback
        return reason_of(err) or err.code().name
    return _result_fields(r)


# -- the report ------------------------------------------------------------------------------


def render(report: dict) -> str:
    ops = ", ".join(f"{k}: {v}" for k, v in report["operations"].items())
    faults = "; ".join(f"{k} x{v}" for k, v in report["faults"].items())
    result = "PASS" if not report["violations"] else f"FAIL ({len(report['violations'])})"
    return ("| scenario | cycles | operations by outcome | faults injected | invariants checked "
            "| result | seed |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            f"| mixed load, {report['clients']} client processes, --workers 2, "
            f"{report['seconds']} s "
            f"| {report['cycles']} | {report['calls']} calls: {ops} | {faults} "
            "| reconcile --bank (conservation, no negative balance, credited once, bank "
            "agrees); every payment resolved; every acknowledged call present and answering "
            f"the same on retry; every unknown one final on retry | {result} "
            f"({report['reconcile']}) | {report['seed']} |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hongbao chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--gap-s", type=float, nargs=2, default=(1.0, 4.0))
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--report", type=Path, help="append the table to this markdown file")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--target-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--history", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stop-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if args.client is not None:
        asyncio.run(_client_main(args.client, args.target_file, args.keys, args.history, seed,
                                 args.stop_file))
        return 0
    print(f"chaos: seed {seed} (replay with --seed {seed})", flush=True)
    with tempfile.TemporaryDirectory(prefix="hongbao-chaos-") as tmp:
        report = run_campaign(Path(tmp), seed=seed, cycles=args.cycles,
                              gap_s=tuple(args.gap_s), clients=args.clients)
    table = render(report)
    print(table)
    for v in report["violations"][:50]:
        print("  VIOLATION:", v)
    if args.report:
        with args.report.open("a") as f:
            f.write(table)
    return 0 if not report["violations"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
