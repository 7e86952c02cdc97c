"""Unary cost: hongbao against an empty grpc.aio server, and one worker against two.

1. Cost per call. Five servers run side by side, each pinned to CPU 0 (every thread,
   ``os.sched_setaffinity`` right after spawn, when this process may use 2 CPUs or
   more): the empty grpc.aio server (``bench/empty_server.py``: the same services
   answering prebuilt responses of the same types and sizes, no interceptors) on
   asyncio's loop (the goal's baseline) and on uvloop (hongbao's default loop), and
   ``hongbao serve`` three ways (``SETTINGS``): the defaults (access log on),
   ``access_log = false``, and ``access_log = false`` with ``qos_enabled = false``.
   A real bank simulator funds the senders (TopUp). The load generators run on CPU 1
   with this process. For GetBalance, GrabEnvelope and SendEnvelope
   (PAY_METHOD_BALANCE), two generators, each at the same concurrency against every
   server, in turns (the order flips every run):

   - h2load (``bench/h2load.py``: one prebuilt body, 4 connections x 16 streams):
     the same call over and over, so GetBalance is one user's real read, but
     GrabEnvelope is one user re-grabbing one envelope (an ALREADY_GRABBED replay:
     the grab gate, then one LMDB read to confirm) and SendEnvelope a retry of one
     request id (an idempotent replay through the writer);
   - the project's asyncio generator (``gateway.client.Client``, one channel, 64
     calls in flight, a separate process): distinct users for GetBalance, a fresh
     (user, envelope) pair for every GrabEnvelope (a real grab: gate, group commit,
     credit outbox; the outcomes are counted) and a fresh request id for every
     SendEnvelope (a real send: split, group commit).

   Figures: OK calls/s, p50, p99 (of every answer) and server CPU per OK call
   (``/proc/<pid>/stat`` utime + stime of the server's processes across the measured
   interval, over the calls hongbao's own counters say it answered OK:
   ``hongbao_rpc_requests_total`` and ``hongbao_shed_total`` from its metrics page;
   h2load counts HTTP 200 even when grpc-status is not 0). A closed loop saturates a
   pinned worker, and with the defaults admission then sheds (P0 too, by user
   priority): those refusals are counted as answers not OK, and their CPU is charged
   to the OK calls. Ratio hongbao / empty (goal <= 1.25) and efficiency empty /
   hongbao (goal >= 0.8), every run's figure printed.
2. Workers: ``hongbao serve --workers 1`` against ``--workers 2`` (not pinned: the
   workers and h2load may use both CPUs), with the defaults and with the quietest
   settings, h2load with 16 connections x 8 streams (SO_REUSEPORT spreads connections,
   not calls, over the workers) and no per-request log, GetBalance and the
   GrabEnvelope replay; OK calls/s ratio (goal >= 1.7). h2load's own CPU share and
   the workers' are printed: what h2load takes, the workers cannot have.

    python bench/bench_unary.py [--seconds 3] [--runs 2] [--sections cost,workers]
                                [--generators h2load,asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from gateway.client import Client
from gateway.errors import reason_of
from gateway.ops.procs import Proc, banksim_proc, gateway_proc
from gateway.security import tickets
from hongbao.v1 import envelope_pb2, wallet_pb2

HERE = Path(__file__).resolve().parent
METHODS = {
    "GetBalance": "/hongbao.v1.WalletService/GetBalance",
    "GrabEnvelope": "/hongbao.v1.EnvelopeService/GrabEnvelope",
    "SendEnvelope": "/hongbao.v1.EnvelopeService/SendEnvelope",
}
# What each generator exercises, per method (printed beside the figures).
EXERCISES = {
    ("GetBalance", "h2load"): "one user's balance, read again and again",
    ("GetBalance", "asyncio"): "100 users' balances in turn",
    ("GrabEnvelope", "h2load"): "one user re-grabbing one envelope: ALREADY_GRABBED replay",
    ("GrabEnvelope", "asyncio"): "a fresh (user, envelope) each call: real grabs",
    ("SendEnvelope", "h2load"): "a retry of one request id: idempotent replay",
    ("SendEnvelope", "asyncio"): "a fresh request id each call: real sends by balance",
}
SENDERS = 100  # topped up; they send, and read their balances
GRABBERS = 100  # one grab each per envelope: an envelope has GRABBERS shares
TOP_UP_FEN = 5_000_000  # per sender (the gateway's max_top_up_fen)
SEND_FEN, SEND_COUNT = 500, 5
GRAB_ENVELOPE_FEN = 10_000
GRAB_RATE_GUESS = 8_000  # grabs/s the prepared envelopes must last for
MAX_ENVELOPES = 1_000
INFLIGHT = 64  # the asyncio generator's calls in flight; h2load: H2_CLIENTS x H2_STREAMS
H2_CLIENTS, H2_STREAMS = 4, 16
WORKERS_CLIENTS, WORKERS_STREAMS = 16, 8
CALL_TIMEOUT_S = 10.0
WARMUP_S = 0.5
SETTLE_S, SETTLE_MAX_S, SETTLE_BUSY = 0.2, 5.0, 0.10  # wait for a quiet server
START_TIMEOUT_S = 60.0
# hongbao's settings under test: label -> --config TOML ("" = the defaults). The last one
# takes admission out too: a pinned worker in a closed loop is saturated, and admission
# then sheds (P0 included, by user priority), which makes the calls answered cheaper.
# Every variant turns the per-user rate limit off: h2load's replays are one user's calls
# at thousands a second, which the limit exists to refuse (USER_RATE_LIMITED).
_NO_USER_LIMIT = "user_rate_per_s = 0\n"
SETTINGS = {
    "hongbao default": _NO_USER_LIMIT,
    "hongbao no log": _NO_USER_LIMIT + "access_log = false\n",
    "hongbao no log no QoS": _NO_USER_LIMIT + "access_log = false\nqos_enabled = false\n",
}
WORKER_SETTINGS = ("hongbao default", "hongbao no log no QoS")
# The baselines: grpc.aio on asyncio's own loop (the goal's), and on uvloop (hongbao's loop).
EMPTY, EMPTY_UVLOOP = "empty grpc.aio", "empty grpc.aio uvloop"
GOAL_RATIO, GOAL_WORKERS = 1.25, 1.7
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r'^hongbao_(rpc_requests|shed)_total\{(.*)\} ([0-9.e+]+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _sibling(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


h2 = _sibling("h2load")


# -- processes: CPU time, pinning, counters ---------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its children (a --workers N supervisor's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    kids.append(int(entry.name))
    return [pid, *kids]


def _cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / _CLK_TCK


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its children onto ``cpus`` (new threads inherit)."""
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


