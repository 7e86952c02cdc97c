"""LMDB bytes and writes per envelope and per grab, and a worker's RSS under load (issue 9).

Storage, in this process, on the real LmdbLedger (durable, group commit): one sender is
topped up, pays E envelopes of S shares from the wallet, U users grab every share
BatchGrab-style (``Ledger.grab_many``, 1000 items a request, 8 requests in flight), then the
credit consumer's rule runs (``Ledger.apply_credits``) until the credit outbox is empty.
After each phase it reads every table's LMDB statistics (entries, branch/leaf/overflow pages
x page size), the key + value bytes the table holds, the environment's used pages
(``last_pgno``), the free pages (``mdb_stat -ef`` from Debian's lmdb-utils, when installed)
and the data file's size; it counts every put and delete the rules make, table by table,
by wrapping the write transaction's storage protocol. Bytes per envelope are taken after the
sends, bytes per grab after the credits, against the goals (<= 2 KiB per 100-share envelope,
<= 200 B per grab, <= 2 LMDB writes per grab).

RSS: a real bank simulator and a real ``hongbao serve`` worker (one process, default
settings but ``qos_enabled = false``: the load saturates the worker on purpose), and a
client process that tops senders up, sends envelopes by balance and BatchGrabs them without
pause (nothing pinned: other work shares this machine's CPUs); the worker's /proc status is
sampled every second (VmRSS, RssAnon, RssFile: LMDB's map is file-backed, so the pages of
data.mdb the worker has read count in VmRSS too).
``tests/test_soak.py`` drives the same load by grab count (``make soak``).

    python bench/bench_storage.py [--envelopes 1000] [--users 1000] [--rss-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

import hotpath
from gateway.client import Client
from gateway.domain import keys, reads, rules
from gateway.domain.keys import payment_id_for, request_digest
from gateway.domain.model import EnvelopeKind, Payment, PaymentKind, PaymentStatus
from gateway.ledger import LmdbLedger, LmdbSnapshot
from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.security import tickets
from hongbao.v1 import envelope_pb2, wallet_pb2

SHARES = 100
SHARE_FEN = 200  # the mean share: an envelope of 100 shares holds 200 yuan
BATCH_ITEMS = 1000  # the gateway's batch_grab_max_items
BATCHES_IN_FLIGHT = 8
CREDIT_LIMIT = 1024  # the gateway's credit_batch
GOAL_ENVELOPE_B = 2048
GOAL_GRAB_B = 200
GOAL_GRAB_WRITES = 2
GOAL_RSS_MIB = 300
MDB_STAT_TIMEOUT_S = 60.0


# -- counting the rules' writes -----------------------------------------------------------------


class _CountingTx:
    """The storage protocol passed through, every put and delete counted by table."""

    def __init__(self, tx: Any, puts: collections.Counter, deletes: collections.Counter) -> None:
        self.inner, self.puts, self.deletes = tx, puts, deletes

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.inner.get(table, key)

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True,
            append: bool = False) -> bool:
        self.puts[table] += 1
        return self.inner.put(table, key, value, overwrite=overwrite, append=append)

    def delete(self, table: str, key: bytes) -> bool:
        self.deletes[table] += 1
        return self.inner.delete(table, key)

    def scan(self, table: str, start: bytes = b""):
        return self.inner.scan(table, start)

    def scan_back(self, table: str, before: bytes | None = None):
        return self.inner.scan_back(table, before)

    def count(self, table: str) -> int:
        return self.inner.count(table)


class _Tally:
    """Puts and deletes by table over the rules run through :meth:`rule`."""

    def __init__(self) -> None:
        self.puts: collections.Counter[str] = collections.Counter()
        self.deletes: collections.Counter[str] = collections.Counter()

    def rule(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with the batch's transaction counted; the flush of cached accounts and
        envelopes at the end of the batch goes through the same wrapper, so it counts too.
        Several requests may share one batch: the transaction is wrapped once."""
        def counted(b: Any, *args: Any) -> Any:
            if not isinstance(b.tx, _CountingTx):
                b.tx = _CountingTx(b.tx, self.puts, self.deletes)
            return fn(b, *args)
        return counted


