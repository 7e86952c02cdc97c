"""Runs one plan on virtual time and checks it: the simulation's main loop.

The clients send their calls at the plan's times to whichever process is alive, and
keep a Jepsen-style history: every call is ``ok``, ``fail`` (a definite refusal, with
its reason), ``unknown`` (the process died, or the client's deadline passed, while it
was in flight) or ``skipped`` (what it needed never existed). After every call the
books are audited, and a call the bank refuses WRONG_CHANNEL fails the run the moment
it happens (``channel``). When the last call is answered, the bank's faults go off (its
channels up) and the world settles: the resolver finishes every unclear payment, the
credits drain, every envelope expires. Then ``gateway.sim.check`` checks the end state
and retries every call once with its request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import traceback
from collections import Counter
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog

from gateway import crashpoints, errors
from gateway.config import Settings
from gateway.domain import keys
from gateway.domain.model import EnvelopeKind, GrabResult, Payment, PayMethod, SendResult
from gateway.sim import check
from gateway.sim.bank import Faults, SimBank
from gateway.sim.mutants import MUTANTS
from gateway.sim.plan import Op, Plan
from gateway.sim.vloop import Stuck, VirtualLoop
from gateway.sim.world import Crashed, Process, World
from gateway.usecases import SendCommand

SETTLE_LIMIT_S = 900.0


@dataclasses.dataclass
class Call:
    """One call of the history."""

    op: Op
    args: tuple = ()      # what was sent (a grab's envelope id is fixed when it is sent)
    outcome: str = ""     # ok | fail | unknown | skipped
    value: Any = None     # the answer, or the refusal's reason, or why it is unknown
    at: float = 0.0


@dataclasses.dataclass
class Result:
    plan: Plan
    failures: list[tuple[str, str]]
    outcomes: Counter
    faults_injected: Counter
    routing: Counter      # bank orders by channel ("via direct", "via clearing"), "moved"
    crashes: list[str]
    checks: int
    trace: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def signature(self) -> str:
        """What failed first (the shrinker keeps a smaller plan only if it fails the same)."""
        return self.failures[0][0] if self.failures else ""


def card_of(user: int) -> str:
    return f"icbc-62220000{user:04d}"


def user_of(user: int) -> str:
    return f"u{user}"


def summary(value: Any) -> tuple:
    """The fields of an answer a retry must repeat."""
    if isinstance(value, Payment):
        return ("payment", value.payment_id, value.status.name, value.reason)
    if isinstance(value, SendResult):
        return ("send", value.envelope_id, PayMethod(value.paid_via).name, value.payment_id)
    if isinstance(value, GrabResult):
        return ("grab", value.outcome.name, value.amount_fen)
    return ("?", repr(value))


def invocation(op: Op, args: tuple, proc: Process):
    """The use-case coroutine of a call, through the process ``proc``."""
    user = user_of(op.user)
    if op.kind == "topup":
        return proc.cards.top_up(user, op.request_id, card_of(op.user), op.amount)
    if op.kind == "withdraw":
        return proc.cards.withdraw(user, op.request_id, card_of(op.user), op.amount)
    if op.kind == "grab":
        return proc.grabbing.grab(user, args[0], op.request_id)
    card = "" if op.method == PayMethod.BALANCE else card_of(op.user)
    kind = EnvelopeKind.LUCKY if op.lucky else EnvelopeKind.NORMAL
    return proc.sending.send(user, SendCommand(op.request_id, op.amount, op.count, kind, "",
                                               op.method, card, op.expires_s))


def envelope_of(call: Call | None) -> str | None:
    if call is None or call.outcome != "ok" or not isinstance(call.value, SendResult):
        return None
    return call.value.envelope_id


class Sim:
    """One run of one plan."""

    def __init__(self, plan: Plan, mutant: str = "none") -> None:
        self.plan = plan
        self.settings = Settings()
        self.bank = SimBank(random.Random(plan.seed * 7919 + 1), opening_fen=plan.opening_fen,
                            timeout_s=self.settings.bank_timeout_s)
        self.bank.on_wrong_channel = lambda what: self.world.fail(
            "channel", f"the bank refused WRONG_CHANNEL: {what}")
        self.mutant = MUTANTS[mutant]()
        self.calls: dict[int, Call] = {}
        self.checks = 0
        self.world: World
        self._timers: list[asyncio.TimerHandle] = []

    async def main(self) -> None:
        self.world = w = World(self.settings, self.bank, self.mutant,
                               crashes=set(self.plan.crashes), restart_s=self.plan.restart_s)
        loop = asyncio.get_running_loop()
        self._timers = [loop.call_at(t, self._set_faults, faults)
                        for t, faults in self.plan.faults]
        self._timers += [loop.call_at(t, self._restart_bank) for t in self.plan.bank_restarts]
        crashpoints.set_hook(w.reach)
        try:
            w.start()
            await asyncio.gather(*(self._client(op) for op in self.plan.ops))
            if not w.failures:
                await self._settle()
            if not w.failures:
                await check.final(self)
        finally:
            crashpoints.set_hook(None)
            await w.stop()

    def _set_faults(self, faults: Faults) -> None:
        self.bank.faults = faults
        self.world.log(f"bank faults {faults.to_json() or 'off'}")

    def _restart_bank(self) -> None:
        self.bank.restart()
        self.world.log("bank restarted (late debits dropped)")

    def _args(self, op: Op) -> tuple | None:
        """What the call sends; None when what it needs does not exist."""
        if op.kind == "retry":
            first = self.calls.get(op.target)
            if first is None or first.outcome == "skipped":
                return None
            return first.args
        if op.kind == "grab":
            env = envelope_of(self.calls.get(op.target))
            return None if env is None else (env,)
        return ()

    async def _client(self, op: Op) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, op.t - loop.time()))
        args = self._args(op)
        real = self.plan_op(op)
        call = self.calls[op.id] = Call(real or op, args or (), at=loop.time())
        if args is None or real is None:
            call.outcome = "skipped"
            return
        await self.send(call, op.deadline_s)
        self.world.log(f"op {op.id} {op.kind} {real.kind if op.kind == 'retry' else ''}"
                       f" user {op.user}: {call.outcome} {summary(call.value)[1:]}"
                       if call.outcome == "ok" else
                       f"op {op.id} {op.kind} user {op.user}: {call.outcome} {call.value}")
        await self.audit(f"after op {op.id}")

    def plan_op(self, op: Op) -> Op | None:
        """The op a call performs: a retry performs its target (same request id, payload)."""
        if op.kind != "retry":
            return op
        first = self.calls.get(op.target)
        return None if first is None else first.op

    async def send(self, call: Call, deadline_s: float) -> None:
        """One call to the live process; the outcome lands in ``call``."""
        proc = self.world.process
        if proc is None:
            call.outcome, call.value = "fail", "UNAVAILABLE (no process is up)"
            return
        task = proc.spawn(invocation(call.op, call.args, proc))
        done, _ = await asyncio.wait([task], timeout=deadline_s)
        if not done:
            task.cancel()  # the deadline passed: grpc cancels the handler
            call.outcome, call.value = "unknown", "deadline"
        elif task.cancelled() or isinstance(task.exception(), Crashed):
            call.outcome, call.value = "unknown", "the process died"
        elif isinstance(task.exception(), errors.GatewayError):
            err = task.exception()
            assert isinstance(err, errors.GatewayError)
            call.outcome, call.value = "fail", err.reason
        elif task.exception() is not None:
            call.outcome, call.value = "unknown", repr(task.exception())
            self.world.fail("handler", f"op {call.op.id} ({call.op.kind}) raised "
                            f"{task.exception()!r}")
        else:
            call.outcome, call.value = "ok", task.result()

    async def audit(self, when: str) -> None:
        self.checks += 1
        report = await self.world.store.audit()
        if not report.balanced:
            self.world.fail("books", f"{when}: {report.discrepancies[0]}")

    async def _settle(self) -> None:
        """Faults off; waits until no payment is open, no credit waits, no envelope holds
        escrow (the process may still die at a planned step on the way)."""
        for timer in self._timers:
            timer.cancel()
        self._set_faults(Faults())
        loop = asyncio.get_running_loop()
        until = loop.time() + SETTLE_LIMIT_S
        while loop.time() < until:
            await asyncio.sleep(1.0)
            report = await self.world.store.audit()
            stats = await self.world.store.stats()
            if (self.world.process is not None and not report.in_flight
                    and not stats.credit_backlog and not report.totals["escrow_fen"]):
                self.world.log("settled")
                return
        report = await self.world.store.audit()
        self.world.fail("settles", f"not settled {SETTLE_LIMIT_S:.0f} s after the last call:"
                        f" {len(report.in_flight)} payments open, escrow "
                        f"{report.totals['escrow_fen']} fen")


@contextlib.contextmanager
def product_logs(into_trace: bool) -> Iterator[None]:
    """The product's own log lines during a run: dropped (thousands of runs a minute would
    drown in them), or written into the run's trace between the calls."""
    saved = structlog.get_config()

    def to_trace(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        what = event.pop("event", "")
        event.pop("timestamp", None)
        event.pop("level", None)
        _SIM.world.log(f"  . {what} " + " ".join(f"{k}={v}" for k, v in event.items()))
        raise structlog.DropEvent

    if into_trace:
        structlog.configure(processors=[to_trace], cache_logger_on_first_use=False)
    else:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
            cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    exc = context.get("exception")
    if not isinstance(exc, Crashed):  # a dead process's orphaned futures are expected
        what = exc if exc is not None else context.get("task") or context.get("future")
        _SIM.world.fail("loop", f"{context.get('message')}: {what!r}")


_SIM: Sim


def run_plan(plan: Plan, mutant: str = "none", *, trace_logs: bool = False) -> Result:
    """Runs ``plan`` to its end on a fresh virtual-time loop; the same plan, the same run.
    ``trace_logs`` writes the product's log lines into the trace."""
    sim = Sim(plan, mutant)
    started = time.perf_counter()
    entropy = random.Random(plan.seed * 31 + 7)
    global _SIM
    _SIM = sim
    with (product_logs(trace_logs), keys.seeded_entropy(entropy.randbytes),
          asyncio.Runner(loop_factory=VirtualLoop) as r):
        r.get_loop().set_exception_handler(_loop_error)
        try:
            r.run(sim.main())
        except Stuck as exc:
            sim.world.fail("stuck", str(exc))
        except Exception as exc:  # the simulation's own checks broke: as loud as a failure
            sim.world.fail("error", f"{exc!r}")
            sim.world.trace += traceback.format_exc().splitlines()
    w = sim.world
    outcomes = Counter(c.outcome for c in sim.calls.values())
    return Result(plan, w.failures, outcomes, Counter(sim.bank.injected), routing(sim.bank),
                  w.crashed, sim.checks, w.trace, time.perf_counter() - started)


def routing(bank: SimBank) -> Counter:
    """The bank's orders by the channel they came through, and the calls a payer moved."""
    found = Counter(f"via {order.channel}" for order in bank.orders.values())
    found["moved"] = bank.moved
    return found
