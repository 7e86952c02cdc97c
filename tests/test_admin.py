"""AdminService: consumer rates shave peaks, QoS status shows lag and bank health."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.errors import reason_of
from hongbao.v1 import admin_pb2
from tests.conftest import run
from tests.test_gateway import balance, grab, send, top_up, wait_credited


def test_pausing_the_credit_topic_defers_credits_without_losing_them(stack):
    """Rate 0 pauses crediting: grabs still answer, money waits as pending, then lands."""
    async def scenario():
        async with Client(stack.target) as c:
            admin = stack.meta("ops", scopes=("admin",))
            paused = await c.admin.SetConsumerRate(
                admin_pb2.SetConsumerRateRequest(topic="credit", rate_per_second=0),
                metadata=admin)
            assert paused.rate_per_second == 0
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 3_000, 3)
            got = [await grab(c, stack.meta(u), sent.envelope_id) for u in ("x", "y", "z")]
            await asyncio.sleep(0.5)
            b = await balance(c, stack.meta("x"))
            assert (b.balance_fen, b.pending_credit_fen) == (0, got[0].amount_fen)
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin)
            lag = {t.topic: t.lag for t in qos.topics}
            assert lag["credit"] == 3 and lag["payment-unknown"] == 0
            assert {h.bank_id for h in qos.banks} == {"icbc", "ccb", "abc", "boc"}
            assert all(h.breaker_state == "closed" for h in qos.banks)
            await c.admin.SetConsumerRate(
                admin_pb2.SetConsumerRateRequest(topic="credit", rate_per_second=1000),
                metadata=admin)
            b = await wait_credited(c, stack.meta("x"))
            assert b.balance_fen == got[0].amount_fen
            for topic, rate, reason in (("nope", 1, "UNKNOWN_TOPIC"), ("credit", -1, "BAD_RATE"),
                                        ("credit", float("nan"), "BAD_RATE")):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await c.admin.SetConsumerRate(admin_pb2.SetConsumerRateRequest(
                        topic=topic, rate_per_second=rate), metadata=admin)
                assert reason_of(exc.value) == reason
            rec = await c.admin.Reconcile(admin_pb2.ReconcileRequest(), metadata=admin)
            assert rec.balanced, rec.discrepancies
    run(scenario())