class Server:
    """A server under test. A plain class, not a dataclass: ``hongbao bench`` loads this file
    without putting it in ``sys.modules``, where dataclasses look up string annotations."""

    def __init__(self, label: str, proc: Proc, cpus: set[int], log_path: Path | None = None,
                 data_dir: Path | None = None) -> None:
        self.label, self.proc, self.cpus = label, proc, cpus
        self.log_path, self.data_dir = log_path, data_dir
        self.metrics_ports: list[int] = []
        self.tickets: list[str] = []
        self.bodies: dict = {}  # method -> (h2load request, ticket)

    @property
    def hongbao(self) -> bool:
        return self.data_dir is not None

    def cpu_s(self) -> float:
        return _cpu_s(_tree(self.proc.pid))

    def counts(self) -> Counter:
        """(method, code) -> calls answered, summed over the workers' metrics pages."""
        total: Counter = Counter()
        for port in self.metrics_ports:
            total += _port_counts(port)
        return total

    def settle(self) -> float:
        """Waits (at most SETTLE_MAX_S) until the server is nearly idle; its last busy share."""
        deadline = time.monotonic() + SETTLE_MAX_S
        while True:
            before = self.cpu_s()
            time.sleep(SETTLE_S)
            busy = (self.cpu_s() - before) / SETTLE_S
            if busy < SETTLE_BUSY or time.monotonic() > deadline:
                return busy