# -- the ledger's storage figures ---------------------------------------------------------------


def _payload(tx: Any) -> dict[str, tuple[int, int]]:
    """A read query: (entries, key + value bytes) of every table."""
    out = {}
    for table in keys.TABLES:
        n = size = 0
        for k, v in tx.scan(table):
            n += 1
            size += len(k) + len(v)
        out[table] = (n, size)
    return out


def _free_pages(ledger_dir: Path) -> int | None:
    """Pages on LMDB's freelist (``mdb_stat -ef``); None without the binary."""
    exe = shutil.which("mdb_stat")
    if exe is None:
        return None
    out = subprocess.run([exe, "-ef", str(ledger_dir)], capture_output=True, text=True,
                         timeout=MDB_STAT_TIMEOUT_S, check=True).stdout
    found = re.search(r"Free pages: (\d+)", out)
    return int(found.group(1)) if found else None


def usage(led: LmdbLedger, ledger_dir: Path) -> dict:
    """Every table's entries, pages and payload; used and free pages; the file's size."""
    payload = led.read(_payload)
    tables = {}
    with led.env.begin() as txn:
        psize = led.env.stat()["psize"]
        for table in keys.TABLES:
            st = txn.stat(led.dbs[table])
            pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            tables[table] = {"entries": st["entries"], "page_b": pages * psize,
                             "leaf_pages": st["leaf_pages"], "payload_b": payload[table][1]}
    info = led.env.info()
    data = ledger_dir / "data.mdb"
    return {"tables": tables, "psize": psize, "used_b": (info["last_pgno"] + 1) * psize,
            "free_pages": _free_pages(ledger_dir), "file_b": data.stat().st_size,
            "file_alloc_b": data.stat().st_blocks * 512}


# -- the in-process phases ----------------------------------------------------------------------


async def _fund(led: LmdbLedger, envelopes: int) -> None:
    amount = envelopes * SHARES * SHARE_FEN
    p, _created = await led.begin_payment(
        Payment(payment_id_for("sender", PaymentKind.TOP_UP, "fund"), "sender",
                PaymentKind.TOP_UP, "icbc-1", "icbc", amount, PaymentStatus.PENDING),
        b"f" * 16, 60_000)
    await led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)


async def _send(led: LmdbLedger, envelopes: int, tally: _Tally) -> list[str]:
    ids = []
    for i in range(envelopes):
        env = keys.new_envelope_id("sender")
        r = await led.write(tally.rule(rules.send_from_balance), b"sender", f"e{i}".encode(),
                            b"x" * 16, env.encode(), SHARES * SHARE_FEN, SHARES,
                            EnvelopeKind.LUCKY, "", 3600,
                            hotpath.split_lucky(SHARES * SHARE_FEN, SHARES))
        ids.append(r.envelope_id)
    return ids


def _grab_items(ids: list[str], users: int) -> list[tuple[bytes, bytes, bytes]]:
    """Envelope j is grabbed by users j*S .. j*S+S-1 (mod U): each user grabs many envelopes."""
    return [(e.encode(), f"u{(j * SHARES + k) % users:07d}".encode(), request_digest("r"))
            for j, e in enumerate(ids) for k in range(SHARES)]


async def _grab_all(led: LmdbLedger, items: list, tally: _Tally) -> float:
    sem = asyncio.Semaphore(BATCHES_IN_FLIGHT)
    rule = tally.rule(rules.grab_many)

    async def one(start: int) -> None:
        async with sem:
            results = await led.write(rule, items[start:start + BATCH_ITEMS])
        assert all(r.amount_fen > 0 for r in results), "a grab did not get a share"

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, len(items), BATCH_ITEMS)))
    return time.perf_counter() - t0


