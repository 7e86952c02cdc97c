"""Cluster mode: aggregate durable grabs/s of 1, 2 and 3 SETs on one machine (issue 11).

For each K in ``--sets`` (1,2,3) a fresh :class:`gateway.ops.clusterproc.LocalCluster`: 3 real
``nats-server`` nodes (JetStream, stream ``HONGBAO_CREDITS`` with 3 replicas), a bank
simulator and K ``hongbao serve --cluster`` SETs (one worker each, default settings: durability
strict, QoS and access log on), all on loopback. Then, in each cluster:

1. Senders spread over all SETs top up from their cards and pay ``--envelopes`` LUCKY
   envelopes of ``--shares`` shares from their wallets (through ``ClusterClient``, so each
   send goes to its sender's SET). Every envelope is grabbed by ``--shares`` distinct users
   drawn at random from ``--users`` grabbers, so with K SETs about (K-1)/K of the grabs are
   cross-SET (the grabber's wallet lives on another SET); the share is counted and printed.
2. The grabs are split by the envelope's SET; one spawned client process per SET streams its
   part as ``EnvelopeService/BatchGrab`` straight to that SET (batches of 1000, ``--streams``
   streams x ``--window`` batches in flight, requests serialized before the clock), so the
   SETs are measured, not the forwarding. All clients start together; the aggregate is the
   GRABBED answers over the time from the first start to the last answer.
3. The books drain: each SET's credit consumer moves every share (a cross-SET one to
   ``x:<home>`` and the relay's outbox), the relay publishes to the stream, the home SET's
   consumer applies it. The benchmark polls the stream (``stream_info``: messages, bytes,
   last sequence) and each SET's credit backlog (``AdminService/GetQosStatus``) every
   ``POLL_S`` and waits until every cross-SET grab's message was published and acknowledged
   and every backlog is empty. From the samples: the relay's publish rate and the consumers'
   applied rate, the stream's bytes per message.
4. Credit lag: a sample of grabbers (every ``--sample-every``-th user) read their
   notification feed on their home SET (``WatchNotifications``); the CREDITED event's
   ``created_at`` (the home SET's commit time, ms) minus the time the client read the grab's
   answer (same host clock) is the lag, for the grabs made under load. Then ``--probes``
   single cross-SET ``GrabEnvelope`` calls at ``--probe-rate`` per second on the quiet,
   drained cluster, measured the same way: the lag without a backlog.
5. CPU: utime + stime of every process (each SET, each nats-server, the bank simulator, this
   process) from ``/proc/<pid>/stat`` at the start, at the last answer and when drained, and
   the whole machine's busy time from ``/proc/stat`` (what is left is other processes'); the
   clients measure their own (process CPU time, start to last answer). "SET CPU us/grab" is
   the SETs' CPU over the grabs, for the load alone and for load + drain (the grab and its
   credit, wherever it lands); "credited grabs/s" is the grabs over load + drain time.

In the largest cluster it then runs the same load once more through one entry SET (s1), one
client streaming every batch (envelopes of all SETs mixed in each batch) to s1, which splits
each batch by envelope owner and forwards the parts; reported as its own figure. Every
cluster ends with ``hongbao reconcile --cluster FILE --key-file K --bank B``: BALANCED, or
the benchmark stops. ``--profile PATH`` adds one more direct load phase in the largest
cluster under ``py-spy record`` of SET s1 (raw collapsed stacks to PATH) and prints where its
samples fall.

Pinning (2 CPUs): SET i runs on CPU (i-1) mod nproc (``taskset -a -p -c``, every thread);
the nats-servers, the bank simulator, this process and the clients on the CPUs holding the
fewest SETs (1 SET: the other CPU, as bench_batchgrab does; 2 SETs: both CPUs; 3 SETs: the
CPU with one SET). Everything shares the machine's CPUs; the benchmark prints how many cores
each part used, and how many went to processes outside it ("others"). The baseline of the
ratios is the 1-SET cluster of the same invocation.

    python bench/bench_cluster.py [--sets 1,2,3] [--envelopes 1500] [--shares 100]
                                  [--users 20000] [--probes 300] [--profile /tmp/s1.folded]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import math
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from nats.errors import Error as NatsError

from gateway.client import Client
from gateway.cluster import bus
from gateway.cluster.client import ClusterClient
from gateway.ops.clusterproc import LocalCluster
from hongbao.v1 import admin_pb2, envelope_pb2, notification_pb2, wallet_pb2

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # bench_batchgrab beside this file; spawned clients find it too
bg = importlib.import_module("bench_batchgrab")  # pid CPU time, admission settle, py-spy

BATCH_ITEMS = 1000  # the gateway's batch_grab_max_items
TOP_UP_FEN = 1_000_000  # the bank simulator's opening card balance
SHARE_FEN = 100  # the mean share: an envelope of S shares holds S yuan
SENDS_IN_FLIGHT = 16
SEND_ATTEMPTS = 30
START_TIMEOUT_S = 60.0
PHASE_TIMEOUT_S = 300.0  # one load phase, first start to last answer
DRAIN_TIMEOUT_S = 180.0  # last answer to every credit applied
NOTICE_TIMEOUT_S = 30.0  # a sampled user's feed showing every credit it is owed
POLL_S = 0.25
PROFILE_HZ = bg.PROFILE_HZ  # py-spy's rate in bench_batchgrab._PySpy
METHOD = "/hongbao.v1.EnvelopeService/BatchGrab"
GRABBED = "GRAB_OUTCOME_GRABBED"


# -- processes: pinning, CPU time ------------------------------------------------------------


def _pin(pid: int, cpus: set[int]) -> str:
    """Every thread of a process onto ``cpus`` (threads it starts later inherit it)."""
    if shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(cpus))),
                        str(pid)], check=True, capture_output=True, timeout=10)
        return "taskset -a -p -c"
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)
    return "sched_setaffinity of each thread"


def _pid(proc: Any) -> int:
    assert proc is not None, "a started cluster's process has a pid"
    return proc.pid


def _layout(cluster: LocalCluster) -> dict[str, Any]:
    """SET i on CPU (i-1) mod n; the nats-servers, the bank simulator, this process and the
    clients it spawns (they inherit its mask) on the CPUs holding the fewest SETs: with one
    SET that is the other CPU, as in bench_batchgrab; with two SETs on two CPUs, both."""
    cpus = sorted(os.sched_getaffinity(0))
    sets = {name: cpus[i % len(cpus)] for i, name in enumerate(cluster.sets)}
    count = {c: sum(1 for v in sets.values() if v == c) for c in cpus}
    rest = {c for c in cpus if count[c] == min(count.values())}
    by = ""
    for name, cpu in sets.items():
        by = _pin(_pid(cluster.sets[name].proc), {cpu})
    for node in cluster.nats.nodes:
        _pin(_pid(node.proc), rest)
    if cluster.bank is not None:
        _pin(cluster.bank.pid, rest)
    os.sched_setaffinity(0, rest)
    return {"sets": sets, "rest": sorted(rest), "by": by}


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime (s) of each named process, all its threads, and ``machine``: the busy
    time of every CPU (``/proc/stat``: all but idle and iowait), whoever used it."""
    out = {name: bg._proc_cpu_s(pid) for name, pid in pids.items()}
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    out["machine"] = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    return out