def _port_counts(port: int) -> Counter:
    """(method, code) -> ``hongbao_rpc_requests_total`` of one worker's metrics page, and
    (SHED, reason) -> ``hongbao_shed_total``: a call shed by admission is not in the first
    (it never reaches the handler), and the shed counter has no method label (an interval
    measures one method, so its sheds are that method's)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts: Counter = Counter()
    for family, labels, value in _SAMPLE.findall(text):
        d = dict(_LABEL.findall(labels))
        key = (d["method"], d["code"]) if family == "rpc_requests" else ("SHED", d["reason"])
        counts[key] += int(float(value))
    return counts


def _metrics_ports(log_path: Path, want: int) -> list[int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ports = []
        for line in log_path.read_text(errors="replace").splitlines():
            if '"metrics_serving"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    ports.append(int(json.loads(line)["port"]))
        if len(ports) >= want:
            return ports
        time.sleep(0.05)
    raise TimeoutError(f"{want} metrics ports not logged in {log_path}")


def _start_empty(stack: contextlib.ExitStack, root: Path, cpus: set[int],
                 loop: str = "asyncio") -> Server:
    port_file = root / f"empty-{loop}.port"
    proc = Proc([sys.executable, str(HERE / "empty_server.py"), "--port", "0", "--port-file",
                 str(port_file), "--loop", loop], port_file, root / f"empty-{loop}.log")
    stack.callback(proc.stop)
    proc.start(START_TIMEOUT_S)
    _pin(proc.pid, cpus)
    return Server(EMPTY if loop == "asyncio" else EMPTY_UVLOOP, proc, cpus)


def _start_gateway(stack: contextlib.ExitStack, root: Path, label: str, bank: str,
                   cpus: set[int], *extra: str, workers: int = 1) -> Server:
    """``hongbao serve`` (stopped when ``stack`` closes), pinned, funded, with tickets."""
    data_dir = root / label.replace(" ", "-")
    log_path = root / f"{label.replace(' ', '-')}.log"
    proc = gateway_proc(data_dir, "--metrics-port", "0", "--workers", str(workers), *extra,
                        bank=bank, log_path=log_path)
    srv = Server(label, proc, cpus, log_path, data_dir)
    stack.callback(proc.stop)
    proc.start(START_TIMEOUT_S)
    _pin(proc.pid, cpus)
    srv.metrics_ports = _metrics_ports(log_path, workers)
    _pin(proc.pid, cpus)  # the workers of a supervisor, once they all serve
    ring = tickets.KeyRing.load_or_create(data_dir)
    users = [f"s{i}" for i in range(SENDERS)] + [f"u{i}" for i in range(GRABBERS)]
    srv.tickets = [tickets.mint(ring, u, ["pay", "grab", "read"], 3600)[0] for u in users]
    srv.bodies = asyncio.run(_prepare(srv, label))
    return srv


# -- funding and the h2load bodies --------------------------------------------------------


async def _top_up(c: Client, meta, i: int, label: str) -> None:
    """One sender's top-up; a refusal by the butler (BANK_BUSY) is retried a few times."""
    for attempt in range(5):
        try:
            r = await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id=f"fund-{label}-{attempt}", card_id=f"icbc-{i}",
                amount_fen=TOP_UP_FEN), metadata=meta, timeout=CALL_TIMEOUT_S)
            if r.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED:
                return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"sender s{i} could not be funded")


async def _prepare(srv: Server, label: str) -> dict:
    """Funds the senders; returns the h2load request per method (and the user it acts as),
    each already answered once, so h2load's repeats are replays."""
    metas = [Client.bearer(t) for t in srv.tickets]
    async with Client(srv.proc.target) as c:
        sem = asyncio.Semaphore(8)

        async def fund(i: int) -> None:
            async with sem:
                await _top_up(c, metas[i], i, label.replace(" ", "-"))

        await asyncio.gather(*(fund(i) for i in range(SENDERS)))
        send = envelope_pb2.SendEnvelopeRequest(
            request_id="h2-send", total_fen=SEND_FEN, count=SEND_COUNT,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_BALANCE)
        await c.envelopes.SendEnvelope(send, metadata=metas[0], timeout=CALL_TIMEOUT_S)
        env = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id="h2-grab-env", total_fen=GRAB_ENVELOPE_FEN, count=GRABBERS,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_BALANCE),
            metadata=metas[0], timeout=CALL_TIMEOUT_S)
        grab = envelope_pb2.GrabEnvelopeRequest(envelope_id=env.envelope_id, request_id="h2-grab")
        await c.envelopes.GrabEnvelope(grab, metadata=metas[SENDERS], timeout=CALL_TIMEOUT_S)
    return {"GetBalance": (wallet_pb2.GetBalanceRequest(), srv.tickets[0]),
            "SendEnvelope": (send, srv.tickets[0]),
            "GrabEnvelope": (grab, srv.tickets[SENDERS])}


