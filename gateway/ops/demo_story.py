"""The demo's story, phase by phase, against a running gateway (one SET or a cluster).

Each phase shows a live progress bar (rich: done/total, rate, elapsed), ends with a
one-line result, and adds what it saw to the run's record (see ``gateway.ops.report``):
the phases with their times and results, every grab's latency, the card payments from
first answer to final state, the few envelopes whose split the report draws.

The phases: top-ups (and two bound cards for some users); the evening (group envelopes
paid balance-first, grab races, a few envelopes with a short expiry); the midnight peak
(``gateway.ops.demo_peak``); card payments with the bank misbehaving while one bank's
direct channel fails, then the whole bank, so the butler routes around it and AUTO
payments complete on second cards; the expiry of what was never grabbed; and the
reconcile against the bank (``gateway.ops.demo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from gateway.client import Client, call_patiently
from gateway.errors import reason_of
from gateway.ops.loadgen import percentile
from gateway.payments.bank import BankClient
from gateway.qos.controller import MAX_LEVEL
from hongbao.v1 import admin_pb2, envelope_pb2, wallet_pb2

Metadata = tuple[tuple[str, str], ...]  # a call's metadata: here, its ticket

TOP_UP_FEN = 50_000
GROUP_SIZE = 30
CONCURRENCY = 128
SHORT_EXPIRY_S = 8
SHORT_LIVED = 4  # envelopes with the short expiry, grabbed by fewer users than shares
BANKS = ("icbc", "ccb", "abc", "boc")
# The bank misbehaves during the card phase: each a probability per new order.
CARD_FAULTS = {"decline_rate": 0.05, "timeout_rate": 0.05, "lost_response_rate": 0.05,
               "late_debit_rate": 0.05, "late_debit_delay_ms": 500, "latency_ms": 20}
CARD_PHASE_S = 6.0  # at most; a small run's card payments are spread over less (PACE_PER_S)
PACE_PER_S = 20.0
AUTO_FEN = TOP_UP_FEN + 10_000  # more than a wallet holds: AUTO pays by card
OPEN_STATES = ("unknown", "paying", "pending")
ENVELOPE_STATE = {envelope_pb2.ENVELOPE_STATUS_ACTIVE: "succeeded",
                  envelope_pb2.ENVELOPE_STATUS_PAY_UNKNOWN: "unknown",
                  envelope_pb2.ENVELOPE_STATUS_PAYING: "paying",
                  envelope_pb2.ENVELOPE_STATUS_REFUNDED: "refunded",
                  envelope_pb2.ENVELOPE_STATUS_FAILED: "locked",
                  envelope_pb2.ENVELOPE_STATUS_SOLD_OUT: "succeeded",
                  envelope_pb2.ENVELOPE_STATUS_EXPIRED: "succeeded"}
PAYMENT_STATE = {wallet_pb2.PAYMENT_STATUS_SUCCEEDED: "succeeded",
                 wallet_pb2.PAYMENT_STATUS_UNKNOWN: "unknown",
                 wallet_pb2.PAYMENT_STATUS_PENDING: "pending",
                 wallet_pb2.PAYMENT_STATUS_REFUNDED: "refunded",
                 wallet_pb2.PAYMENT_STATUS_FAILED: "locked"}


def yuan(fen: int) -> str:
    return f"{fen / 100:,.2f} yuan"


class _Rate(ProgressColumn):
    """Completed per second since the task started."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f}/s", style="progress.data.speed")


@dataclasses.dataclass
class Phase:
    """A running phase: advance its bar; set ``result`` (its one line) before it ends."""

    progress: Progress
    task: Any
    result: str = ""

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def total(self, n: int) -> None:
        self.progress.update(self.task, total=n)


