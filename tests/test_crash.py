"""Acknowledged money survives SIGKILL of the gateway process."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from gateway.client import Client
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.conftest import run
from tests.test_gateway import balance, send, top_up, wait_credited

GRABBED = envelope_pb2.GRAB_OUTCOME_GRABBED


def test_kill_during_grabs_loses_no_acknowledged_grab(stack):
    """SIGKILL mid-rush: after restart every acknowledged grab is there, credited exactly once."""
    users = [f"u{i:03d}" for i in range(400)]
    acked: dict[str, tuple[str, int]] = {}

    async def rush():
        async with Client(stack.target) as c:
            owner = stack.meta("sender")
            await top_up(c, owner, 1_000_000)
            envs = [(await send(c, owner, 10_000, 100, rid=f"e{i}")).envelope_id
                    for i in range(5)]
            metas = {u: stack.meta(u) for u in users}

            async def one(u, env_id):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    r = await c.envelopes.GrabEnvelope(
                        envelope_pb2.GrabEnvelopeRequest(envelope_id=env_id, request_id="g"),
                        metadata=metas[u], timeout=5)
                    if r.outcome == GRABBED:
                        acked[f"{env_id}/{u}"] = (u, r.amount_fen)

            # The grabs are started 20 at a time, 5 ms apart, so the rush is still being
            # offered when the kill lands, however far the server runs ahead of this client.
            tasks: list[asyncio.Task] = []

            async def offer():
                for i, u in enumerate(users):
                    tasks.append(asyncio.create_task(one(u, envs[i % 5])))
                    if i % 20 == 19:
                        await asyncio.sleep(0.005)
            offering = asyncio.create_task(offer())
            while len(acked) < 50:
                await asyncio.sleep(0.005)
            stack.gateway.kill()  # SIGKILL while grabs are in flight
            await offering
            await asyncio.gather(*tasks)
            return envs

    envs = run(rush())
    assert 0 < len(acked) < len(users), "the kill should land mid-rush"
    stack.start_gateway()

    async def verify():
        async with Client(stack.target) as c:
            seen = {}
            for env_id in envs:
                view = (await c.envelopes.GetEnvelope(
                    envelope_pb2.GetEnvelopeRequest(envelope_id=env_id),
                    metadata=stack.meta("sender"))).envelope
                for g in view.grabs:
                    seen[f"{env_id}/{g.user_id}"] = (g.user_id, g.amount_fen)
            for key, value in acked.items():
                assert seen.get(key) == value, key
            holdings: dict[str, int] = {}
            for user, amount in seen.values():
                holdings[user] = holdings.get(user, 0) + amount
            for user, amount in holdings.items():
                b = await wait_credited(c, stack.meta(user), timeout_s=20)
                assert b.balance_fen == amount, user
            # Retrying an acknowledged grab after the crash returns the same share.
            key, (user, amount) = next(iter(acked.items()))
            r = await c.envelopes.GrabEnvelope(
                envelope_pb2.GrabEnvelopeRequest(envelope_id=key.split("/")[0],
                                                 request_id="g"),
                metadata=stack.meta(user), timeout=5)
            assert (r.outcome, r.amount_fen) == (GRABBED, amount)
            b = await balance(c, stack.meta("sender"))
            assert b.balance_fen == 1_000_000 - 5 * 10_000

    run(verify())


def test_kill_after_top_up_ack_keeps_the_money(stack):
    """A top-up acknowledged just before SIGKILL is in the wallet after restart."""
    async def pay():
        async with Client(stack.target) as c:
            return await top_up(c, stack.meta("zed"), 12_345)

    r = run(pay())
    assert r.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED
    stack.gateway.kill()
    stack.start_gateway()

    async def check():
        async with Client(stack.target) as c:
            return await balance(c, stack.meta("zed"))

    assert run(check()).balance_fen == 12_345