# -- one measured interval ----------------------------------------------------------------


def _measure(srv: Server, method: str, load) -> dict:
    """Runs ``load()`` (a generator's measured interval) against a settled server; its
    figures plus the server's CPU per call answered."""
    idle = srv.settle()
    counts0 = srv.counts() if srv.hongbao else Counter()
    cpu0 = srv.cpu_s()
    fig = load()
    cpu = srv.cpu_s() - cpu0
    path = METHODS[method]
    if srv.hongbao:
        delta = srv.counts() - counts0
        codes = {code if m == path else f"SHED:{code}": n for (m, code), n in delta.items()
                 if m in (path, "SHED")}
        fig["server_codes"] = codes
        fig["answered"] = sum(codes.values())
        fig["not_ok"] = fig["answered"] - codes.get("OK", 0)
    else:
        fig["answered"] = fig["calls"]  # the empty server answers OK to everything
        fig["not_ok"] = 0
    fig["ok"] = fig["answered"] - fig["not_ok"]
    fig["ok_rps"] = fig["ok"] / fig["seconds"] if fig["seconds"] else 0.0
    fig["server_cpu_s"] = cpu
    fig["cpu_us"] = cpu / fig["answered"] * 1e6 if fig["answered"] else math.nan
    fig["cpu_us_ok"] = cpu / fig["ok"] * 1e6 if fig["ok"] else math.nan
    fig["server_busy"] = cpu / fig["seconds"] if fig["seconds"] else math.nan
    fig["idle_busy_before"] = idle
    return fig


