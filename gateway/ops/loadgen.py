"""A load generator: a mix of calls across priority tiers P0-P3, tallied per second.

Each generator is a separate process (``multiprocessing``, context "spawn") with its own
asyncio loop and ``gateway.client.Client``; it makes calls of the kinds in ``MIX`` by
random users, every call with a ``DEADLINE_S`` deadline:

- P0: ``SendEnvelope`` (``ENVELOPE_FEN`` fen in ``ENVELOPE_SHARES`` shares, paid from the
  wallet) and ``GrabEnvelope`` of one of the generator's ``POOL`` latest envelopes;
- P1: ``GetEnvelope`` of one of those envelopes;
- P2: ``GetBalance`` and ``ListTransactions`` (answered ``stale``: degraded);
- P3: ``UnlockPhoto`` (100 fen to another user) and a short ``WatchNotifications`` stream.

Users need money in their wallets before the generators start: each generator sends
``PRESENDS`` envelopes first, then every send costs ``ENVELOPE_FEN`` and every unlock 100
fen. A grab or GetEnvelope before any envelope exists is made a send.

A generator's spec is a dict (picklable: it crosses to the spawned process):

- ``target``: the gateway, ``host:port``;
- ``users``: user ids (at least two) and ``tickets``: one ticket per user, same order;
- ``gid``: the generator's id, unique among those spawned together (request ids carry it);
- ``seed``: its random seed (default: the gid);
- ``rates``: open loop, ``rates[s]`` calls started in second ``s`` on schedule whatever
  became of earlier ones (at most ``MAX_INFLIGHT`` in flight; past it a due call is counted
  ``unsent``); or, when ``rates`` is empty, ``seconds`` and ``in_flight``: closed loop,
  ``in_flight`` callers of P0 calls (one send per four grabs) for ``seconds`` seconds, each
  starting its next call when its last one ends;
- ``throttle``: the client's admission control (``Client(throttle=...)``, default off);
- ``cpus``: CPUs the process is pinned to before grpc starts a thread (default: not pinned).

``spawn(specs)`` starts one process per spec and returns once every one has made its
``PRESENDS`` and said ready; ``Generators.start()`` releases them together at one
``time.monotonic()`` instant ``t0`` (the clock is system-wide); ``Generators.results()``
waits for their results; ``Generators.close()`` (or leaving the ``with`` block) ends every
process spawned::

    with spawn(specs) as gens:
        gens.start()
        results = gens.results()
    merged = merge(results)

All these calls block; from asyncio run them through ``asyncio.to_thread``. A spawned
process imports the parent's main module, so a script that spawns generators keeps its
work under ``if __name__ == "__main__":``.

A generator's result, per second ``s`` counted from ``t0`` by the second a call was
offered (a list of length ``len(rates)``, or ``seconds``):

- ``tally[s][tier]``: index 0 the calls offered in that tier, index ``1 + k`` the calls
  whose outcome was ``OUTCOMES[k]``: ok, degraded (stale), shed (RESOURCE_EXHAUSTED
  ``SHED`` from the server), shed_locally and throttled (the client's ``SHED_LOCALLY`` and
  ``THROTTLED_LOCALLY``), deadline, cancelled, other;
- ``by_kind[s][k]``: the same for ``KINDS[k]`` (a grab or GetEnvelope made a send counts
  as a send here, and in ``tally`` in the tier of the kind picked);
- ``lat_ms[s]``: the latency of every successful P0 call, ms;
- ``lag_ms[s]``: the open loop's worst scheduling lag; ``cpu_s[s]``: the process's CPU
  time, sampled by the open loop during second ``s``; ``unsent[s]``: calls due but not
  started (all zero in a closed loop);
- ``others``: ``{"CODE:REASON": count}`` of the calls tallied ``other``;
- ``throttle``: ``{"shed_locally": n, "throttled_locally": n}`` or None without throttle.

``merge(results)`` sums several generators' tallies per second and tier.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue
import random
import time
from collections import Counter, deque
from typing import Any

import grpc

from gateway.client import Client, call_patiently
from gateway.errors import reason_of
from hongbao.v1 import envelope_pb2, moments_pb2, notification_pb2, wallet_pb2

TIERS = ("P0", "P1", "P2", "P3")
# The mix, by calls: (kind, tier, weight in %).
MIX = (
    ("send", 0, 6), ("grab", 0, 24),  # P0 30 %: one send (5 shares) per four grabs
    ("get_envelope", 1, 15),  # P1 15 %
    ("balance", 2, 25), ("list", 2, 15),  # P2 40 %
    ("unlock", 3, 12), ("watch", 3, 3),  # P3 15 %: photo unlocks, short notification streams
)
KINDS = tuple(k for k, _, _ in MIX)
TIER_OF = {k: t for k, t, _ in MIX}
P0_SHARE = sum(w for _, t, w in MIX if t == 0) / 100
OUTCOMES = ("ok", "degraded", "shed", "shed_locally", "throttled", "deadline", "cancelled",
            "other")
OK, DEGRADED, SHED, SHED_LOCALLY, THROTTLED, DEADLINE, CANCELLED, OTHER = range(8)
_LOCAL = {"SHED": SHED, "SHED_LOCALLY": SHED_LOCALLY, "THROTTLED_LOCALLY": THROTTLED}

DEADLINE_S = 1.0
ENVELOPE_FEN, ENVELOPE_SHARES = 50, 5
POOL = 64  # envelopes a generator grabs from (its most recent sends)
PRESENDS = 20  # envelopes each generator sends before the clock starts
WATCH_MORE, WATCH_GAP_S = 20, 0.05  # a stream reads its first event, then <= 20 more
MAX_INFLIGHT = 6_000  # calls a generator has started and not finished; past it: unsent
TICK_S = 0.002  # the open loop's scheduling tick
START_TIMEOUT_S = 60.0  # to say ready; then, for a ready generator, to be released
RESULT_GRACE_S = DEADLINE_S + 30.0  # past t0 + the longest run, for the results
STOP_TIMEOUT_S = 5.0  # for the processes to end before they are killed


class Load:
    """One generator's calls and tallies: ``tally[second][tier][1 + outcome]``, index 0
    counting the calls offered."""

    def __init__(self, client: Client, users: list[str], metas: list[Any], gid: int,
                 seconds: int, seed: int) -> None:
        self.client, self.users, self.metas, self.gid = client, users, metas, gid
        self.rng = random.Random(seed)
        self.tally = [[[0] * (1 + len(OUTCOMES)) for _ in TIERS] for _ in range(seconds)]
        self.by_kind = [[[0] * (1 + len(OUTCOMES)) for _ in KINDS] for _ in range(seconds)]
        self.cpu_s = [0.0] * seconds  # this process's CPU time (all its threads) per second
        self.lat_ms: list[list[float]] = [[] for _ in range(seconds)]
        self.lag_ms = [0.0] * seconds  # the generator's own loop lag, worst per second
        self.unsent = [0] * seconds  # due but not started (MAX_INFLIGHT)
        self.others: Counter[str] = Counter()
        self.pool: deque[str] = deque(maxlen=POOL)
        self.last_event: dict[int, int] = {}
        self.seq = 0
        self._cum = [sum(w for _, _, w in MIX[:i + 1]) for i in range(len(MIX))]

    def pick(self, p0_only: bool = False) -> str:
        if p0_only:
            return "send" if self.rng.random() < 0.2 else "grab"
        return self.rng.choices(KINDS, cum_weights=self._cum)[0]

    def rid(self, tag: str) -> str:
        self.seq += 1
        return f"g{self.gid}-{tag}{self.seq}"

    async def call(self, kind: str, second: int) -> None:
        """One call of ``kind`` by a random user, tallied in ``second``."""
        user = self.rng.randrange(len(self.users))
        tier = TIER_OF[kind]
        if kind in ("grab", "get_envelope") and not self.pool:
            kind = "send"
        by_kind = self.by_kind[second][KINDS.index(kind)]
        by_kind[0] += 1
        started = time.perf_counter()
        try:
            stale = await getattr(self, "_" + kind)(user, self.metas[user])
            outcome = DEGRADED if stale else OK
        except grpc.aio.AioRpcError as err:
            outcome = self._classify(err)
        self.tally[second][tier][1 + outcome] += 1
        by_kind[1 + outcome] += 1
        if tier == 0 and outcome == OK:
            self.lat_ms[second].append((time.perf_counter() - started) * 1000.0)

    async def presend(self) -> None:
        """A send by a random user, untallied: fills the pool before the clock starts. A
        send the server sheds (a worker still busy from earlier load) is made again after
        its pushback: shedding changed nothing."""
        user = self.rng.randrange(len(self.users))
        await call_patiently(lambda: self._send(user, self.metas[user]))

    def _classify(self, err: grpc.aio.AioRpcError) -> int:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DEADLINE
        if code == grpc.StatusCode.CANCELLED:
            return CANCELLED
        reason = reason_of(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if reason in _LOCAL:
            return _LOCAL[reason]
        self.others[f"{code.name}:{reason or reason_of(err)}"] += 1
        return OTHER

    async def _send(self, user: int, meta: Any) -> bool:
        r = await self.client.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id=self.rid("s"), total_fen=ENVELOPE_FEN, count=ENVELOPE_SHARES,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_BALANCE),
            metadata=meta, timeout=DEADLINE_S)
        self.pool.append(r.envelope_id)
        return False

    async def _grab(self, user: int, meta: Any) -> bool:
        await self.client.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
            envelope_id=self.rng.choice(self.pool), request_id=self.rid("g")),
            metadata=meta, timeout=DEADLINE_S)
        return False

    async def _get_envelope(self, user: int, meta: Any) -> bool:
        await self.client.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
            envelope_id=self.rng.choice(self.pool)), metadata=meta, timeout=DEADLINE_S)
        return False

    async def _balance(self, user: int, meta: Any) -> bool:
        r = await self.client.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta,
                                                timeout=DEADLINE_S)
        return r.stale

    async def _list(self, user: int, meta: Any) -> bool:
        r = await self.client.wallet.ListTransactions(
            wallet_pb2.ListTransactionsRequest(page_size=20), metadata=meta, timeout=DEADLINE_S)
        return r.stale

    async def _unlock(self, user: int, meta: Any) -> bool:
        owner = (user + 1 + self.rng.randrange(len(self.users) - 1)) % len(self.users)
        await self.client.moments.UnlockPhoto(moments_pb2.UnlockPhotoRequest(
            request_id=self.rid("u"), photo_id=f"ph{self.rng.randrange(1000)}",
            owner_id=self.users[owner]), metadata=meta, timeout=DEADLINE_S)
        return False

    async def _watch(self, user: int, meta: Any) -> bool:
        """A short stream: resumes just before the last event this generator saw for the
        user (so one always comes), reads it and what follows within 50 ms, hangs up."""
        after = max(0, self.last_event.get(user, 1) - 1)
        call = self.client.notifications.WatchNotifications(
            notification_pb2.WatchNotificationsRequest(after_event_id=after), metadata=meta,
            timeout=DEADLINE_S)
        last, n = 0, 0
        try:
            async with asyncio.timeout(None) as budget:  # armed at the first event
                async for r in call:
                    last, n = r.notification.event_id, n + 1
                    if budget.when() is None:
                        budget.reschedule(asyncio.get_running_loop().time() + WATCH_GAP_S)
                    if n > WATCH_MORE:
                        break
        except TimeoutError:
            pass  # the budget after the first event; no first event ends in DEADLINE_EXCEEDED
        finally:
            call.cancel()
        self.last_event[user] = last
        return False


async def open_loop(load: Load, rates: list[float], t0: float) -> set[asyncio.Task]:
    """Starts calls on schedule (``rates[s]`` calls/s in second s); returns those in flight."""
    tasks: set[asyncio.Task] = set()
    cum = [0.0]
    for r in rates:
        cum.append(cum[-1] + r)
    started, wake = 0, time.monotonic()
    while (elapsed := (now := time.monotonic()) - t0) < len(rates):
        s = max(0, int(elapsed))
        load.lag_ms[s] = max(load.lag_ms[s], (now - wake) * 1000.0)
        load.cpu_s[s] = time.process_time()
        due = int(cum[s] + (elapsed - s) * rates[s]) if elapsed >= 0 else 0
        started = _start(load, tasks, s, started, due)
        wake = time.monotonic() + TICK_S
        await asyncio.sleep(TICK_S)
    # The calls that fell due between the last tick and the end (a generator that woke
    # late): started now, in the last second, so the schedule is offered whole.
    _start(load, tasks, len(rates) - 1, started, int(cum[-1]))
    return tasks


def _start(load: Load, tasks: set[asyncio.Task], s: int, started: int, due: int) -> int:
    """Starts calls ``started`` .. ``due`` (tallied in second ``s``); returns ``due``."""
    for _ in range(started, due):
        if len(tasks) >= MAX_INFLIGHT:
            load.unsent[s] += 1
            continue
        kind = load.pick()
        load.tally[s][TIER_OF[kind]][0] += 1
        task = asyncio.ensure_future(load.call(kind, s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return max(started, due)


async def closed_loop(load: Load, in_flight: int, seconds: int, t0: float) -> set:
    """``in_flight`` callers, each starting its next P0 call when the last one ends."""
    async def caller() -> None:
        while (elapsed := time.monotonic() - t0) < seconds:
            s = max(0, int(elapsed))
            load.tally[s][0][0] += 1
            await load.call(load.pick(p0_only=True), s)

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return set()


def complete(spec: dict) -> dict:
    """``spec`` with its defaults filled in; raises ValueError when it cannot run."""
    missing = [k for k in ("target", "users", "tickets", "gid") if k not in spec]
    if missing:
        raise ValueError(f"generator spec without {', '.join(missing)}")
    full = {"seed": spec["gid"], "rates": [], "seconds": 0, "in_flight": 0, "throttle": False,
            "cpus": None, **spec}
    if len(full["users"]) < 2 or len(full["tickets"]) != len(full["users"]):
        raise ValueError(f"generator {full['gid']}: two users or more, one ticket each")
    if not full["rates"] and (full["seconds"] < 1 or full["in_flight"] < 1):
        raise ValueError(f"generator {full['gid']}: rates, or seconds and in_flight >= 1")
    return full


def seconds_of(spec: dict) -> int:
    """How many seconds a generator runs (and its result covers)."""
    return len(spec["rates"]) if spec.get("rates") else spec["seconds"]


async def _generate(spec: dict, inbox: Any, outbox: Any) -> None:
    users = spec["users"]
    metas = [Client.bearer(t) for t in spec["tickets"]]
    seconds = seconds_of(spec)
    async with Client(spec["target"], throttle=spec["throttle"]) as client:
        load = Load(client, users, metas, spec["gid"], seconds, spec["seed"])
        for _ in range(PRESENDS):
            await load.presend()
        outbox.put(("ready", spec["gid"], None))
        t0 = await asyncio.to_thread(inbox.get, True, START_TIMEOUT_S)
        if spec["rates"]:
            tasks = await open_loop(load, spec["rates"], t0)
        else:
            tasks = await closed_loop(load, spec["in_flight"], seconds, t0)
        if tasks:  # every call ends by its deadline; the bound is a backstop
            await asyncio.wait(tasks, timeout=DEADLINE_S + 2.0)
        throttle = client.throttle
        outbox.put(("result", spec["gid"], {
            "tally": load.tally, "lat_ms": [[round(x, 3) for x in s] for s in load.lat_ms],
            "lag_ms": load.lag_ms, "unsent": load.unsent, "others": dict(load.others),
            "by_kind": load.by_kind, "cpu_s": load.cpu_s,
            "throttle": None if throttle is None else {
                "shed_locally": throttle.shed_locally,
                "throttled_locally": throttle.throttled_locally},
        }))


def generator_main(spec: dict, inbox: Any, outbox: Any) -> None:
    """A generator process: pinned to ``spec["cpus"]`` before grpc starts any thread. Puts
    ``("ready", gid, None)`` on ``outbox``, takes its start time ``t0`` from ``inbox``, runs,
    puts ``("result", gid, result)``, or ``("error", gid, repr(exc))`` when it fails."""
    try:
        spec = complete(spec)
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])
        asyncio.run(_generate(spec, inbox, outbox))
    except BaseException as exc:
        outbox.put(("error", spec.get("gid"), repr(exc)))
        raise


class Generators:
    """Generator processes spawned together (see ``spawn``): ``start`` releases them,
    ``results`` collects what they tallied, ``close`` ends every one of them."""

    def __init__(self, specs: list[dict]) -> None:
        self.specs = [complete(s) for s in specs]
        gids = [s["gid"] for s in self.specs]
        if not specs or len(set(gids)) != len(gids):
            raise ValueError(f"one spec or more, each with its own gid: {gids}")
        ctx = multiprocessing.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in self.specs]
        self.procs = [ctx.Process(target=generator_main, args=(s, ib, self._outbox), daemon=True)
                      for s, ib in zip(self.specs, self._inboxes, strict=True)]
        self._gids = gids
        self.t0: float | None = None
        self._results: list[dict] | None = None

    def launch(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts the processes; returns once every one is ready to start."""
        for p in self.procs:
            p.start()
        self._collect("ready", time.monotonic() + timeout_s)

    def start(self, delay_s: float = 0.5) -> float:
        """Releases every generator at ``t0 = time.monotonic() + delay_s``; returns ``t0``."""
        if self.t0 is not None:
            raise RuntimeError("the generators were started already")
        self.t0 = time.monotonic() + delay_s
        for ib in self._inboxes:
            ib.put(self.t0)
        return self.t0

    def results(self, timeout_s: float | None = None) -> list[dict]:
        """Every generator's result, in gid order; waits at most ``timeout_s`` (default:
        until ``RESULT_GRACE_S`` after the longest run should have ended)."""
        if self._results is None:
            if self.t0 is None:
                raise RuntimeError("the generators were not started")
            deadline = (time.monotonic() + timeout_s if timeout_s is not None else
                        self.t0 + max(seconds_of(s) for s in self.specs) + RESULT_GRACE_S)
            got = self._collect("result", deadline)
            self._results = [got[g] for g in sorted(got)]
        return self._results

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ends every process: those not done yet are terminated at once, the rest get
        ``timeout_s`` to exit; any still alive then is killed. Idempotent."""
        if self._results is None:
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=timeout_s)

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collect(self, kind: str, deadline: float) -> dict[int, Any]:
        """One ``kind`` message from every generator; raises on an error, or when a
        generator has died without one (seen twice, its message may still be in the pipe)
        or the deadline has passed."""
        got: dict[int, Any] = {}
        suspects: set[int] = set()
        while len(got) < len(self.procs):
            try:
                msg, gid, payload = self._outbox.get(timeout=0.5)
            except queue.Empty:
                dead = {g for g, p in zip(self._gids, self.procs, strict=True)
                        if g not in got and not p.is_alive()}
                if dead & suspects:
                    raise RuntimeError(f"generators {sorted(dead)} ended without {kind}"
                                       ) from None
                if time.monotonic() > deadline:
                    late = sorted(set(self._gids) - set(got))
                    raise RuntimeError(f"generators {late} late with {kind}") from None
                suspects = dead
                continue
            if msg == "error":
                raise RuntimeError(f"generator {gid}: {payload}")
            if msg == kind:
                got[gid] = payload
        return got


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load CPUs) for a server measured under load on this machine: the first
    CPU this process may use for the server, the others for the generators and everything
    else; (None, None) when there is only one. Two processes on one CPU measure their
    contention, not the server."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def spawn(specs: list[dict], ready_timeout_s: float = START_TIMEOUT_S) -> Generators:
    """One spawned process per spec, each ready (its ``PRESENDS`` made) within
    ``ready_timeout_s``; on any failure every process is ended before the error is raised."""
    gens = Generators(specs)
    try:
        gens.launch(ready_timeout_s)
    except BaseException:
        gens.close()
        raise
    return gens


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 1]): the value at rank
    ceil(q * n); the demo's timeline and the benchmarks share it. (A tolerance keeps a
    product like 0.07 * 100 = 7.000000000000001 at rank 7.)"""
    if not sorted_values:
        raise ValueError("no values")
    rank = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values) - 1e-9)))
    return sorted_values[rank - 1]


def merge(results: list[dict]) -> dict:
    """Several generators' results summed per second: ``tiers[s][tier]`` with ``offered``
    and one count per outcome (``OUTCOMES``), ``p0_lat_ms[s]`` every successful P0 call's
    latency, ``others`` the "other" failures by code and reason."""
    lengths = {len(r["tally"]) for r in results}
    if len(lengths) > 1:
        raise ValueError(f"results of different lengths: {sorted(lengths)}")
    seconds = lengths.pop() if lengths else 0
    tiers = []
    for s in range(seconds):
        row = {}
        for t, name in enumerate(TIERS):
            counts = [sum(r["tally"][s][t][i] for r in results) for i in range(1 + len(OUTCOMES))]
            row[name] = {"offered": counts[0], **dict(zip(OUTCOMES, counts[1:], strict=True))}
        tiers.append(row)
    return {"seconds": seconds, "tiers": tiers,
            "p0_lat_ms": [[x for r in results for x in r["lat_ms"][s]] for s in range(seconds)],
            "others": dict(sum((Counter(r["others"]) for r in results), Counter()))}
