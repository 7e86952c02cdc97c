"""WatchNotifications streams a user's events and resumes from the last event id."""

from __future__ import annotations

import asyncio

from gateway.client import Client
from hongbao.v1 import notification_pb2
from tests.conftest import run
from tests.test_gateway import grab, send, top_up

CREDITED = notification_pb2.NOTIFICATION_KIND_CREDITED


async def _take(c: Client, meta, after: int, n: int, timeout_s: float = 10.0) -> list:
    call = c.notifications.WatchNotifications(
        notification_pb2.WatchNotificationsRequest(after_event_id=after), metadata=meta)
    got = []
    try:
        async with asyncio.timeout(timeout_s):
            async for resp in call:
                got.append(resp.notification)
                if len(got) == n:
                    break
    finally:
        call.cancel()
    return got


def test_stream_resumes_after_disconnect(stack):
    """Events after the last seen id arrive on a new stream; earlier ones are not repeated."""
    async def scenario():
        async with Client(stack.target) as c:
            owner, fan = stack.meta("owner"), stack.meta("fan")
            await top_up(c, owner, 50_000)
            first = await send(c, owner, 1_000, 2, rid="a")
            g1 = await grab(c, fan, first.envelope_id)
            events = await _take(c, fan, 0, 1)
            assert [(e.kind, e.amount_fen, e.envelope_id) for e in events] == [
                (CREDITED, g1.amount_fen, first.envelope_id)]
            last = events[0].event_id
            second = await send(c, owner, 2_000, 2, rid="b")
            g2 = await grab(c, fan, second.envelope_id)
            resumed = await _take(c, fan, last, 1)
            assert [(e.kind, e.amount_fen, e.envelope_id) for e in resumed] == [
                (CREDITED, g2.amount_fen, second.envelope_id)]
            assert resumed[0].event_id > last
            replay = await _take(c, fan, 0, 2)
            assert [e.event_id for e in replay] == [last, resumed[0].event_id]
    run(scenario())
