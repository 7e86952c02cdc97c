"""Expired envelopes return their unclaimed money to the sender exactly once."""

from __future__ import annotations

import asyncio
import time

from gateway.client import Client
from hongbao.v1 import envelope_pb2, notification_pb2
from tests.conftest import run
from tests.test_gateway import balance, grab, send, top_up, wait_credited
from tests.test_notifications import _take


async def _wait_expired(c: Client, meta, envelope_id: str, timeout_s: float = 20) -> None:
    """Until the sweeper has refunded the envelope (its status says EXPIRED)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        view = (await c.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
            envelope_id=envelope_id), metadata=meta, timeout=10)).envelope
        if view.status == envelope_pb2.ENVELOPE_STATUS_EXPIRED:
            return
        assert asyncio.get_running_loop().time() < deadline, "not refunded in time"
        await asyncio.sleep(0.05)


def _fast_sweeps(stack, tmp_path) -> None:
    (tmp_path / "sweep.toml").write_text("expiry_sweep_s = 0.05\n")
    stack.start_gateway("--config", str(tmp_path / "sweep.toml"))


def test_expiry_with_partial_grabs(stack, tmp_path):
    """After expiry: grabs answer EXPIRED, the sender gets the unclaimed shares back, once."""
    _fast_sweeps(stack, tmp_path)

    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 5_000, 5, expires_in_seconds=2)
            got = [await grab(c, stack.meta(u), sent.envelope_id) for u in ("a", "b")]
            claimed = sum(g.amount_fen for g in got)
            await _wait_expired(c, owner, sent.envelope_id)
            late = await grab(c, stack.meta("late"), sent.envelope_id)
            assert late.outcome == envelope_pb2.GRAB_OUTCOME_EXPIRED
            assert late.remaining_count == 3
            again = await grab(c, stack.meta("a"), sent.envelope_id)
            assert (again.outcome, again.amount_fen) == (got[0].outcome, got[0].amount_fen)
            b = await balance(c, owner)
            assert b.balance_fen == 10_000 - 5_000 + (5_000 - claimed)
            view = (await c.envelopes.GetEnvelope(
                envelope_pb2.GetEnvelopeRequest(envelope_id=sent.envelope_id),
                metadata=owner)).envelope
            assert view.status == envelope_pb2.ENVELOPE_STATUS_EXPIRED
            assert len(view.grabs) == 2
            events = await _take(c, owner, 0, 2)  # the top-up's, then the refund's
            assert events[0].kind == notification_pb2.NOTIFICATION_KIND_SUCCEEDED
            assert events[1].kind == notification_pb2.NOTIFICATION_KIND_EXPIRED_REFUND
            assert events[1].amount_fen == 5_000 - claimed
            await wait_credited(c, stack.meta("a"))
            await asyncio.sleep(0.5)  # ten more sweeps must not refund twice
            assert (await balance(c, owner)).balance_fen == b.balance_fen
    run(scenario())


def test_expiry_refunds_once_across_kill_9_restarts(stack, tmp_path):
    """SIGKILL the gateway again and again around the deadlines of 20 envelopes, restarting
    it each time (its sweeper runs at once): every unclaimed rest comes back exactly once."""
    _fast_sweeps(stack, tmp_path)

    async def send_and_grab():
        async with Client(stack.target) as c:
            owner = stack.meta("crash-owner")
            await top_up(c, owner, 100_000)
            sent = [await send(c, owner, 1_000, 5, rid=f"x{i}", expires_in_seconds=1)
                    for i in range(20)]
            claimed = 0
            for env in sent[::2]:
                claimed += (await grab(c, stack.meta("crash-grabber"), env.envelope_id)).amount_fen
            return [e.envelope_id for e in sent], claimed

    ids, claimed = asyncio.run(send_and_grab())
    for pause in (0.7, 0.15, 0.25, 0.05, 0.4):   # before, around and after the deadlines
        time.sleep(pause)
        stack.gateway.kill()
        stack.start_gateway()

    async def check():
        async with Client(stack.target) as c:
            owner = stack.meta("crash-owner")
            for env_id in ids:
                await _wait_expired(c, owner, env_id)
            await asyncio.sleep(0.3)
            assert (await balance(c, owner)).balance_fen == 100_000 - 20 * 1_000 + (
                20 * 1_000 - claimed)
    asyncio.run(check())
