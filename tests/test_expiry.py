"""Expired envelopes return their unclaimed money to the sender exactly once."""

from __future__ import annotations

import asyncio

from gateway.client import Client
from hongbao.v1 import envelope_pb2, notification_pb2
from tests.conftest import run
from tests.test_gateway import balance, grab, send, top_up, wait_credited
from tests.test_notifications import _take


def test_expiry_with_partial_grabs(stack):
    """After expiry: grabs answer EXPIRED, the sender gets the unclaimed shares back, once."""
    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 5_000, 5, expires_in_seconds=2)
            got = [await grab(c, stack.meta(u), sent.envelope_id) for u in ("a", "b")]
            claimed = sum(g.amount_fen for g in got)
            await asyncio.sleep(3.5)
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
            await asyncio.sleep(1.5)  # another sweep must not refund twice
            assert (await balance(c, owner)).balance_fen == b.balance_fen
    run(scenario())