async def _credit_all(led: LmdbLedger, grabs: int, tally: _Tally) -> int:
    """The credit consumer's rule, one batch of CREDIT_LIMIT at a time, until none is left."""
    applied = 0
    for _ in range(grabs // CREDIT_LIMIT + 2):  # bounded: every call credits up to the limit
        n = await led.write(tally.rule(rules.apply_credits), CREDIT_LIMIT)
        applied += n
        if n == 0:
            break
    return applied


def run_storage(root: Path, envelopes: int, users: int) -> dict:
    """The phases on a fresh ledger; usage after each, writes counted per phase."""
    path = Path(tempfile.mkdtemp(dir=root))
    led = LmdbLedger(path)
    ledger_dir = path / "ledger"
    tallies = {"send": _Tally(), "grab": _Tally(), "credit": _Tally()}
    try:
        asyncio.run(_fund(led, envelopes))
        u0 = usage(led, ledger_dir)
        ids = asyncio.run(_send(led, envelopes, tallies["send"]))
        u_sent = usage(led, ledger_dir)
        items = _grab_items(ids, users)
        grab_s = asyncio.run(_grab_all(led, items, tallies["grab"]))
        u_grabbed = usage(led, ledger_dir)
        applied = asyncio.run(_credit_all(led, len(items), tallies["credit"]))
        assert applied == len(items), (applied, len(items))
        u_credited = usage(led, ledger_dir)
        report = asyncio.run(led.audit())
        assert report.balanced, report.discrepancies
    finally:
        led.close()
        shutil.rmtree(path, ignore_errors=True)
    return {"envelopes": envelopes, "grabs": len(items), "users": users, "grab_s": grab_s,
            "usage": {"start": u0, "sent": u_sent, "grabbed": u_grabbed,
                      "credited": u_credited},
            "tallies": tallies}


# -- printing the storage figures ---------------------------------------------------------------


def _delta(a: dict, b: dict, table: str, field: str) -> int:
    return b["tables"][table][field] - a["tables"][table][field]


def _print_tables(r: dict) -> None:
    u = r["usage"]
    phases = ((u["start"], u["sent"], r["envelopes"]), (u["sent"], u["grabbed"], r["grabs"]),
              (u["sent"], u["credited"], r["grabs"]))
    print(f"  {'':<14}{'per envelope, after sends':>27}{'per grab, before credit':>27}"
          f"{'per grab, credited':>27}")
    print(f"  {'table':<14}" + f"{'entries':>9}{'page B':>8}{'k+v B':>10}" * 3)
    for t in keys.TABLES:
        cells = "".join(f"{_delta(a, b, t, 'entries') / n:>9.2f}"
                        f"{_delta(a, b, t, 'page_b') / n:>8.1f}"
                        f"{_delta(a, b, t, 'payload_b') / n:>10.1f}" for a, b, n in phases)
        print(f"  {t:<14}{cells}")


def _sums(a: dict, b: dict) -> tuple[int, int]:
    pages = sum(_delta(a, b, t, "page_b") for t in keys.TABLES)
    payload = sum(_delta(a, b, t, "payload_b") for t in keys.TABLES)
    return pages, payload


def _print_storage(r: dict) -> dict:
    u = r["usage"]
    e, g = r["envelopes"], r["grabs"]
    print(f"storage, hotpath={hotpath.IMPLEMENTATION}: {e:,} envelopes of {SHARES} shares, "
          f"{g:,} grabs by {r['users']:,} users ({g / r['grab_s']:,.0f} grabs/s), "
          f"page {u['start']['psize']} B")
    _print_tables(r)
    env_pages, env_payload = _sums(u["start"], u["sent"])
    grab_pages, grab_payload = _sums(u["sent"], u["credited"])
    env_used = (u["sent"]["used_b"] - u["start"]["used_b"]) / e
    grab_used = (u["credited"]["used_b"] - u["sent"]["used_b"]) / g
    print(f"  per envelope: {env_pages / e:,.0f} B in table pages ({env_payload / e:,.0f} B "
          f"keys + values), {env_used:,.0f} B of used file pages "
          f"[{'PASS' if env_pages / e <= GOAL_ENVELOPE_B else 'MISS'}: goal <= "
          f"{GOAL_ENVELOPE_B} B]")
    print(f"  per grab, credited: {grab_pages / g:,.0f} B in table pages ({grab_payload / g:,.0f}"
          f" B keys + values), {grab_used:,.0f} B of used file pages "
          f"[{'PASS' if grab_pages / g <= GOAL_GRAB_B else 'MISS'}: goal <= {GOAL_GRAB_B} B]")
    for name in ("start", "sent", "grabbed", "credited"):
        x = u[name]
        free = "n/a (no mdb_stat)" if x["free_pages"] is None else f"{x['free_pages']:,}"
        print(f"  {name:<9} used {x['used_b'] / 2**20:8.1f} MiB, free pages {free:>8}, "
              f"data.mdb {x['file_b'] / 2**20:8.1f} MiB (allocated "
              f"{x['file_alloc_b'] / 2**20:.1f} MiB)")
    return {"envelope_b": env_pages / e, "envelope_used_b": env_used,
            "grab_b": grab_pages / g, "grab_used_b": grab_used,
            "grab_payload_b": grab_payload / g}


def _print_writes(r: dict) -> dict:
    t = r["tallies"]
    e, g = r["envelopes"], r["grabs"]
    print("  LMDB writes (puts + deletes) by table: per envelope sent; per grab, grabbing and "
          "crediting")
    print(f"  {'table':<14}{'send':>8}{'grab':>8}{'credit':>8}")
    total = collections.Counter()
    for table in keys.TABLES:
        row = [(t[p].puts[table] + t[p].deletes[table]) for p in ("send", "grab", "credit")]
        if any(row):
            total.update({"send": row[0], "grab": row[1], "credit": row[2]})
            print(f"  {table:<14}{row[0] / e:>8.2f}{row[1] / g:>8.2f}{row[2] / g:>8.2f}")
    per_grab = (total["grab"] + total["credit"]) / g
    print(f"  {'total':<14}{total['send'] / e:>8.2f}{total['grab'] / g:>8.2f}"
          f"{total['credit'] / g:>8.2f}   grab + credit {per_grab:.2f} "
          f"[{'PASS' if per_grab <= GOAL_GRAB_WRITES else 'MISS'}: goal <= {GOAL_GRAB_WRITES}]")
    return {"writes_per_grab": per_grab, "writes_per_envelope": total["send"] / e}


# -- a real gateway under sustained BatchGrab load ----------------------------------------------

LOAD_ENVELOPE_FEN = 2 * SHARES  # 1-3 fen a share: one card's top-up pays 5,000 envelopes
TOP_UP_FEN = 1_000_000  # the bank simulator's opening card balance
LOAD_USERS = 10_000  # grabbers; envelope j goes to users j*S .. j*S+S-1 (mod U)
SENDS_IN_FLIGHT = 16
QUEUED_ENVELOPES = 64  # sent, not yet grabbed: bounds the client's memory
GRAB_STREAMS = 2
STREAM_WINDOW = 2  # BatchGrab batches in flight per stream
STREAM_BATCHES = 500  # batches per stream before it is closed and another opened
RETRIES = 50  # refusals (shed, busy) of one call before the load gives up
RETRY_WAIT_MAX_S = 1.0
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0
SAMPLE_S = 1.0
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in bytes (/proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in STATUS_FIELDS:
                out[name] = int(rest.split()[0]) * 1024
    return out


class LoadStack:
    """A bank simulator and one ``hongbao serve`` worker, real processes on loopback (port 0),
    stopped by pid (SIGTERM, a bounded wait, SIGKILL) whatever happens."""

    def __init__(self, root: Path, *gateway_args: str, settings: str = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Admission off: the client keeps the worker saturated on purpose, and the controller
        # would rightly shed its sends for as long as that lasts (a soak measures memory).
        # ``settings``: more TOML lines (gateway/config.py), for runs that isolate a cause.
        config = root / "load.toml"
        # A few senders send at thousands a second: no per-user limit (USER_RATE_LIMITED).
        config.write_text(f"qos_enabled = false\nuser_rate_per_s = 0\n{settings}\n")
        self.data_dir = root / "gw"
        self.ledger_file = self.data_dir / "ledger" / "data.mdb"
        self.bank = banksim_proc(root / "bank", "--log-level", "warning",
                                 log_path=root / "banksim.log")
        self.gateway = gateway_proc(self.data_dir, "--config", str(config), *gateway_args,
                                    log_path=root / "gateway.log")

    def __enter__(self) -> LoadStack:
        try:
            self.bank.start()
            self.gateway.cmd += ["--bank", self.bank.target]
            self.gateway.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gateway.stop()
        self.bank.stop()

    def backlog(self) -> int:
        """Grabs not credited yet (the credit outbox's entries), read in one short read
        transaction: a long one would keep LMDB from reusing the pages the writer frees."""
        # A fresh read-only environment each time: the writer grows the map as it goes, and
        # an environment opened earlier would refuse to read past its map (MapResizedError).
        snapshot = LmdbSnapshot(self.data_dir)
        try:
            return snapshot.read(reads.credit_backlog)
        finally:
            snapshot.close()

    def drain(self, timeout_s: float) -> float:
        """Waits (bounded) until every grab is credited; the seconds it took."""
        t0 = time.monotonic()
        while self.backlog() and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)
        if self.backlog():
            raise TimeoutError(f"credit backlog {self.backlog():,} after {timeout_s:.0f} s")
        return time.monotonic() - t0

    def spec(self, envelopes: int, seconds: float) -> dict:
        """What the client process needs: target, tickets, how many envelopes, for how long."""
        ring = tickets.KeyRing.load_or_create(self.data_dir)
        senders = -(-envelopes * LOAD_ENVELOPE_FEN // TOP_UP_FEN)
        return {"target": self.gateway.target, "envelopes": envelopes,
                "seconds": seconds,
                "senders": [tickets.mint(ring, f"s{i}", ["pay"], 86_400)[0]
                            for i in range(senders)],
                "upstream": tickets.mint(ring, "upstream", ["batch"], 86_400)[0]}

    def reconcile(self, timeout_s: float) -> str:
        """``hongbao reconcile`` against the live books and the bank; raises unless BALANCED."""
        rec = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile",
                              "--data-dir", str(self.data_dir), "--bank", self.bank.target],
                             capture_output=True, text=True, timeout=timeout_s)
        if rec.returncode != 0 or "NOT BALANCED" in rec.stdout or "BALANCED" not in rec.stdout:
            raise RuntimeError(f"reconcile failed:\n{rec.stdout}{rec.stderr}")
        return next(line.strip() for line in rec.stdout.splitlines() if "BALANCED" in line)


# -- the client process: top-ups, sends by balance, BatchGrab ----------------------------------


class _Lines:
    """The client's side of the pipe: one JSON list a line on stdout, flushed."""

    def send(self, message: tuple) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def _client_main() -> None:
    """``bench_storage.py --load-client``: the spec on stdin; progress, then totals, on stdout.
    A process of its own (not a fork: grpc's threads), started the same way from a script,
    ``hongbao bench`` and the soak test."""
    conn = _Lines()
    try:
        spec = json.loads(sys.stdin.read())
        conn.send(("result", asyncio.run(_client(spec, conn))))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


async def _retrying(call: Callable[[], Any], refused: collections.Counter) -> Any:
    """A unary call retried (bounded) while the gateway sheds or the butler is busy."""
    for attempt in range(RETRIES):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED) or attempt == RETRIES - 1:
                raise
            refused[f"{err.code().name} ({err.details()})"] += 1
            await asyncio.sleep(min(0.05 * (attempt + 1), RETRY_WAIT_MAX_S))
    raise AssertionError("unreachable")