def _server_pids(cluster: LocalCluster) -> dict[str, int]:
    pids = {f"set {name}": s.proc.pid for name, s in cluster.sets.items() if s.proc}
    pids.update({f"nats {n.name}": n.proc.pid for n in cluster.nats.nodes if n.proc})
    if cluster.bank is not None:
        pids["bank"] = cluster.bank.pid
    pids["bench"] = os.getpid()  # this process: the watcher's polls, the lag reads
    return pids


# -- the client processes ----------------------------------------------------------------------


def _client_main(spec: dict, conn: Any) -> None:
    """A spawned client: builds its requests, says ready, waits for go, streams, reports."""
    try:
        conn.send(("result", asyncio.run(_client(spec, conn))))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


async def _client(spec: dict, conn: Any) -> dict:
    """BatchGrab over ``streams`` streams, ``window`` batches in flight on each. Records when
    each batch's answer was read (wall clock, for the credit lag) and counts GRABBED answers,
    cross-SET ones apart."""
    batches = spec["batches"]
    todo = collections.deque(
        (n, envelope_pb2.BatchGrabRequest(batch_id=n, items=[
            envelope_pb2.BatchGrabItem(user_id=u, envelope_id=e, request_id="b")
            for e, u, _cross in items]).SerializeToString())
        for n, items in enumerate(batches))
    cross = [[c for _e, _u, c in items] for items in batches]
    answered = [0.0] * len(batches)
    outcomes: collections.Counter[str] = collections.Counter()
    grabbed_cross = 0
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        batch_grab = channel.stream_stream(
            METHOD, request_serializer=None,
            response_deserializer=envelope_pb2.BatchGrabResponse.FromString)
        meta = Client.bearer(spec["ticket"])

        async def stream() -> None:
            nonlocal grabbed_cross
            call = batch_grab(metadata=meta, timeout=PHASE_TIMEOUT_S)
            window = asyncio.Semaphore(spec["window"])

            async def write() -> None:
                while todo:
                    await window.acquire()
                    if todo:
                        await call.write(todo.popleft()[1])
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            try:
                while (resp := await call.read()) is not grpc.aio.EOF:
                    answered[resp.batch_id] = time.time()
                    window.release()
                    flags = cross[resp.batch_id]
                    for i, r in enumerate(resp.results):
                        name = r.reason if r.code else envelope_pb2.GrabOutcome.Name(r.outcome)
                        outcomes[name] += 1
                        if name == GRABBED and flags[i]:
                            grabbed_cross += 1
                await writer
            except grpc.aio.AioRpcError as err:
                outcomes[f"stream {err.code().name}"] += 1
                writer.cancel()

        cpu0 = time.process_time()
        conn.send(("ready", None))
        if await asyncio.to_thread(conn.recv) != "go":
            raise RuntimeError("expected go")
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
        await asyncio.gather(*(stream() for _ in range(spec["streams"])))
        end = time.monotonic()
    return {"start": start, "end": end, "outcomes": dict(outcomes),
            "grabbed": outcomes[GRABBED], "grabbed_cross": grabbed_cross,
            "answered": answered, "client_cpu_s": time.process_time() - cpu0}


def _client_entry() -> Any:
    """The client under an importable name (spawn pickles a function by its module's name)."""
    return importlib.import_module("bench_cluster")._client_main


class _Clients:
    """Client processes started together: ready, go, results."""

    def __init__(self, specs: dict[str, dict]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Any] = {}
        for name, spec in specs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_entry(), args=(spec, child), daemon=True)
            proc.start()
            self.procs[name], self.conns[name] = proc, parent

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name in self.procs:
            bg._expect(self.conns[name], self.procs[name], "ready", deadline)

    def go(self) -> None:
        for conn in self.conns.values():
            conn.send("go")

    def results(self) -> dict[str, dict]:
        deadline = time.monotonic() + PHASE_TIMEOUT_S + 30
        return {name: bg._expect(self.conns[name], self.procs[name], "result", deadline)
                for name in self.procs}

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# -- setting up: senders on every SET, envelopes, the grab plan ------------------------------


class Plan:
    """One load phase's envelopes and grabs: per SET, its batches of (envelope, user,
    cross-SET) in envelope order, and where each sampled user's grabs sit."""

    def __init__(self) -> None:
        self.envelopes: dict[str, list[str]] = {}  # SET -> envelope ids
        self.batches: dict[str, list[list[tuple[str, str, bool]]]] = {}
        self.sampled: dict[tuple[str, str], tuple[str, int]] = {}  # (user, env) -> (SET, batch)
        self.items = 0
        self.cross = 0