def _h2load_load(srv: Server, method: str, body: tuple, seconds: float, cpus: set[int],
                 clients: int = H2_CLIENTS, streams: int = H2_STREAMS,
                 latencies: bool = True):
    message, ticket = body
    target = srv.proc.target

    def load() -> dict:
        r = h2.run(target, METHODS[method], message, ticket=ticket, duration_s=seconds,
                   clients=clients, streams=streams, latencies=latencies, cpus=cpus)
        return {"calls": r.succeeded, "http_failed": r.failed + r.errored + r.timeout,
                "seconds": r.elapsed_s, "rps": r.requests_per_s, "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms, "gen_cpu_s": r.cpu_s}

    # A short unmeasured run first: connections, ticket cache, the first replay.
    h2.run(target, METHODS[method], message, ticket=ticket, requests=max(200, clients * 4),
           clients=clients, streams=streams, latencies=False, cpus=cpus)
    return load


class _Child:
    """A generator process (this file with ``--generate``): one JSON line in, lines out."""

    def __init__(self, spec: dict, cpus: set[int]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                      "--generate"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self.proc.pid, cpus)
        self._buf = b""
        self.send(json.dumps(spec))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def readline(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"the load generator said nothing in {timeout_s} s")
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the load generator exited ({self.proc.wait(10)})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def _asyncio_load(srv: Server, method: str, tickets_: list[str], seconds: float, tag: str,
                  cpus: set[int]):
    """A prepared, warmed-up generator process; yields its measured interval as a call."""
    spec = {"target": srv.proc.target, "method": method, "tickets": tickets_,
            "seconds": seconds, "tag": tag, "inflight": INFLIGHT}
    child = _Child(spec, cpus)
    try:
        ready = child.readline(START_TIMEOUT_S + seconds)
        if ready != "ready":
            raise RuntimeError(f"the load generator said {ready!r}")

        def load() -> dict:
            child.send("go")
            return json.loads(child.readline(seconds + 2 * CALL_TIMEOUT_S))

        yield load
    finally:
        child.stop()


# -- the generator process ----------------------------------------------------------------


class _Calls:
    """The asyncio generator's calls: distinct users, envelopes and request ids."""

    def __init__(self, client: Client, method: str, tickets_: list[str], tag: str) -> None:
        self.c, self.method, self.tag = client, method, tag
        metas = [Client.bearer(t) for t in tickets_]
        self.senders, self.grabbers = metas[:SENDERS], metas[SENDERS:]
        self.seq = 0
        self.pairs: list[tuple[str, int]] = []
        self.resp_bytes = 0
        self.outcomes: Counter[str] = Counter()  # GrabEnvelope answers by outcome

    async def prepare(self, seconds: float, inflight: int) -> None:
        """For grabs: envelopes of GRABBERS shares enough for GRAB_RATE_GUESS grabs/s."""
        if self.method != "GrabEnvelope":
            return
        n = min(MAX_ENVELOPES, math.ceil(GRAB_RATE_GUESS * (seconds + WARMUP_S) / GRABBERS))
        sem = asyncio.Semaphore(inflight)

        async def send(i: int) -> str:
            async with sem:
                r = await self.c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                    request_id=f"{self.tag}-e{i}", total_fen=GRAB_ENVELOPE_FEN,
                    count=GRABBERS, kind=envelope_pb2.ENVELOPE_KIND_LUCKY,
                    pay_method=envelope_pb2.PAY_METHOD_BALANCE),
                    metadata=self.senders[i % SENDERS], timeout=CALL_TIMEOUT_S)
                return r.envelope_id

        envelopes = await asyncio.gather(*(send(i) for i in range(n)))
        self.pairs = [(e, u) for e in reversed(envelopes) for u in range(GRABBERS)]

    def next(self):
        """The next call's awaitable, or None when the prepared grabs are used up."""
        self.seq += 1
        seq = self.seq
        if self.method == "GetBalance":
            return self.c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                            metadata=self.senders[seq % SENDERS],
                                            timeout=CALL_TIMEOUT_S)
        if self.method == "SendEnvelope":
            return self.c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id=f"{self.tag}-s{seq}", total_fen=SEND_FEN, count=SEND_COUNT,
                kind=envelope_pb2.ENVELOPE_KIND_LUCKY,
                pay_method=envelope_pb2.PAY_METHOD_BALANCE),
                metadata=self.senders[seq % SENDERS], timeout=CALL_TIMEOUT_S)
        if not self.pairs:
            return None
        envelope_id, user = self.pairs.pop()
        return self.c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
            envelope_id=envelope_id, request_id=f"{self.tag}-g{seq}"),
            metadata=self.grabbers[user], timeout=CALL_TIMEOUT_S)

    async def run(self, seconds: float, inflight: int) -> dict:
        """A closed loop of ``inflight`` callers for ``seconds`` (calls started by then end)."""
        lat_ms: list[float] = []
        codes: Counter[str] = Counter()
        deadline = time.perf_counter() + seconds
        grabs = self.method == "GrabEnvelope"
        self.outcomes.clear()

        async def caller() -> None:
            while time.perf_counter() < deadline:
                call = self.next()
                if call is None:
                    return
                t = time.perf_counter()
                try:
                    r = await call
                    codes["OK"] += 1
                    self.resp_bytes = self.resp_bytes or r.ByteSize()
                    if grabs:
                        self.outcomes[envelope_pb2.GrabOutcome.Name(r.outcome)] += 1
                except grpc.aio.AioRpcError as err:
                    codes[f"{err.code().name}:{reason_of(err)}"] += 1
                lat_ms.append((time.perf_counter() - t) * 1000.0)

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(inflight)))
        elapsed = time.perf_counter() - t0
        lat_ms.sort()
        calls = sum(codes.values())
        return {"calls": calls, "seconds": elapsed, "rps": calls / elapsed if elapsed else 0.0,
                "p50_ms": h2.percentile(lat_ms, 0.5) if lat_ms else None,
                "p99_ms": h2.percentile(lat_ms, 0.99) if lat_ms else None,
                "gen_cpu_s": time.process_time() - cpu0, "client_codes": dict(codes),
                "resp_bytes": self.resp_bytes, "ran_out": grabs and not self.pairs,
                "outcomes": dict(self.outcomes)}


async def _generate(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    async with Client(spec["target"]) as c:
        await asyncio.wait_for(c.channel.channel_ready(), START_TIMEOUT_S)
        calls = _Calls(c, spec["method"], spec["tickets"], spec["tag"])
        await calls.prepare(spec["seconds"], spec["inflight"])
        await calls.run(WARMUP_S, spec["inflight"])
        print("ready", flush=True)
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return {"error": f"expected go, got {go!r}"}
        return await calls.run(spec["seconds"], spec["inflight"])


def _generate_main() -> int:
    spec = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(_generate(spec))), flush=True)
    return 0


# -- the two sections ---------------------------------------------------------------------


