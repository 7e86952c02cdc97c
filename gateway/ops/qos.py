"""``hongbao qos --target HOST:PORT``: a worker's live QoS state as a refreshing table.

Polls ``AdminService/GetQosStatus`` every ``--interval`` seconds and draws, with
``rich``: the admission level (tier and user priority), the queuing delay, the
event loop's lag and busy share, the writer queue; per tier the offered,
admitted and shed rates (from the difference of two polls) and whether the level
sheds it; the degradations in force; the bus lag per topic; and each bank's
health as the payment butler sees it. ``--once`` prints one table and exits
(rates then read as totals since the worker started).

The call needs an admin ticket: ``--ticket``, or ``--data-dir``/``--key-file`` to
mint one from the gateway's keys. With ``--workers N`` each worker has its own
controller and a connection reaches one of them: the table names the level of
the worker that answered.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from gateway.client import Client
from gateway.security import tickets
from hongbao.v1 import admin_pb2

_TIMEOUT_S = 5.0


def admin_ticket(ticket: str | None, data_dir: Path | None, key_file: Path | None) -> str:
    if ticket:
        return ticket
    ring = (tickets.KeyRing.from_file(key_file) if key_file
            else tickets.KeyRing.load_or_create(data_dir))  # type: ignore[arg-type]
    return tickets.mint(ring, "hongbao-qos", ["admin"], 3600)[0]


def _rate(now: int, before: int | None, seconds: float) -> str:
    if before is None or seconds <= 0:
        return f"{now}"
    return f"{(now - before) / seconds:,.0f}/s"


def render(q: admin_pb2.GetQosStatusResponse, previous: admin_pb2.GetQosStatusResponse | None,
           seconds: float) -> Group:
    """The whole display for one poll (``previous`` gives the rates)."""
    a = q.admission
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]level {a.level}[/] ({a.level_tier}, user priority {a.level_user_priority})"
        + ("" if a.enabled else " [yellow]admission off[/]"))
    head.add_row(
        f"queuing {a.queuing_delay_ms:.2f} ms   loop lag {a.loop_lag_ms:.2f} ms   "
        f"loop busy {a.loop_busy:.0%}   writer queue {q.writer_queue_depth}")
    before = {t.tier: t for t in previous.tiers} if previous is not None else {}
    tiers = Table(title="tiers", expand=True)
    for col in ("tier", "shedding", "offered", "admitted", "shed", "shed total"):
        tiers.add_column(col, justify="left" if col in ("tier", "shedding") else "right")
    for t in q.tiers:
        b = before.get(t.tier)
        tiers.add_row(t.tier, "[red]yes[/]" if t.shedding else "no",
                      _rate(t.offered, b.offered if b else None, seconds),
                      _rate(t.admitted, b.admitted if b else None, seconds),
                      _rate(t.rejected, b.rejected if b else None, seconds), f"{t.rejected}")
    degraded = ", ".join(d.name for d in q.degradations if d.in_force) or "none"
    notes = Table.grid(padding=(0, 2))
    notes.add_row(f"degradations in force: {degraded}",
                  f"moments free {a.moments_free_share:.0%}",
                  f"non-core at {a.noncore_share:.0%}")
    bus = Table(title="bus", expand=True)
    for col in ("topic", "lag", "rate/s"):
        bus.add_column(col)
    for topic in q.topics:
        bus.add_row(topic.topic, f"{topic.lag}", f"{topic.rate_per_second:,.0f}")
    banks = Table(title="banks", expand=True)
    for col in ("bank", "channel", "breaker", "share", "in flight / limit", "errors",
                "p99 ms", "rerouted in"):
        banks.add_column(col)
    for h in q.banks:
        banks.add_row(h.bank_id, h.channel or "direct", h.breaker_state,
                      f"{h.traffic_share:.0%}", f"{h.in_flight} / {h.limit}",
                      f"{h.error_rate:.1%}", f"{h.latency_ms_p99:.1f}", f"{h.rerouted_in}")
    return Group(head, tiers, notes, bus, banks)


async def watch(target: str, ticket: str, *, interval_s: float, once: bool,
                console: Console | None = None) -> int:
    console = console or Console()
    meta = Client.bearer(ticket)
    async with Client(target) as c:
        async def poll() -> admin_pb2.GetQosStatusResponse:
            return await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=meta,
                                              timeout=_TIMEOUT_S)

        try:
            q = await poll()
        except grpc.aio.AioRpcError as err:
            Console(stderr=True).print(
                f"hongbao qos: {target}: {err.code().name}: {err.details()}")
            return 2
        if once:
            console.print(render(q, None, 0.0))
            return 0
        with Live(render(q, None, 0.0), console=console, refresh_per_second=4) as live:
            at = time.monotonic()
            while True:
                await asyncio.sleep(interval_s)
                try:
                    nq = await poll()
                except grpc.aio.AioRpcError as err:
                    live.update(f"[red]{target}: {err.code().name}[/] (retrying)")
                    continue
                now = time.monotonic()
                live.update(render(nq, q, now - at))
                q, at = nq, now
