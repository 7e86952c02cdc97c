"""Several worker processes on one port share one LMDB and keep the books exact."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

from gateway.client import Client
from hongbao.v1 import envelope_pb2
from tests.conftest import run
from tests.test_gateway import balance, send, top_up, wait_credited

GRABBED = envelope_pb2.GRAB_OUTCOME_GRABBED


def test_two_workers_give_each_share_once(stack):
    """With --workers 2, users racing over many connections get each share exactly once."""
    stack.gateway.stop()
    with socket.socket() as probe:  # two free ports in a row for the workers' metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    stack.start_gateway("--workers", "2", "--metrics-port", str(metrics_port))

    async def scenario():
        clients = [Client(stack.target) for _ in range(6)]
        try:
            owner = stack.meta("owner")
            await top_up(clients[0], owner, 100_000)
            sent = await send(clients[0], owner, 6_000, 30)
            users = [f"w{i}" for i in range(90)]
            results = await asyncio.gather(*(
                clients[i % 6].envelopes.GrabEnvelope(
                    envelope_pb2.GrabEnvelopeRequest(envelope_id=sent.envelope_id,
                                                     request_id="g"),
                    metadata=stack.meta(u), timeout=10)
                for i, u in enumerate(users)))
            winners = {u: r.amount_fen for u, r in zip(users, results, strict=True)
                       if r.outcome == GRABBED}
            for u, amount in list(winners.items())[:5]:
                b = await wait_credited(clients[0], stack.meta(u), timeout_s=20)
                assert b.balance_fen == amount
            return winners, await balance(clients[0], owner)
        finally:
            for c in clients:
                await c.close()

    winners, owner_balance = run(scenario())
    for i in range(2):  # each worker serves its own metrics page, on metrics_port + i
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/", timeout=5) as r:
            assert b"hongbao_writer_queue_depth" in r.read()
    assert len(winners) == 30 and sum(winners.values()) == 6_000
    assert owner_balance.balance_fen == 94_000


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_killing_a_supervisor_takes_its_workers_with_it(stack):
    """Proc.kill (and a stop that outlasts its wait) SIGKILLs the process group: no orphans."""
    stack.start_gateway("--workers", "2")
    workers = stack.gateway.children()
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    stack.gateway.kill()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)
    stack.start_gateway("--workers", "1")   # the books, checked by the fixture, still balance


def _role_holder(stack) -> int:
    text = (stack.data_dir / "run" / "background.lock").read_text().strip()
    return int(text) if text else 0


def _until(predicate, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_dead_worker_is_restarted_and_the_background_role_moves(stack):
    """kill -9 the worker holding the background role: another worker takes the role (credits
    keep landing), and the supervisor starts the dead one again."""
    stack.start_gateway("--workers", "2")
    sup = stack.gateway
    _until(lambda: len(sup.children()) == 2 and _role_holder(stack) in sup.children(),
           what="two workers, one holding the role")
    holder = _role_holder(stack)
    os.kill(holder, signal.SIGKILL)
    _until(lambda: _role_holder(stack) not in (0, holder) and _alive(_role_holder(stack)),
           what="the role to move")
    _until(lambda: len([w for w in sup.children() if _alive(w)]) == 2, what="the restart")
    assert holder not in sup.children()

    async def grab_and_wait_credit():
        async with Client(stack.target) as c:
            owner = stack.meta("role-owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 1_000, 10)
            for i in range(10):
                r = await c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                    envelope_id=sent.envelope_id, request_id="g"),
                    metadata=stack.meta(f"role-u{i}"), timeout=10)
                assert r.outcome == GRABBED
            for i in range(10):
                await wait_credited(c, stack.meta(f"role-u{i}"))
    run(grab_and_wait_credit())
    log = (stack.root / "gateway.log").read_text()
    assert '"worker_died"' in log and '"worker_restarted"' in log
    assert log.count('"background_role_acquired"') >= 2