def _users_on(cc: ClusterClient, set_name: str, prefix: str, n: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        user = f"{prefix}{i}"
        if cc.owner(user=user) == set_name:
            out.append(user)
        i += 1
    return out


async def _fund_and_send(cluster: LocalCluster, cc: ClusterClient, tag: str, per_set: int,
                         shares: int) -> dict[str, list[str]]:
    """``per_set`` envelopes of ``shares`` shares paid from the wallets of senders homed on
    each SET (each sender tops up once from a card of its own)."""
    per_sender = TOP_UP_FEN // (shares * SHARE_FEN)
    senders = {name: _users_on(cc, name, f"{tag}snd-", -(-per_set // per_sender))
               for name in cluster.sets}
    sem = asyncio.Semaphore(SENDS_IN_FLIGHT)

    async def top_up(card: str, user: str) -> None:
        meta = cc.metadata(cluster.ticket(user, ("pay",)))
        for attempt in range(10):  # the butler may refuse (BANK_BUSY): nothing was sent
            try:
                await cc.call(lambda c: c.wallet.TopUp(wallet_pb2.TopUpRequest(
                    request_id="top", card_id=card, amount_fen=TOP_UP_FEN), metadata=meta,
                    timeout=10), user=user)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:
                    raise
                await asyncio.sleep(0.2)

    async def send(user: str, j: int) -> str:
        meta = cc.metadata(cluster.ticket(user, ("pay",)))
        request = envelope_pb2.SendEnvelopeRequest(
            request_id=f"{tag}e{j}", total_fen=shares * SHARE_FEN, count=shares,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_BALANCE)
        async with sem:
            for attempt in range(SEND_ATTEMPTS):  # a shed send is retried under its id
                try:
                    r = await cc.call(lambda c: c.envelopes.SendEnvelope(
                        request, metadata=meta, timeout=30), user=user)
                    return r.envelope_id
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or \
                            attempt == SEND_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
        raise AssertionError("unreachable")

    cards = [(f"icbc-{ord(tag)}{n:03d}{i:04d}", u) for n, users in enumerate(senders.values())
             for i, u in enumerate(users)]
    await asyncio.gather(*(top_up(card, u) for card, u in cards))
    out: dict[str, list[str]] = {}
    for name, users in senders.items():
        out[name] = list(await asyncio.gather(*(
            send(users[j // per_sender], j) for j in range(per_set))))
    return out


def _plan(cc: ClusterClient, envelopes: dict[str, list[str]], shares: int, users: int,
          sample_every: int, rng: random.Random) -> Plan:
    """Every envelope grabbed by ``shares`` distinct random users of ``g0..g<users-1>``."""
    home = [cc.owner(user=f"g{u}") for u in range(users)]
    plan = Plan()
    plan.envelopes = envelopes
    for name, envs in envelopes.items():
        items: list[tuple[str, str, bool]] = []
        for e in envs:
            for u in rng.sample(range(users), shares):
                cross = home[u] != name
                items.append((e, f"g{u}", cross))
                plan.cross += cross
                if u % sample_every == 0:
                    plan.sampled[(f"g{u}", e)] = (name, (len(items) - 1) // BATCH_ITEMS)
        plan.items += len(items)
        plan.batches[name] = [items[i:i + BATCH_ITEMS] for i in range(0, len(items), BATCH_ITEMS)]
    return plan


def _mixed(plan: Plan) -> list[list[tuple[str, str, bool]]]:
    """The same grabs as one list of batches for one entry SET: envelopes of all SETs taking
    turns, so each batch holds parts for every SET."""
    per_env: dict[str, list[tuple[str, str, bool]]] = collections.defaultdict(list)
    for batches in plan.batches.values():
        for items in batches:
            for item in items:
                per_env[item[0]].append(item)
    order = [e for group in zip(*plan.envelopes.values(), strict=False) for e in group]
    taken = set(order)
    order += [e for envs in plan.envelopes.values() for e in envs if e not in taken]
    items = [item for e in order for item in per_env[e]]
    return [items[i:i + BATCH_ITEMS] for i in range(0, len(items), BATCH_ITEMS)]


# -- watching the bus and the backlogs ---------------------------------------------------------


class Watch:
    """Samples of the credit stream and of each SET's credit backlog, every ``POLL_S``."""

    def __init__(self, js: Any, admins: dict[str, tuple[Client, Any]]) -> None:
        self.js = js
        self.admins = admins
        self.samples: list[dict] = []
        self.example: dict[str, int] = {}  # one credit message's sizes, as stored

    async def sample(self) -> dict:
        for attempt in range(3):  # a loaded machine can make one read time out
            try:
                info = await self.js.stream_info(bus.STREAM)
                break
            except (NatsError, TimeoutError):
                if attempt == 2:
                    raise
                await asyncio.sleep(POLL_S)
        if not self.example and info.state.messages:
            with contextlib.suppress(NatsError, TimeoutError):  # acked (gone) meanwhile
                m = await self.js.get_msg(bus.STREAM, info.state.first_seq)
                self.example = {"payload": len(m.data or b""), "subject": len(m.subject),
                                "headers": sum(len(k) + len(v) + 4
                                               for k, v in (m.headers or {}).items())}
        lags = {}
        for name, (c, meta) in self.admins.items():
            try:
                q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=meta,
                                               timeout=5)
                lags[name] = next((t.lag for t in q.topics if t.topic == "credit"), 0)
            except grpc.aio.AioRpcError:
                lags[name] = -1  # no answer in time: not drained as far as we know
        s = {"t": time.monotonic(), "last_seq": info.state.last_seq,
             "messages": info.state.messages, "bytes": info.state.bytes, "lags": lags,
             "leader": info.cluster.leader if info.cluster else None}
        self.samples.append(s)
        return s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)

    async def drained(self, seq0: int, cross: int, timeout_s: float) -> float:
        """Waits until ``cross`` messages were published since ``seq0``, none is left in the
        stream and no SET has a credit backlog; returns when (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = await self.sample()
            if (s["last_seq"] - seq0 >= cross and s["messages"] == 0
                    and all(v == 0 for v in s["lags"].values())):
                return s["t"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"credits not drained in {timeout_s} s: {s}")
            await asyncio.sleep(POLL_S)


def _bus_figures(samples: list[dict], seq0: int, t0: float, t_load: float,
                 t_drained: float) -> dict:
    """Relay and consumer rates from the stream's samples: published = last sequence,
    applied = published - still in the stream (work-queue retention drops acked ones)."""
    rows = [s for s in samples if t0 <= s["t"] <= t_drained + POLL_S]
    if not rows:
        return {}
    published = [(s["t"], s["last_seq"] - seq0) for s in rows]
    applied = [(s["t"], s["last_seq"] - seq0 - s["messages"]) for s in rows]

    def active_rate(points: list[tuple[float, int]]) -> tuple[float, float]:
        """Mean over the span where the count moved, and the best 1-s rate."""
        moving = [i for i in range(1, len(points)) if points[i][1] > points[i - 1][1]]
        if not moving:
            return 0.0, 0.0
        a, b = points[moving[0] - 1], points[moving[-1]]
        mean = (b[1] - a[1]) / max(b[0] - a[0], 1e-9)
        best = 0.0
        j = 0
        for i in range(len(points)):
            while points[i][0] - points[j][0] > 1.0:
                j += 1
            span = points[i][0] - points[j][0]
            if span >= 0.75:
                best = max(best, (points[i][1] - points[j][1]) / span)
        return mean, best

    at_load = max((p for p in published if p[0] <= t_load), default=(t0, 0))[1]
    pub_mean, pub_best = active_rate(published)
    app_mean, app_best = active_rate(applied)
    with_msgs = [s for s in rows if s["messages"] > 0]
    return {
        "published": published[-1][1],
        "published_by_last_answer": at_load,
        "relay_msgs_per_s": pub_mean, "relay_best_1s": pub_best,
        "applied_msgs_per_s": app_mean, "applied_best_1s": app_best,
        "stream_max_messages": max((s["messages"] for s in rows), default=0),
        "stream_bytes_per_msg": (statistics.median(s["bytes"] / s["messages"] for s in with_msgs)
                                 if with_msgs else 0.0),
        "max_backlog": max((max(s["lags"].values(), default=0) for s in rows), default=0),
    }


# -- the credit lag --------------------------------------------------------------------------


async def _credited_at(cluster: LocalCluster, cc: ClusterClient,
                       wanted: dict[str, set[str]]) -> dict[tuple[str, str], float]:
    """(user, envelope) -> the CREDITED event's created_at (s), from each user's feed on
    their home SET, read until every envelope wanted shows (bounded)."""
    out: dict[tuple[str, str], float] = {}
    sem = asyncio.Semaphore(32)

    async def read(user: str, envs: set[str]) -> None:
        meta = Client.bearer(cluster.ticket(user, ("read",)))
        target = cc.addresses[cc.owner(user=user)]
        left = set(envs)
        deadline = time.monotonic() + NOTICE_TIMEOUT_S
        async with sem:
            while left and time.monotonic() < deadline:
                call = cc.client(target).notifications.WatchNotifications(
                    notification_pb2.WatchNotificationsRequest(), metadata=meta,
                    timeout=max(0.1, deadline - time.monotonic()))
                try:
                    async for r in call:
                        n = r.notification
                        if n.kind == notification_pb2.NOTIFICATION_KIND_CREDITED and \
                                n.envelope_id in left:
                            out[(user, n.envelope_id)] = n.created_at.ToMilliseconds() / 1000
                            left.discard(n.envelope_id)
                            if not left:
                                break
                except grpc.aio.AioRpcError as err:
                    # P3: a SET still busy with credits may shed the feed, or drop the
                    # stream; the events wait in the feed, so read again until the deadline
                    # (what is still missing then is reported as missing).
                    if err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                          grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          grpc.StatusCode.UNAVAILABLE):
                        raise
                    await asyncio.sleep(0.2)
                finally:
                    call.cancel()

    await asyncio.gather(*(read(u, envs) for u, envs in wanted.items()))
    return out


def _quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)]
    return {"n": len(xs), "p50_ms": q(0.50) * 1e3, "p99_ms": q(0.99) * 1e3,
            "max_ms": xs[-1] * 1e3}


async def _probe(cluster: LocalCluster, cc: ClusterClient, probe_envs: dict[str, list[str]],
                 probes: int, rate: float) -> dict[tuple[str, str], float]:
    """``probes`` single cross-SET GrabEnvelope calls, paced at ``rate`` a second, each to
    the envelope's SET by a user homed on another; returns (user, envelope) -> answer time."""
    names = list(cluster.sets)
    plan = []
    users = {n: iter(_users_on(cc, n, "probe-", probes)) for n in names}
    slots = [(n, e) for group in zip(*probe_envs.values(), strict=False) for n, e in
             zip(probe_envs, group, strict=True)]
    for i in range(probes):
        env_set, env = slots[i % len(slots)]
        home = names[(names.index(env_set) + 1 + i % (len(names) - 1)) % len(names)]
        plan.append((next(users[home]), env_set, env))
    answered: dict[tuple[str, str], float] = {}
    t0 = time.monotonic()

    async def one(i: int, user: str, env_set: str, env: str) -> None:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        meta = Client.bearer(cluster.ticket(user, ("grab",)))
        r = await cc.client(cc.addresses[env_set]).envelopes.GrabEnvelope(
            envelope_pb2.GrabEnvelopeRequest(envelope_id=env, request_id="p"), metadata=meta,
            timeout=10)
        if r.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED:
            answered[(user, env)] = time.time()

    await asyncio.gather(*(one(i, *p) for i, p in enumerate(plan)))
    return answered


# -- one load phase ----------------------------------------------------------------------------


async def _phase(cluster: LocalCluster, cc: ClusterClient, watch: Watch, plan: Plan,
                 args: argparse.Namespace, entry: str | None = None,
                 profiler: Any = None) -> dict:
    """The grabs of ``plan`` (straight to each SET, or all through ``entry``), then the
    drain; CPU of every process at start, last answer, drained."""
    clients = _Clients(_specs(cluster, plan, args, entry))
    try:
        await asyncio.to_thread(clients.ready)
        s0 = await watch.sample()
        seq0 = s0["last_seq"]
        pids = _server_pids(cluster)
        if profiler is not None:
            profiler.start()
        cpu0, t0 = _cpu(pids), time.monotonic()
        clients.go()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch.run(stop))
        results = await asyncio.to_thread(clients.results)
        cpu1, t1 = _cpu(pids), time.monotonic()
        stop.set()
        await watcher
        cross = sum(r["grabbed_cross"] for r in results.values())
        t2 = await watch.drained(seq0, cross, DRAIN_TIMEOUT_S)
        cpu2 = _cpu(pids)
    finally:
        if profiler is not None:
            profiler.stop()
        clients.stop()
    start = min(r["start"] for r in results.values())
    end = max(r["end"] for r in results.values())
    grabbed = sum(r["grabbed"] for r in results.values())
    load_s, drain_s = end - start, t2 - t1
    outcomes: collections.Counter[str] = collections.Counter()
    for r in results.values():
        outcomes.update(r["outcomes"])
    cpu_load = {k: cpu1[k] - cpu0[k] for k in cpu0}
    cpu_all = {k: cpu2[k] - cpu0[k] for k in cpu0}
    client_cpu = sum(r["client_cpu_s"] for r in results.values())
    group = _group
    bus_fig = _bus_figures(watch.samples, seq0, t0, t1, t2)
    published = bus_fig.get("published", 0)
    leader = watch.samples[-1]["leader"]  # the stream's raft leader (nats-server name)
    return {
        "grabbed": grabbed, "items": plan.items, "grabbed_cross": cross,
        "cross_share": cross / max(grabbed, 1), "load_s": load_s, "drain_s": drain_s,
        "grabs_per_s": grabbed / load_s,
        "per_set_grabs_per_s": {n.removeprefix("via "): r["grabbed"] / (r["end"] - r["start"])
                                for n, r in results.items()},
        "other_outcomes": {k: v for k, v in outcomes.items() if k != GRABBED},
        "wall": {"load": t1 - t0, "all": t2 - t0},
        "cpu_load": cpu_load, "cpu_all": cpu_all, "client_cpu_s": client_cpu,
        **_cores(cpu_load, cpu_all, client_cpu, load_s, (t0, t1, t2), pids),
        "set_cpu_us_per_grab_load": group(cpu_load, "set ") / max(grabbed, 1) * 1e6,
        "set_cpu_us_per_grab_all": group(cpu_all, "set ") / max(grabbed, 1) * 1e6,
        "nats_cpu_us_per_msg": (group(cpu_all, "nats ") / published * 1e6) if published else 0,
        "stream_leader": leader,
        "leader_cpu_us_per_msg": (cpu_all.get(f"nats {leader}", 0.0) / published * 1e6
                                  if published else 0),
        "nats_cpu_s": group(cpu_all, "nats "),
        "client_cpu_us_per_grab": client_cpu / max(grabbed, 1) * 1e6,
        "bus": bus_fig,
        "answered": {n.removeprefix("via "): r["answered"] for n, r in results.items()},
        "series": _series(watch.samples, seq0, t0, t2),
        "message": dict(watch.example),
    }


def _specs(cluster: LocalCluster, plan: Plan, args: argparse.Namespace,
           entry: str | None) -> dict:
    """The client processes' work: one per SET straight to it, or one through ``entry``."""
    ticket = cluster.ticket("upstream", ("batch",))
    if entry is None:
        return {name: {"target": cluster.sets[name].address, "ticket": ticket,
                       "batches": plan.batches[name], "streams": args.streams,
                       "window": args.window} for name in cluster.sets}
    return {f"via {entry}": {"target": cluster.sets[entry].address, "ticket": ticket,
                             "batches": _mixed(plan),
                             "streams": args.streams * len(cluster.sets),
                             "window": args.window}}


def _group(cpu: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in cpu.items() if k.startswith(prefix))


def _cores(cpu_load: dict[str, float], cpu_all: dict[str, float], client_cpu: float,
           load_s: float, times: tuple[float, float, float], pids: Any) -> dict:
    """Cores each part used during the load and during the drain."""
    t0, t1, t2 = times
    ours_load = sum(v for k, v in cpu_load.items() if k != "machine") + client_cpu
    ours_drain = sum(cpu_all[k] - cpu_load[k] for k in pids)
    g = _group
    return {
        "cores_load": {"sets": g(cpu_load, "set ") / (t1 - t0),
                       "nats": g(cpu_load, "nats ") / (t1 - t0),
                       "clients": client_cpu / load_s,
                       "bank, bench": (g(cpu_load, "bank") + g(cpu_load, "bench")) / (t1 - t0),
                       "others": max(0.0, cpu_load["machine"] - ours_load) / (t1 - t0)},
        "cores_drain": {"sets": (g(cpu_all, "set ") - g(cpu_load, "set ")) / (t2 - t1),
                        "nats": (g(cpu_all, "nats ") - g(cpu_load, "nats ")) / (t2 - t1),
                        "others": max(0.0, cpu_all["machine"] - cpu_load["machine"]
                                      - ours_drain) / (t2 - t1)} if t2 > t1 else {}}


def _series(samples: list[dict], seq0: int, t0: float, t_end: float) -> list[str]:
    """One line a second: credits published, still in the stream, each SET's backlog."""
    out, last = [], -1.0
    for s in samples:
        if t0 <= s["t"] <= t_end + POLL_S and s["t"] - last >= 1.0:
            last = s["t"]
            out.append(f"t={s['t'] - t0:5.1f}s published {s['last_seq'] - seq0:>7,} "
                       f"in stream {s['messages']:>7,} backlog " + " ".join(
                           f"{n} {v:>7,}" for n, v in s["lags"].items()))
    return out


# -- one cluster of K SETs ----------------------------------------------------------------------


async def _cluster_run(cluster: LocalCluster, args: argparse.Namespace, k: int,
                       entry: bool, profile: Path | None) -> dict:
    import nats

    layout = _layout(cluster)
    rng = random.Random(20261211 + k)
    nc = await nats.connect(servers=cluster.nats.urls, connect_timeout=5)
    out: dict[str, Any] = {"k": k, "layout": layout}
    try:
        js = nc.jetstream(timeout=5.0)
        async with ClusterClient(list(cluster.addresses.values())) as cc:
            await cc.start()
            admin = Client.bearer(cluster.ticket("bench", ("admin",)))
            admins = {name: (cc.client(s.address), admin) for name, s in cluster.sets.items()}
            watch = Watch(js, admins)

            async def prepared(tag: str, n: int) -> Plan:
                per_set = -(-n // k)
                envs = await _fund_and_send(cluster, cc, tag, per_set, args.shares)
                plan = _plan(cc, envs, args.shares, args.users, args.sample_every, rng)
                for c, meta in admins.values():
                    await bg._settle(c, meta)
                return plan

            t = time.monotonic()
            plan = await prepared("a", args.envelopes)
            probe_envs: dict[str, list[str]] = {}
            if k > 1 and args.probes:
                probe_envs = await _fund_and_send(
                    cluster, cc, "p", -(-args.probes // (k * args.shares)), args.shares)
            print(f"  {k} SET(s): {plan.items:,} grabs planned on "
                  f"{sum(map(len, plan.envelopes.values())):,} envelopes "
                  f"({plan.cross / max(plan.items, 1):.1%} cross-SET) in "
                  f"{time.monotonic() - t:.1f} s", flush=True)
            out["direct"] = await _phase(cluster, cc, watch, plan, args)
            d = out["direct"]
            print(f"  {k} SET(s) direct: {d['grabs_per_s']:,.0f} grabs/s, "
                  f"{d['cross_share']:.1%} cross, drained in {d['drain_s']:.1f} s", flush=True)
            for c, meta in admins.values():
                await bg._settle(c, meta)
            out["lag_load"], out["lag_local"] = await _load_lag(cluster, cc, plan, d)
            if probe_envs:
                answered = await _probe(cluster, cc, probe_envs, args.probes, args.probe_rate)
                wanted: dict[str, set[str]] = collections.defaultdict(set)
                for user, env in answered:
                    wanted[user].add(env)
                got = await _credited_at(cluster, cc, wanted)
                out["lag_quiet"] = _quantiles([got[p] - t for p, t in answered.items()
                                               if p in got])
                out["lag_quiet"]["missing"] = len(answered) - len(got)
            if entry and k > 1:
                plan2 = await prepared("b", args.envelopes)
                out["entry"] = await _phase(cluster, cc, watch, plan2, args, entry="s1")
                e = out["entry"]
                print(f"  {k} SETs through s1: {e['grabs_per_s']:,.0f} grabs/s", flush=True)
            if profile is not None:
                plan3 = await prepared("c", args.envelopes)
                spy = bg._PySpy(_pid(cluster.sets["s1"].proc), profile, args.native)
                prof = await _phase(cluster, cc, watch, plan3, args, profiler=spy)
                print(f"  profiled phase (py-spy on s1, not in the table): "
                      f"{prof['grabs_per_s']:,.0f} grabs/s, drained in {prof['drain_s']:.1f} s; "
                      f"s1 {prof['cpu_all']['set s1']:.2f} s CPU over "
                      f"{prof['wall']['all']:.1f} s", flush=True)
                out["profiled"] = {"grabs_per_s": prof["grabs_per_s"],
                                   "samples": _profile_summary(profile, prof["wall"]["all"])}
    finally:
        await nc.close()
    out["reconcile"] = _reconcile(cluster)
    return out


async def _load_lag(cluster: LocalCluster, cc: ClusterClient, plan: Plan,
                    d: dict) -> tuple[dict, dict]:
    """The credit lag of the sampled users' grabs made under load: cross-SET and local."""
    wanted: dict[str, set[str]] = collections.defaultdict(set)
    for user, env in plan.sampled:
        wanted[user].add(env)
    got = await _credited_at(cluster, cc, wanted)
    cross: list[float] = []
    local: list[float] = []
    for (user, env), (name, batch) in plan.sampled.items():
        if (user, env) not in got:
            continue
        lag = got[(user, env)] - d["answered"][name][batch]
        (cross if cc.owner(user=user) != name else local).append(lag)
    c, lo = _quantiles(cross), _quantiles(local)
    c["missing"] = len(plan.sampled) - len(got)
    return c, lo


def _reconcile(cluster: LocalCluster) -> str:
    """``hongbao reconcile --cluster`` over the whole cluster; stops unless BALANCED."""
    s1 = cluster.sets["s1"]
    cmd = [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--cluster",
           str(s1.cluster_file), "--key-file", str(cluster.key_file)]
    if cluster.bank is not None:
        cmd += ["--bank", cluster.bank.target]
    rec = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if rec.returncode != 0 or "NOT BALANCED" in rec.stdout or "BALANCED" not in rec.stdout:
        raise SystemExit(f"CLUSTER RECONCILE FAILED:\n{rec.stdout}{rec.stderr}")
    print("  hongbao reconcile --cluster: " + " / ".join(
        line.strip() for line in rec.stdout.splitlines()[:3] if line.strip()), flush=True)
    return next(line.strip() for line in rec.stdout.splitlines() if "BALANCED" in line)


# -- the profile ------------------------------------------------------------------------------

# Walking a sampled stack from its leaf up, the first frame holding one of a bucket's
# substrings puts the sample there (buckets tried in this order). py-spy samples threads that
# run, sit in a system call or wait for the GIL.
_BUCKETS = (
    ("idle: loop or grpc poller in epoll", ("epoll_wait", "epoll_pwait", "select.")),
    ("idle: writer waiting for work", ("SimpleQueue_get", "Queue.get")),
    ("waiting for the GIL", ("pthread_cond_timedwait", "pthread_cond_wait")),
    ("LMDB commit (page writes, fdatasync)", ("fdatasync", "mdb_page_flush",
                                              "mdb_env_write_meta", "trans_commit")),
    ("Python GC", ("gc_collect_main",)),
    ("LMDB puts, gets, scans", ("LmdbTx.", "trans_put", "trans_get", "trans_delete", "mdb",
                                "_cursor_get", "env_begin", "make_trans")),
    ("credit step (local consumer rules)", ("apply_credits", "credit_grab")),
    ("remote credits: outbox, apply", ("remote_credits", "apply_remote_credits",
                                       "publish_remote_credit", "xcredit")),
    ("relay and consumer (bus.py)", ("cluster/bus.py",)),
    ("nats client (publish, fetch, acks)", ("nats/",)),
    ("ledger: grab rules, Books, writer", ("rules.py", "store.py", "keys.py", "_contract.py",
                                           "_writer.py", "_records")),
    ("routing interceptor", ("routing.py",)),
    ("use case: id checks, gate, settle", ("grabbing.py", "checks.py", "_gate")),
    ("servicer: items to tuples, results to protobuf", ("servicers/envelope.py",)),
    ("admission, metrics, other interceptors", ("interceptors/", "qos/", "metrics.py")),
    ("grpc core, event loop", ("cygrpc", "grpc", "uvloop", "asyncio/")),
)


# Without --native a stack ends in the Python frame that called into C; these leaves say
# what that C call was.
_LEAVES = (
    ("GroupCommitWriter._run ", "idle: writer waiting for work"),
    ("GroupCommitWriter._apply ", "LMDB commit (page writes, fdatasync)"),
    ("Runner.run ", "grpc core, event loop"),
)


# Frames whose inclusive samples are printed too: what the writer and the loop work for.
_WITHIN = ("grab_many", "apply_credits", "apply_remote_credits", "remote_credits_due",
           "remote_credits_sent", "trans_commit", "CreditRelay.run", "CreditRelay._publish",
           "CreditConsumer.run", "EnvelopeServicer.BatchGrab", "_BatchSplit.run")


def _bucket(frames: list[str], thread: str) -> str:
    if "_poll_wrapper" in thread and not any("epoll" in f for f in frames):
        return "grpc poller thread (in C, mostly epoll)"
    for leaf, name in _LEAVES:
        if frames and frames[-1].startswith(leaf):
            return name
    for frame in reversed(frames):
        for name, needles in _BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def _profile_summary(path: Path, wall_s: float) -> dict[str, int]:
    """Samples by bucket and thread (py-spy ``--format raw --threads``)."""
    by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]
        by[_bucket(frames[1:], thread)][thread] += int(count)
        for name in _WITHIN:
            if f";{name} (" in stack:
                within[name] += int(count)
        total += int(count)
    threads = sorted({t for c in by.values() for t in c})
    print(f"\nprofile of s1 ({path}): {total} samples at {PROFILE_HZ} Hz over {wall_s:.1f} s "
          "(load and drain)")
    print("| where | samples | share | " + " | ".join(threads) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in threads) + " |")
    for name, counts in sorted(by.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values())
        print(f"| {name} | {n} | {n / max(total, 1):.1%} | "
              + " | ".join(str(counts[t]) for t in threads) + " |")
    print("samples within: " + "; ".join(f"{k} {within[k]}" for k in _WITHIN))
    return {name: sum(c.values()) for name, c in by.items()}


# -- figures ---------------------------------------------------------------------------------


def _table(runs: dict[int, dict], how: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = runs[min(runs)]["direct"]["grabs_per_s"] if 1 in runs else None
    t = Table(title="bench_cluster: durable grabs/s by SETs on one machine "
              "(BatchGrab straight to each envelope's SET)")
    for col in ("SETs", "grabs/s", "x 1-SET", "efficiency", "per SET grabs/s", "cross-SET",
                "credited grabs/s (load + drain)", "SET CPU us/grab load / +drain",
                "cores load: SETs, NATS, clients, others",
                "relay msg/s mean / best 1 s", "applied msg/s", "drain s",
                "lag under load p50 / p99 ms", "lag quiet p50 / p99 ms"):
        t.add_column(col, justify="right")
    for k, run in sorted(runs.items()):
        for label, d in (("", run["direct"]), (" via s1", run.get("entry"))):
            if d is None:
                continue
            ratio = d["grabs_per_s"] / base if base else float("nan")
            c = d["cores_load"]
            b = d["bus"]
            lag = run.get("lag_load", {}) if not label else {}
            quiet = run.get("lag_quiet", {}) if not label else {}
            t.add_row(
                f"{k}{label}", f"{d['grabs_per_s']:,.0f}", f"{ratio:.2f}",
                f"{ratio / k:.2f}",
                " / ".join(f"{v:,.0f}" for v in d["per_set_grabs_per_s"].values()),
                f"{d['cross_share']:.1%}",
                f"{d['grabbed'] / (d['load_s'] + d['drain_s']):,.0f}",
                f"{d['set_cpu_us_per_grab_load']:.1f} / {d['set_cpu_us_per_grab_all']:.1f}",
                f"{c['sets']:.2f}, {c['nats']:.2f}, {c['clients']:.2f}, {c['others']:.2f}",
                f"{b.get('relay_msgs_per_s', 0):,.0f} / {b.get('relay_best_1s', 0):,.0f}",
                f"{b.get('applied_msgs_per_s', 0):,.0f}", f"{d['drain_s']:.1f}",
                _lag_text(lag), _lag_text(quiet))
    Console(width=220).print(t)
    print(how)


def _lag_text(q: dict) -> str:
    if not q.get("n"):
        return "-"
    return f"{q['p50_ms']:,.0f} / {q['p99_ms']:,.0f} (n {q['n']})"


def _details(runs: dict[int, dict], series: bool) -> None:
    """The figures SCALING.md is built from, per run."""
    for k, run in sorted(runs.items()):
        for label, d in (("direct", run["direct"]), ("via s1", run.get("entry"))):
            if d is None:
                continue
            b = d["bus"]
            print(f"\n{k} SET(s), {label}: {d['grabbed']:,} grabbed of {d['items']:,} in "
                  f"{d['load_s']:.2f} s, drained {d['drain_s']:.1f} s later; other outcomes "
                  f"{d['other_outcomes'] or '-'}")
            print("  CPU s, load / load+drain: " + "; ".join(
                f"{name} {d['cpu_load'][name]:.2f} / {d['cpu_all'][name]:.2f}"
                for name in d["cpu_load"]) + f"; clients {d['client_cpu_s']:.2f} (load)")
            print("  cores busy in the drain: " + ", ".join(
                f"{name} {v:.2f}" for name, v in d["cores_drain"].items()))
            print(f"  bus: {b.get('published', 0):,} credits published "
                  f"({b.get('published_by_last_answer', 0):,} by the last answer), stream "
                  f"held at most {b.get('stream_max_messages', 0):,}, "
                  f"{b.get('stream_bytes_per_msg', 0):.0f} B a message stored; NATS "
                  f"{d['nats_cpu_us_per_msg']:.0f} us CPU a credit (3 nodes together; the "
                  f"stream's leader {d['stream_leader']} {d['leader_cpu_us_per_msg']:.0f}); "
                  f"largest credit backlog on a SET {b.get('max_backlog', 0):,}; one message: "
                  f"{d['message'] or '-'} B")
            if series:
                print("  " + "\n  ".join(d["series"]))
            if label != "direct":
                continue
            if run.get("lag_load", {}).get("n"):
                print(f"  credit lag, sampled grabs under load: cross-SET "
                      f"{_lag_text(run['lag_load'])}, missing {run['lag_load']['missing']}")
            if run.get("lag_local", {}).get("n"):
                print(f"  credit lag, sampled grabs under load: same-SET "
                      f"{_lag_text(run['lag_local'])}")
            if "lag_quiet" in run:
                print(f"  credit lag, single cross-SET grabs on the drained cluster: "
                      f"{_lag_text(run['lag_quiet'])}, missing {run['lag_quiet']['missing']}")
        print(f"  {run['reconcile']}")


def _summary(runs: dict[int, dict]) -> dict:
    """What ``hongbao bench`` prints in its table."""
    out: dict[str, Any] = {}
    base = runs[1]["direct"]["grabs_per_s"] if 1 in runs else None
    for k, run in sorted(runs.items()):
        d = run["direct"]
        row = {"grabs_per_s": d["grabs_per_s"], "cross_share": d["cross_share"],
               "credited_grabs_per_s": d["grabbed"] / (d["load_s"] + d["drain_s"]),
               "set_cpu_us_per_grab": d["set_cpu_us_per_grab_all"],
               "relay_msgs_per_s": d["bus"].get("relay_msgs_per_s", 0.0),
               "drain_s": d["drain_s"]}
        if base:
            row["ratio"] = d["grabs_per_s"] / base
            row["efficiency"] = row["ratio"] / k
        if run.get("lag_load", {}).get("n"):
            row["lag_p50_ms"] = run["lag_load"]["p50_ms"]
            row["lag_p99_ms"] = run["lag_load"]["p99_ms"]
        if run.get("lag_quiet", {}).get("n"):
            row["quiet_lag_p50_ms"] = run["lag_quiet"]["p50_ms"]
            row["quiet_lag_p99_ms"] = run["lag_quiet"]["p99_ms"]
        if "entry" in run:
            row["via_s1_grabs_per_s"] = run["entry"]["grabs_per_s"]
        row["reconcile"] = "BALANCED" if "BALANCED" in run["reconcile"] else "NOT BALANCED"
        out[f"sets_{k}"] = row
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="1,2,3", help="cluster sizes to run, in order")
    ap.add_argument("--envelopes", type=int, default=1500, help="envelopes per load phase, "
                    "spread evenly over the SETs")
    ap.add_argument("--shares", type=int, default=100, help="shares per envelope (<= 100)")
    ap.add_argument("--users", type=int, default=20_000, help="grabbers drawn from")
    ap.add_argument("--streams", type=int, default=8, help="BatchGrab streams per client")
    ap.add_argument("--window", type=int, default=2, help="batches in flight per stream")
    ap.add_argument("--sample-every", type=int, default=40, help="every n-th grabber's "
                    "credits are timed (the credit lag under load)")
    ap.add_argument("--probes", type=int, default=300, help="single cross-SET grabs on the "
                    "drained cluster, timed to their credit (0: none)")
    ap.add_argument("--probe-rate", type=float, default=100.0, help="probes a second")
    ap.add_argument("--no-entry", action="store_true", help="skip the run through one "
                    "entry SET in the largest cluster")
    ap.add_argument("--profile", type=Path, help="one more load phase in the largest cluster "
                    "under py-spy record of s1; raw collapsed stacks written here")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--series", action="store_true", help="print the stream and backlogs "
                    "once a second for every phase")
    args = ap.parse_args(argv)
    try:
        args.ks = [int(x) for x in args.sets.split(",")]
    except ValueError:
        ap.error("--sets: comma-separated cluster sizes, such as 1,2,3")
    if not (all(1 <= k <= 8 for k in args.ks) and 1 <= args.envelopes <= 20_000
            and 1 <= args.shares <= 100 and args.shares <= args.users <= 1_000_000
            and 1 <= args.streams <= 64 and 1 <= args.window <= 16
            and args.sample_every >= 1 and 0 <= args.probes <= 5_000
            and 1 <= args.probe_rate <= 2_000):
        ap.error("bounds: sets 1..8, envelopes 1..20000, shares 1..100, users shares..1e6, "
                 "streams 1..64, window 1..16, probes 0..5000, probe-rate 1..2000")
    return args


def _started(root: Path, k: int, attempts: int = 3) -> LocalCluster:
    """A started cluster. Its ports are picked free a moment before each process binds
    them, and on a machine shared with other test runs one can be taken meanwhile: the
    failing process's log is shown and the whole cluster started again on new ports."""
    for attempt in range(1, attempts + 1):
        cluster = LocalCluster(root / f"try{attempt}", sets=k,
                               bank_args=("--log-level", "warning"))
        try:
            return cluster.start()
        except (RuntimeError, TimeoutError) as err:
            log = Path(str(err).rpartition("see ")[2].strip())
            tail = log.read_text()[-600:] if log.is_file() else ""
            print(f"  cluster start failed ({err}); {tail!r}", flush=True)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark (``hongbao bench cluster`` calls this with no arguments)."""
    args = _parse(argv)
    from gateway.ops.natsproc import nats_server_binary

    if nats_server_binary() is None:
        raise SystemExit("nats-server not found: apt-get install -y nats-server")
    runs: dict[int, dict] = {}
    started = time.monotonic()
    mask = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for k in args.ks:
            t = time.monotonic()
            os.sched_setaffinity(0, mask)  # each cluster starts unpinned, then is laid out
            print(f"\n{k} SET(s): starting 3 nats-servers, a bank simulator, {k} SET(s)",
                  flush=True)
            cluster = _started(Path(tmp) / f"k{k}", k)
            try:
                last = k == max(args.ks)
                runs[k] = asyncio.run(_cluster_run(
                    cluster, args, k, entry=last and not args.no_entry,
                    profile=args.profile if last else None))
            finally:
                cluster.stop()  # every process by its pid
                os.sched_setaffinity(0, mask)  # `hongbao bench` goes on to other benchmarks
            print(f"  {k} SET(s) done in {time.monotonic() - t:.0f} s", flush=True)
    pins = "; ".join(
        f"{k} SET(s): " + ", ".join(f"{n} on CPU {c}" for n, c in run["layout"]["sets"].items())
        + f", the rest on CPU {','.join(map(str, run['layout']['rest']))}"
        for k, run in sorted(runs.items()))
    how = (f"{args.envelopes:,} envelopes x {args.shares} shares per phase, grabbers drawn from "
           f"{args.users:,} users, batches of {BATCH_ITEMS}, {args.streams} streams x "
           f"{args.window} in flight per client (one client per SET; through s1: "
           f"streams x SETs); nproc {os.cpu_count()}; pinned by "
           f"{runs[max(runs)]['layout']['by']}: {pins} (the rest: 3 nats-servers, the bank "
           f"simulator, the clients, this process); {time.monotonic() - started:.0f} s in all")
    _table(runs, how)
    _details(runs, args.series)
    result = _summary(runs)
    result["seconds"] = time.monotonic() - started
    return result


if __name__ == "__main__":
    main()