async def _produce(c: Client, spec: dict, queue: asyncio.Queue, refused: collections.Counter
                   ) -> None:
    """Envelopes paid from wallets into ``queue`` until the count or the time is reached;
    each sender tops up once from its card and pays TOP_UP_FEN // LOAD_ENVELOPE_FEN."""
    per_sender = TOP_UP_FEN // LOAD_ENVELOPE_FEN
    metas = [Client.bearer(t) for t in spec["senders"]]
    deadline = time.monotonic() + spec["seconds"]
    sem = asyncio.Semaphore(SENDS_IN_FLIGHT)

    async def send(j: int) -> None:
        meta = metas[j // per_sender]
        r = await _retrying(lambda: c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id=f"e{j}", total_fen=LOAD_ENVELOPE_FEN, count=SHARES,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_BALANCE),
            metadata=meta, timeout=CALL_TIMEOUT_S), refused)
        await queue.put((j, r.envelope_id))

    async def bounded(j: int) -> None:
        try:
            await send(j)
        finally:
            sem.release()

    tasks = set()
    for j in range(spec["envelopes"]):
        if time.monotonic() > deadline:
            break
        if j % per_sender == 0:
            await _retrying(lambda j=j: c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id="top", card_id=f"icbc-{j // per_sender:06d}", amount_fen=TOP_UP_FEN),
                metadata=metas[j // per_sender], timeout=CALL_TIMEOUT_S), refused)
        await sem.acquire()
        task = asyncio.ensure_future(bounded(j))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    for _ in range(GRAB_STREAMS):
        await queue.put(None)


def _batch(envs: list[tuple[int, str]], batch_id: int) -> bytes:
    return envelope_pb2.BatchGrabRequest(batch_id=batch_id, items=[
        envelope_pb2.BatchGrabItem(user_id=f"g{(j * SHARES + k) % LOAD_USERS:05d}",
                                   envelope_id=e, request_id="b")
        for j, e in envs for k in range(SHARES)]).SerializeToString()


async def _stream(batch_grab: Any, meta: Any, queue: asyncio.Queue, tally: collections.Counter,
                  refused: collections.Counter, conn: Any) -> bool:
    """One BatchGrab call of up to STREAM_BATCHES batches; False once the queue has ended.
    A call that fails loses the grabs of its batches in flight (their shares stay in escrow)."""
    call = batch_grab(metadata=meta, timeout=CALL_TIMEOUT_S * 5)
    window = asyncio.Semaphore(STREAM_WINDOW)
    more = True

    async def write() -> None:
        nonlocal more
        for n in range(STREAM_BATCHES):
            envs = []
            while len(envs) < BATCH_ITEMS // SHARES:
                item = await queue.get()
                if item is None:
                    more = False
                    break
                envs.append(item)
            if envs:
                await window.acquire()
                await call.write(_batch(envs, n))
            if not more:
                break
        await call.done_writing()

    writer = asyncio.ensure_future(write())
    try:
        while (resp := await call.read()) is not grpc.aio.EOF:
            window.release()
            for r in resp.results:
                tally[r.reason if r.code else envelope_pb2.GrabOutcome.Name(r.outcome)] += 1
            conn.send(("progress", tally["GRAB_OUTCOME_GRABBED"]))
        await writer
    except grpc.aio.AioRpcError as err:
        refused[f"stream {err.code().name}"] += 1
        if sum(refused.values()) > RETRIES * 100:
            raise
    finally:
        writer.cancel()
    return more


async def _client(spec: dict, conn: Any) -> dict:
    tally: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    queue: asyncio.Queue = asyncio.Queue(QUEUED_ENVELOPES)
    async with Client(spec["target"]) as c:
        await asyncio.wait_for(c.channel.channel_ready(), START_TIMEOUT_S)
        batch_grab = c.channel.stream_stream(
            "/hongbao.v1.EnvelopeService/BatchGrab", request_serializer=None,
            response_deserializer=envelope_pb2.BatchGrabResponse.FromString)
        meta = Client.bearer(spec["upstream"])
        conn.send(("ready", None))

        async def streams() -> None:
            for _ in range(spec["envelopes"]):  # bounded; each call ends or the queue does
                if not await _stream(batch_grab, meta, queue, tally, refused, conn):
                    return

        t0 = time.perf_counter()
        await asyncio.gather(_produce(c, spec, queue, refused),
                             *(streams() for _ in range(GRAB_STREAMS)))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "outcomes": dict(tally), "refused": dict(refused),
            "grabbed": tally["GRAB_OUTCOME_GRABBED"]}