def _cost_cell(srv: Server, ref: Server, method: str, gen: str, run: int, seconds: float,
               load_cpus: set[int]) -> dict:
    """One measured interval of ``gen`` against ``srv`` (``ref`` lends the empty server the
    hongbao requests and tickets, so both get the same bytes)."""
    bodies = srv.bodies or ref.bodies
    tickets_ = srv.tickets or ref.tickets
    if gen == "h2load":
        fig = _measure(srv, method, _h2load_load(srv, method, bodies[method], seconds,
                                                 load_cpus))
    else:
        tag = f"{srv.label.replace(' ', '-')}-r{run}-{method}"
        with _asyncio_load(srv, method, tickets_, seconds, tag, load_cpus) as load:
            fig = _measure(srv, method, load)
    row = {"method": method, "generator": gen, "server": srv.label, "run": run + 1, **fig}
    print(f"  {method:<12} {gen:<7} {srv.label:<18} run {run + 1}: {fig['rps']:8,.0f}/s "
          f"{fig['cpu_us']:7.0f} us/call, {fig['not_ok']} not OK", file=sys.stderr, flush=True)
    return row


def _cost_section(root: Path, bank: str, args, server_cpus: set[int],
                  load_cpus: set[int], generators: tuple[str, ...]) -> list[dict]:
    """Each (method, generator) against the empty server and the hongbao settings, in
    turns (the order flips every run), ``args.runs`` times."""
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [_start_empty(stack, root, server_cpus),
                   _start_empty(stack, root, server_cpus, "uvloop")]
        for label, toml in SETTINGS.items():
            servers.append(_start_gateway(stack, root, label, bank, server_cpus,
                                          *_config(root, label, toml)))
        default = servers[2]
        for run in range(args.runs):
            for method in METHODS:
                for gen in generators:
                    for srv in servers if run % 2 == 0 else servers[::-1]:
                        rows.append(_cost_cell(srv, default, method, gen, run, args.seconds,
                                               load_cpus))
    return rows


def _config(root: Path, label: str, toml: str) -> tuple[str, ...]:
    if not toml:
        return ()
    path = root / f"{label.replace(' ', '-')}.toml"
    path.write_text(toml)
    return ("--config", str(path))


def _workers_section(root: Path, bank: str, args, cpus: set[int]) -> list[dict]:
    """``--workers 1`` and ``--workers 2``, unpinned, h2load without its per-request log,
    with the defaults and with the quietest settings."""
    rows = []
    for setting in WORKER_SETTINGS:
        rows += _workers_pair(root, bank, args, cpus, setting)
    return rows


def _workers_pair(root: Path, bank: str, args, cpus: set[int], setting: str) -> list[dict]:
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [_start_gateway(stack, root, f"{setting} workers {n}", bank, cpus,
                                  *_config(root, f"{setting} w{n}", SETTINGS[setting]),
                                  workers=n)
                   for n in (1, 2)]
        for run in range(args.runs):
            for method in ("GetBalance", "GrabEnvelope"):
                for srv in servers if run % 2 == 0 else servers[::-1]:
                    per_port0 = [_port_counts(p) for p in srv.metrics_ports]
                    load = _h2load_load(srv, method, srv.bodies[method], args.seconds, cpus,
                                        WORKERS_CLIENTS, WORKERS_STREAMS, latencies=False)
                    fig = _measure(srv, method, load)
                    split = [sum(n for (m, _c), n in (_port_counts(p) - c0).items()
                                 if m == METHODS[method])
                             for p, c0 in zip(srv.metrics_ports, per_port0, strict=True)]
                    rows.append({"method": method, "server": srv.label, "setting": setting,
                                 "workers": len(srv.metrics_ports), "run": run + 1,
                                 "per_worker": split, **fig})
                    print(f"  {method:<12} {srv.label:<10} run {run + 1}: {fig['rps']:8,.0f}/s"
                          f" split {split}", file=sys.stderr, flush=True)
    return rows


# -- the tables ---------------------------------------------------------------------------


def _ratio(r: dict, base: dict | None) -> float:
    if base is None or not base["cpu_us_ok"]:
        return math.nan
    return r["cpu_us_ok"] / base["cpu_us_ok"]


def _joined(values: list, fmt: str) -> str:
    """One cell holding every run's figure: "a / b"."""
    return " / ".join("-" if v is None or v != v else format(v, fmt) for v in values)