class Story:
    """The run's shared state: the client, the users and their tickets, the record."""

    def __init__(self, client: Client, bank_target: str, users: list[str],
                 tickets: dict[str, str], admin: Metadata, rng: random.Random,
                 console: Console, envelopes: int) -> None:
        self.c = client
        self.bank_target = bank_target
        self.users = users
        self.tickets = tickets  # each user's ticket (the load generators take them so)
        self.meta = {u: Client.bearer(t) for u, t in tickets.items()}  # a call's metadata
        self.admin = admin
        self.rng = rng
        self.console = console
        self.envelopes = envelopes
        self.t0 = time.monotonic()
        self.record: dict[str, Any] = {"phases": [], "grabs": [], "counted": Counter()}
        self.binders = users[:max(4, len(users) // 8)]
        self.short_lived: list[str] = []
        self.evening_envelopes: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    @contextlib.asynccontextmanager
    async def phase(self, name: str, total: int | None) -> AsyncIterator[Phase]:
        progress = Progress(TextColumn("  {task.description:<22}"), BarColumn(),
                            MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                            console=self.console, transient=True)
        start = self.now()
        with progress:
            ph = Phase(progress, progress.add_task(name, total=total))
            yield ph
        end = self.now()
        self.record["phases"].append({"name": name, "start_s": round(start, 3),
                                      "end_s": round(end, 3), "result": ph.result})
        self.console.print(f"  [bold]{name:<22}[/bold] {ph.result}  "
                           f"[dim]({end - start:.1f} s)[/dim]")

    async def run_all(self, ph: Phase, calls: list[Callable[[], Awaitable[Any]]],
                      concurrency: int = CONCURRENCY) -> list[Any]:
        """Each call (a coroutine function), at most ``concurrency`` at once."""
        sem = asyncio.Semaphore(concurrency)

        async def one(call: Callable[[], Awaitable[Any]]) -> Any:
            async with sem:
                result = await call()
            ph.advance()
            return result

        return await asyncio.gather(*(one(call) for call in calls))

    async def bank(self, faults: dict[str, float] | None = None, bank_id: str = "",
                   channel: str = "", down: bool = False) -> None:
        """Sets the simulator's faults (none: the defaults again)."""
        bank = BankClient(self.bank_target, timeout_s=5)
        try:
            await bank.set_faults(bank_id, faults or {}, channel=channel, down=down)
        finally:
            await bank.close()

    async def settle(self, calm_s: float = 1.0, timeout_s: float = 60.0) -> None:
        """Waits for the bus consumers to catch up and for full admission held ``calm_s``
        (the controller closes its windows a little after the load that moves it)."""
        deadline = time.monotonic() + timeout_s
        calm_since = None
        while time.monotonic() < deadline:
            q = await call_patiently(lambda: self.c.admin.GetQosStatus(
                admin_pb2.GetQosStatusRequest(), metadata=self.admin, timeout=5))
            if all(t.lag == 0 for t in q.topics) and q.admission.level == MAX_LEVEL:
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since >= calm_s:
                    return
            else:
                calm_since = None
            await asyncio.sleep(0.1)


def card_of(user: str, bank: str) -> str:
    """The user's card at ``bank`` (the same every run, unique per user)."""
    return f"{bank}-{6200_0000_0000_0000 + int(user.removeprefix('user')) * 7 + BANKS.index(bank)}"


# -- phase 1: top-ups -------------------------------------------------------------------------


async def top_ups(s: Story) -> None:
    async with s.phase("top-ups", len(s.users) + 2 * len(s.binders)) as ph:
        async def top_up(u: str) -> None:
            # Binders top up from a third bank: their icbc and ccb cards stay untouched
            # until the card phase, whose books on them the bank then shows alone.
            bank = s.rng.choice(BANKS if u not in s.binders else BANKS[2:])
            await s.c.wallet.TopUp(wallet_pb2.TopUpRequest(
                request_id=f"topup-{u}", card_id=card_of(u, bank), amount_fen=TOP_UP_FEN),
                metadata=s.meta[u], timeout=30)

        async def bind(u: str, bank: str) -> None:
            await s.c.wallet.BindCard(wallet_pb2.BindCardRequest(
                request_id=f"bind-{bank}", card_id=card_of(u, bank)),
                metadata=s.meta[u], timeout=30)

        await s.run_all(ph, [functools.partial(top_up, u) for u in s.users])
        # Two bound cards each, icbc first (the preferred one), for the card phase.
        await s.run_all(ph, [functools.partial(bind, u, b) for u in s.binders
                             for b in ("icbc", "ccb")], concurrency=16)
        s.record["counted"]["top_ups_fen"] = TOP_UP_FEN * len(s.users)
        ph.result = (f"{len(s.users)} users topped up {yuan(TOP_UP_FEN * len(s.users))} "
                     f"from cards of {len(BANKS)} banks; {len(s.binders)} bound two cards")


# -- phase 2: the evening ---------------------------------------------------------------------


def _plans(s: Story) -> list[tuple[str, envelope_pb2.SendEnvelopeRequest]]:
    senders = s.rng.sample(s.users, s.envelopes)
    plans = []
    for i, u in enumerate(senders):
        count = s.rng.randint(5, 30)
        lucky = s.rng.random() < 0.8
        total = s.rng.randint(count * 100, min(count * 1500, TOP_UP_FEN // 2))
        if not lucky:
            total -= total % count
        short = i < SHORT_LIVED
        plans.append((u, envelope_pb2.SendEnvelopeRequest(
            request_id=f"send-{i}", total_fen=total, count=count,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY if lucky else envelope_pb2.ENVELOPE_KIND_NORMAL,
            greeting="恭喜发财, 大吉大利", pay_method=envelope_pb2.PAY_METHOD_AUTO,
            expires_in_seconds=SHORT_EXPIRY_S if short else 0)))
    return plans


async def evening(s: Story) -> None:
    plans = _plans(s)
    async with s.phase("the evening", None) as ph:
        ph.total(len(plans))
        sent = await s.run_all(ph, [functools.partial(
            s.c.envelopes.SendEnvelope, r, metadata=s.meta[u], timeout=30) for u, r in plans])
        ids = [r.envelope_id for r in sent]
        s.short_lived = ids[:SHORT_LIVED]
        s.evening_envelopes = ids[SHORT_LIVED:]
        paid_via = Counter(envelope_pb2.PayMethod.Name(r.paid_via) for r in sent)
        attempts = [(u, e) for e in s.evening_envelopes
                    for u in s.rng.sample(s.users, GROUP_SIZE)]
        # The short-lived ones: two grabbers each, so most of each is left to expire.
        attempts += [(u, e) for e in s.short_lived for u in s.rng.sample(s.users, 2)]
        s.rng.shuffle(attempts)
        ph.total(len(plans) + len(attempts))
        outcomes = await s.run_all(ph, [functools.partial(_grab, s, u, e) for u, e in attempts])
        won = [fen for fen in outcomes if fen > 0]
        s.record["counted"]["sent_fen"] = sum(r.total_fen for _u, r in plans)
        s.record["counted"]["grabbed_fen"] = sum(won)
        ms = sorted(lat for _t, lat in s.record["grabs"])
        ph.result = (f"{len(plans)} envelopes ({yuan(sum(r.total_fen for _u, r in plans))}, "
                     f"paid {dict(paid_via)}), {len(attempts)} grabs raced for "
                     f"{sum(r.count for _u, r in plans)} shares: {len(won)} won "
                     f"{yuan(sum(won))}; p99 {percentile(ms, 0.99) if ms else 0.0:.1f} ms")


async def _grab(s: Story, u: str, env_id: str) -> int:
    t = time.perf_counter()
    try:
        r = await s.c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
            envelope_id=env_id, request_id=f"g-{env_id}"), metadata=s.meta[u], timeout=30)
    except grpc.aio.AioRpcError as err:
        s.record["counted"][f"grab_error_{reason_of(err) or err.code().name}"] += 1
        return 0
    s.record["grabs"].append((round(s.now(), 3), round((time.perf_counter() - t) * 1000, 3)))
    return r.amount_fen


# -- phase 4: card payments with a bank failing -------------------------------------------------


@dataclasses.dataclass
class CardPay:
    """One card payment of the card phase and what came of it."""

    id: str
    kind: str  # envelope, withdraw, auto
    user: str
    call: Callable[[], Awaitable[Any]]
    first: str = ""
    first_s: float = 0.0
    final: str = ""
    final_s: float = 0.0


async def card_phase(s: Story) -> None:
    """Card-paid envelopes, withdrawals and AUTO sends over the balance, paced over
    CARD_PHASE_S (less for a few payments) with the bank misbehaving; a third of the way
    in icbc's direct channel goes down, two thirds in all of icbc. Then every unclear
    payment is resolved."""
    pays = _card_payments(s)
    marks: dict[str, float] = {}
    spread_s = min(CARD_PHASE_S, max(2.0, len(pays) / PACE_PER_S))
    async with s.phase("card payments", len(pays)) as ph:
        before = await _ccb_balances(s)
        await s.bank(CARD_FAULTS)
        outage = asyncio.ensure_future(_outage(s, marks, spread_s))
        await _paced(s, ph, pays, spread_s)
        await outage
        await s.bank()  # every fault off, icbc back
        await _resolve(s, pays)
        second = await _second_cards(s, [p for p in pays if p.kind == "auto"], before)
        first = Counter(p.first for p in pays)
        final = Counter(p.final for p in pays if p.first in OPEN_STATES)
        ph.result = (f"{len(pays)} paid by card with faults on: first answers "
                     f"{dict(first)}; unknown resolved as {dict(final)}; "
                     f"{second} AUTO payments completed on the user's second card")
    s.record["card"] = {
        "channel_killed_s": marks.get("direct"), "bank_killed_s": marks.get("bank"),
        "payments": [{"id": p.id, "kind": p.kind, "first": p.first, "first_s": p.first_s,
                      "final": p.final, "final_s": p.final_s} for p in pays]}


def _card_payments(s: Story) -> list[CardPay]:
    pays = []
    others = [u for u in s.users if u not in s.binders]
    for i, u in enumerate(s.rng.sample(others, min(len(others), len(s.users) // 3))):
        if i % 2 == 0:
            req = envelope_pb2.SendEnvelopeRequest(
                request_id=f"card-{i}", total_fen=1_000, count=5,
                kind=envelope_pb2.ENVELOPE_KIND_LUCKY, card_id=card_of(u, "icbc"),
                pay_method=envelope_pb2.PAY_METHOD_CARD, greeting="新春快乐")
            pays.append(CardPay(f"card-{i}", "envelope", u, _caller(
                s, u, s.c.envelopes.SendEnvelope, req, ENVELOPE_STATE)))
        else:
            wreq = wallet_pb2.WithdrawRequest(request_id=f"wd-{i}", card_id=card_of(u, "ccb"),
                                              amount_fen=2_000)
            pays.append(CardPay(f"wd-{i}", "withdraw", u, _caller(
                s, u, s.c.wallet.Withdraw, wreq, PAYMENT_STATE)))
    for i, u in enumerate(s.binders):
        req = envelope_pb2.SendEnvelopeRequest(
            request_id=f"auto-{i}", total_fen=AUTO_FEN, count=10,
            kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=envelope_pb2.PAY_METHOD_AUTO)
        pays.append(CardPay(f"auto-{i}", "auto", u, _caller(
            s, u, s.c.envelopes.SendEnvelope, req, ENVELOPE_STATE)))
    s.rng.shuffle(pays)
    return pays


def _caller(s: Story, u: str, rpc: Callable[..., Awaitable[Any]], req: Any,
            states: Mapping[Any, str]) -> Callable[[], Awaitable[str]]:
    """``rpc(req)`` as user ``u``, answering its status as the phase names it (``states``)."""
    async def call() -> str:
        r = await rpc(req, metadata=s.meta[u], timeout=10)
        return states.get(r.status, "other")
    return call


async def _ask(p: CardPay) -> str:
    try:
        return await p.call()
    except grpc.aio.AioRpcError as err:
        reason = reason_of(err) or err.code().name
        return {"CARD_DECLINED": "declined", "CARD_INSUFFICIENT_FUNDS": "declined"}.get(
            reason, "failed")


async def _paced(s: Story, ph: Phase, pays: list[CardPay], spread_s: float) -> None:
    """Starts the payments evenly over ``spread_s``, each its own task."""
    gap_s = spread_s / max(1, len(pays))

    async def one(p: CardPay) -> None:
        p.first = await _ask(p)
        p.first_s = round(s.now(), 3)
        ph.advance()

    tasks = []
    for p in pays:
        tasks.append(asyncio.ensure_future(one(p)))
        await asyncio.sleep(gap_s)
    await asyncio.gather(*tasks)


async def _outage(s: Story, marks: dict[str, float], spread_s: float) -> None:
    await asyncio.sleep(spread_s / 3)
    await s.bank(CARD_FAULTS, "icbc", channel="direct", down=True)
    marks["direct"] = round(s.now(), 3)
    await asyncio.sleep(spread_s / 3)
    await s.bank(CARD_FAULTS, "icbc", down=True)
    marks["bank"] = round(s.now(), 3)


async def _resolve(s: Story, pays: list[CardPay], timeout_s: float = 60.0) -> None:
    """Asks again (same request ids) until every payment is final."""
    for p in pays:
        if p.first not in OPEN_STATES:
            p.final, p.final_s = p.first, p.first_s
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        open_ = [p for p in pays if not p.final or p.final in OPEN_STATES]
        if not open_:
            return
        await asyncio.sleep(0.5)
        for p in open_:
            p.final = await _ask(p)
            p.final_s = round(s.now(), 3)


async def _ccb_balances(s: Story) -> dict[str, int]:
    bank = BankClient(s.bank_target, timeout_s=5)
    try:
        return {u: await bank.card_balance(card_of(u, "ccb")) for u in s.binders}
    finally:
        await bank.close()


async def _second_cards(s: Story, autos: list[CardPay], before: dict[str, int]) -> int:
    """How many AUTO payments the user's second card (ccb) paid, by the bank's own books."""
    after = await _ccb_balances(s)
    paid = 0
    for p in autos:
        if after[p.user] < before[p.user] and p.final == "succeeded":
            paid += 1
            p.first = "second card"
    return paid


# -- phase 5: expiry ------------------------------------------------------------------------------


async def expiry(s: Story, timeout_s: float = 30.0) -> None:
    """Waits for the short-lived envelopes to expire and be refunded; their split too."""
    async with s.phase("expiry", len(s.short_lived)) as ph:
        deadline = time.monotonic() + timeout_s
        done: dict[str, Any] = {}
        while len(done) < len(s.short_lived) and time.monotonic() < deadline:
            for env in s.short_lived:
                if env in done:
                    continue
                v = (await call_patiently(lambda e=env: s.c.envelopes.GetEnvelope(
                    envelope_pb2.GetEnvelopeRequest(envelope_id=e),
                    metadata=s.meta[s.users[0]]))).envelope
                if v.status == envelope_pb2.ENVELOPE_STATUS_EXPIRED:
                    done[env] = v
                    ph.advance()
            await asyncio.sleep(0.5)
        back = sum(v.total_fen - sum(g.amount_fen for g in v.grabs) for v in done.values())
        s.record["counted"]["expiry_refunds_fen"] = back
        ph.result = (f"{len(done)} of {len(s.short_lived)} envelopes expired unfinished; "
                     f"{yuan(back)} went back to their senders")


async def splits(s: Story, n: int = 6) -> None:
    """A few sold-out lucky envelopes as the report draws them."""
    out = []
    for env in s.evening_envelopes:
        v = (await call_patiently(lambda e=env: s.c.envelopes.GetEnvelope(
            envelope_pb2.GetEnvelopeRequest(envelope_id=e),
            metadata=s.meta[s.users[0]]))).envelope
        if v.kind == envelope_pb2.ENVELOPE_KIND_LUCKY and v.best_luck_user_id:
            out.append({"id": v.envelope_id, "total_fen": v.total_fen,
                        "shares_fen": [g.amount_fen for g in v.grabs],
                        "best_luck_user": v.best_luck_user_id})
        if len(out) == n:
            break
    s.record["envelopes"] = out