# -- the parent: the client process, samples of the worker ------------------------------------


def proc_cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds, all threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(stack: LoadStack, t0: float, grabbed: int) -> dict:
    """The worker's memory and CPU, data.mdb's size and the credit backlog, now."""
    return {"t_s": time.monotonic() - t0, "grabbed": grabbed,
            "file_b": stack.ledger_file.stat().st_size, "cpu_s": proc_cpu_s(stack.gateway.pid),
            "backlog": stack.backlog(),
            **proc_status(stack.gateway.pid)}


class _ClientProc:
    """The client as a child process (this file with ``--load-client``), its messages read
    from its stdout without blocking past a deadline; stopped by its pid."""

    def __init__(self, spec: dict, log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--load-client"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(spec).encode())
        self.popen.stdin.close()
        self.fd = self.popen.stdout.fileno()
        self.buf = b""

    def messages(self, timeout_s: float) -> list:
        """The complete lines that arrive within ``timeout_s`` (maybe none)."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if ready:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the client exited with {self.popen.wait(10)}")
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.startswith(b"[")]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        assert self.popen.stdout is not None
        self.popen.stdout.close()


def drive(stack: LoadStack, *, envelopes: int, seconds: float, timeout_s: float,
          checkpoint_grabs: int = 0) -> dict:
    """Runs the client process against ``stack``; samples the worker every SAMPLE_S seconds
    and, when ``checkpoint_grabs`` is set, each time that many more grabs have been answered.
    Everything is bounded by ``timeout_s``; the client is stopped by pid however it ends."""
    client = _ClientProc(stack.spec(envelopes, seconds), stack.root / "client.log")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    samples, checkpoints = [sample(stack, t0, 0)], [sample(stack, t0, 0)]
    grabbed, result = 0, None
    try:
        next_sample = t0 + SAMPLE_S
        while result is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load did not finish in {timeout_s:.0f} s "
                                   f"({grabbed:,} grabs)")
            for kind, payload in client.messages(min(next_sample, deadline) - time.monotonic()):
                if kind == "error":
                    raise RuntimeError(f"client process: {payload}; see {stack.root}")
                if kind == "result":
                    result = payload
                elif kind == "progress":
                    grabbed = payload
                    if checkpoint_grabs and grabbed >= len(checkpoints) * checkpoint_grabs:
                        checkpoints.append(sample(stack, t0, grabbed))
            if time.monotonic() >= next_sample:
                samples.append(sample(stack, t0, grabbed))
                next_sample += SAMPLE_S
    finally:
        client.stop()
    checkpoints.append(sample(stack, t0, grabbed))
    return {**result, "samples": samples, "checkpoints": checkpoints}


def run_rss(root: Path, seconds: float) -> dict:
    """``seconds`` of sustained BatchGrab load on a fresh stack; reconcile after."""
    with LoadStack(root) as stack:
        run = drive(stack, envelopes=10_000_000, seconds=seconds, timeout_s=seconds + 120)
        run["drain_s"] = stack.drain(timeout_s=300)
        run["drained"] = sample(stack, time.monotonic(), run["grabbed"])
        run["check"] = stack.reconcile(timeout_s=300)
    return run


def _print_rss(run: dict) -> dict:
    s = run["samples"]
    mib = 2 ** 20

    def at(t_s: float) -> dict:
        return next((x for x in s if x["t_s"] >= t_s), s[-1])

    print(f"worker RSS under BatchGrab load: {run['grabbed']:,} grabs in {run['seconds']:.1f} s "
          f"({run['grabbed'] / run['seconds']:,.0f}/s); refused {run['refused'] or 'none'}; "
          f"{run['check']}")
    print(f"  {'t s':>5}{'grabs':>11}{'VmRSS MiB':>11}{'RssAnon':>9}{'RssFile':>9}"
          f"{'data.mdb MiB':>14}{'worker CPU':>12}{'not credited':>14}")
    prev = s[0]
    for t in (0, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240):
        if t <= s[-1]["t_s"]:
            x = at(t)
            share = (x["cpu_s"] - prev["cpu_s"]) / max(x["t_s"] - prev["t_s"], 1e-9)
            print(f"  {x['t_s']:>5.0f}{x['grabbed']:>11,}{x['VmRSS'] / mib:>11.1f}"
                  f"{x['RssAnon'] / mib:>9.1f}{x['RssFile'] / mib:>9.1f}"
                  f"{x['file_b'] / mib:>14.1f}{share:>12.2f}{x['backlog']:>14,}")
            prev = x
    d = run["drained"]
    print(f"  credits drained {run['drain_s']:.1f} s after the load: data.mdb "
          f"{d['file_b'] / mib:.1f} MiB ({d['file_b'] / max(run['grabbed'], 1):,.0f} B a grab), "
          f"VmRSS {d['VmRSS'] / mib:.1f} MiB, RssAnon {d['RssAnon'] / mib:.1f} MiB")
    later = [x for x in s if x["t_s"] >= s[-1]["t_s"] / 2]
    figures = {}
    for field in ("VmRSS", "RssAnon"):
        warm, steady = at(10)[field] / mib, statistics.median(x[field] for x in later) / mib
        peak = max(x[field] for x in s) / mib
        print(f"  {field}: warm-up (10 s) {warm:.1f} MiB, steady (median of the last half) "
              f"{steady:.1f} MiB, max {peak:.1f} MiB "
              f"[{'PASS' if peak <= GOAL_RSS_MIB else 'MISS'}: goal <= {GOAL_RSS_MIB} MiB]")
        figures.update({f"{field}_warm_mib": warm, f"{field}_steady_mib": steady,
                        f"{field}_max_mib": peak})
    print(f"  VmHWM {s[-1]['VmHWM'] / mib:.1f} MiB; RssFile is the part of data.mdb's map the "
          f"worker has read (clean, shared page cache)")
    return {**figures, "load_grabs_per_s": run["grabbed"] / run["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envelopes", type=int, default=1000, help="100-share envelopes in process")
    ap.add_argument("--users", type=int, default=1000, help="grabbers in process")
    ap.add_argument("--rss-s", type=float, default=60.0, help="seconds of load (0 skips)")
    ap.add_argument("--dir", default=os.environ.get("HONGBAO_BENCH_DIR", "."),
                    help="where the LMDB files go (a real disk, so fsync is real)")
    ap.add_argument("--load-client", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_client:
        _client_main()
        return {}
    root = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir))
    try:
        r = run_storage(root, args.envelopes, args.users)
        figures = {**_print_storage(r), **_print_writes(r)}
        if args.rss_s > 0:
            figures.update(_print_rss(run_rss(root / "rss", args.rss_s)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