def _print_cost(rows: list[dict]) -> list[dict]:
    """The cost table (markdown, one line per method, generator and server, every run's
    figure in each cell) and the goal lines; returns one verdict per hongbao run."""
    bases = {(r["server"], r["method"], r["generator"], r["run"]): r for r in rows
             if r["server"] in (EMPTY, EMPTY_UVLOOP)}
    print("| method | generator: what it exercises | server | OK/s | p50 ms | p99 ms "
          "| server CPU us per OK call | x empty | efficiency | x empty on uvloop "
          "| answers not OK | server / generator CPUs busy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["generator"], r["server"]), []).append(r)
    verdicts = []
    for (method, gen, server), runs in groups.items():
        runs.sort(key=lambda r: r["run"])
        ratio = [_ratio(r, bases.get((EMPTY, method, gen, r["run"]))) for r in runs]
        ratio_uv = [_ratio(r, bases.get((EMPTY_UVLOOP, method, gen, r["run"]))) for r in runs]
        if server not in (EMPTY, EMPTY_UVLOOP):
            verdicts += [{"method": method, "generator": gen, "server": server,
                          "run": r["run"], "ratio": x, "ratio_uvloop": y}
                         for r, x, y in zip(runs, ratio, ratio_uv, strict=True)]
        cells = ("- | - | -" if server == EMPTY else
                 f"{_joined(ratio, '.2f')} | {_joined([1 / x for x in ratio], '.2f')} | "
                 + ("-" if server == EMPTY_UVLOOP else _joined(ratio_uv, ".2f")))
        busy = " / ".join(f"{r['server_busy']:.2f}, {r['gen_cpu_s'] / r['seconds']:.2f}"
                          for r in runs)
        print(f"| {method} | {gen}: {EXERCISES[(method, gen)]} | {server} | "
              f"{_joined([r['ok_rps'] for r in runs], ',.0f')} | "
              f"{_joined([r['p50_ms'] for r in runs], '.1f')} | "
              f"{_joined([r['p99_ms'] for r in runs], '.1f')} | "
              f"{_joined([r['cpu_us_ok'] for r in runs], '.0f')} | {cells} | "
              f"{_joined([r['not_ok'] for r in runs], ',')} | {busy} |")
    print()
    _print_notes(rows)
    _print_goals(verdicts)
    return verdicts


def _print_goals(verdicts: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for v in verdicts:
        groups.setdefault((v["method"], v["generator"], v["server"]), []).append(v)
    for (method, gen, server), vs in groups.items():
        ratios = [v["ratio"] for v in vs]
        uv = " / ".join(f"{v['ratio_uvloop']:.2f}" for v in vs)
        met = all(x <= GOAL_RATIO for x in ratios)
        print(f"  [{'met' if met else 'MISS'}] {method} ({gen}), {server}: server CPU per OK "
              f"call {' / '.join(f'{x:.2f}' for x in ratios)}x the empty server's (goal <= "
              f"{GOAL_RATIO}; efficiency {' / '.join(f'{1 / x:.2f}' for x in ratios)}; "
              f"against the empty server on uvloop {uv}x)")


def _print_notes(rows: list[dict]) -> None:
    """The answers that were not OK, and the answer sizes the asyncio generator saw."""
    for r in rows:
        bad = {k: v for k, v in r.get("server_codes", {}).items() if k != "OK"}
        bad_client = {k: v for k, v in r.get("client_codes", {}).items() if k != "OK"}
        if bad or bad_client or r.get("http_failed"):
            print(f"  not OK: {r['method']} {r['generator']} {r['server']} run {r['run']}: "
                  f"server {bad or '-'}, client {bad_client or '-'}, "
                  f"h2load failed {r.get('http_failed', '-')}")
        if r.get("outcomes"):
            print(f"  grab outcomes: {r['server']} run {r['run']}: "
                  + ", ".join(f"{k.removeprefix('GRAB_OUTCOME_')} {v:,}"
                              for k, v in sorted(r["outcomes"].items())))
        if r.get("ran_out"):
            print(f"  {r['method']} {r['server']} run {r['run']}: the prepared grabs ran out "
                  f"before the interval ended")
    sizes: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.get("resp_bytes"):
            sizes.setdefault(r["method"], {})[r["server"]] = r["resp_bytes"]
    for method, by_server in sizes.items():
        print(f"  answer bytes, {method}: " + ", ".join(f"{k} {v}" for k, v in by_server.items()))


def _print_workers(rows: list[dict]) -> dict[str, list[float]]:
    """The workers table and goal lines; returns the OK/s ratios by setting and method."""
    print("\n| setting | method | workers | run | answers/s | OK/s | OK calls per worker | "
          "server CPU us per OK | server CPUs busy | h2load CPUs busy | not OK |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['workers']} | {r['run']} | "
              f"{r['rps']:,.0f} | {r['ok_rps']:,.0f} | "
              f"{' + '.join(f'{n:,}' for n in r['per_worker'])} | {r['cpu_us_ok']:.0f} | "
              f"{r['server_busy']:.2f} | {r['gen_cpu_s'] / r['seconds']:.2f} | {r['not_ok']} |")
    print()
    out = {}
    for setting in WORKER_SETTINGS:
        for method in ("GetBalance", "GrabEnvelope"):
            ok = {(r["workers"], r["run"]): r["ok_rps"] for r in rows
                  if r["method"] == method and r["setting"] == setting}
            ratios = [ok[(2, run)] / ok[(1, run)] for (n, run) in sorted(ok)
                      if n == 1 and ok[(1, run)] and (2, run) in ok]
            met = bool(ratios) and all(x >= GOAL_WORKERS for x in ratios)
            out[f"{setting}, {method}"] = ratios
            print(f"  [{'met' if met else 'MISS'}] {method} (h2load), {setting}: --workers 2 "
                  f"gives {' / '.join(f'{x:.2f}' for x in ratios)}x the OK calls/s of one "
                  f"worker (goal >= {GOAL_WORKERS})")
    return out


def _summary(verdicts: list[dict], workers: dict[str, list[float]]) -> dict:
    """What ``hongbao bench`` tabulates: the median of the runs per figure."""
    groups: dict[str, list[float]] = {}
    for v in verdicts:
        groups.setdefault(f"{v['method']} {v['generator']}, {v['server']}", []).append(
            v["ratio"])
    return {"x_empty_cpu_per_ok": {k: statistics.median(v) for k, v in groups.items()},
            "workers_2_over_1": {k: statistics.median(v) for k, v in workers.items() if v}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="each measured interval")
    ap.add_argument("--runs", type=int, default=2, help="times each pair is measured")
    ap.add_argument("--sections", default="cost,workers", help="cost, workers or both")
    ap.add_argument("--generators", default="h2load,asyncio")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 1 <= args.runs <= 10:
        ap.error("--seconds must be in (0, 60] and --runs in 1..10")
    cpus = os.sched_getaffinity(0)
    server_cpus = {min(cpus)} if len(cpus) >= 2 else set(cpus)
    load_cpus = (cpus - server_cpus) or set(cpus)
    generators = tuple(g for g in args.generators.split(",") if g)
    if "h2load" in generators and h2.find_h2load() is None:
        print("h2load not found (apt-get install nghttp2-client, or `make h2load`): "
              "the h2load rows and the workers section are left out")
        generators = tuple(g for g in generators if g != "h2load")
        args.sections = args.sections.replace("workers", "")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"CPUs {sorted(cpus)}: servers pinned to {sorted(server_cpus)}, load generators "
          f"and this process on {sorted(load_cpus)}; {args.seconds:g} s per interval, "
          f"{args.runs} runs")
    with tempfile.TemporaryDirectory(prefix="bench-unary-") as tmp:
        root = Path(tmp)
        bank = banksim_proc(root / "bank", "--card-balance-fen", "1000000000",
                            log_path=root / "bank.log")
        try:
            os.sched_setaffinity(0, load_cpus)
            bank.start(START_TIMEOUT_S)
            cost = ([] if "cost" not in args.sections else
                    _cost_section(root, bank.target, args, server_cpus, load_cpus, generators))
            workers = ([] if "workers" not in args.sections else
                       _workers_section(root, bank.target, args, set(cpus)))
        finally:
            os.sched_setaffinity(0, cpus)
            bank.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    verdicts = _print_cost(cost) if cost else []
    ratios = _print_workers(workers) if workers else {}
    return {**_summary(verdicts, ratios), "rows": cost + workers}


if __name__ == "__main__":
    if sys.argv[1:] == ["--generate"]:
        sys.exit(_generate_main())
    main()
