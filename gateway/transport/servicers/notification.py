"""NotificationService: a server stream of the caller's payment events.

Events live in the caller's durable feed in the ledger (written in the same
transaction as the change they report), so a stream can resume after any
disconnect, or a restart, from the last event id it saw. New events are
picked up by polling the feed; any worker process can serve any user.

The streams are non-core work (P3) and step down under pressure: while the
admission level is raised they poll ``noncore_share`` as often (a tenth, by
default: every second instead of every 100 ms). Nothing is lost by it, the
events wait in the feed, and a stream that finds a full page reads the next
one at once, so it catches up as soon as the level drops.
"""

from __future__ import annotations

import asyncio

from gateway.transport.servicers._boundary import maps_errors, subject
from gateway.transport.servicers._convert import timestamp_ms
from gateway.usecases import Gateway
from hongbao.v1 import notification_pb2 as pb
from hongbao.v1 import notification_pb2_grpc

_PAGE = 100  # events read per look at the feed


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    def __init__(self, gateway: Gateway, poll_s: float = 0.1) -> None:
        self._gw = gateway
        self._poll_s = poll_s

    @maps_errors
    async def WatchNotifications(self, request, context):
        user = subject()
        after = request.after_event_id
        while True:
            events = await self._gw.wallet.notifications(user, after, _PAGE)
            for e in events:
                yield pb.WatchNotificationsResponse(notification=pb.Notification(
                    event_id=e.event_id, kind=e.kind, payment_id=e.payment_id,
                    envelope_id=e.envelope_id, amount_fen=e.amount_fen, message=e.message,
                    created_at=timestamp_ms(e.created_at_ms)))
                after = e.event_id
            if len(events) < _PAGE:
                await asyncio.sleep(self._poll_s / self._gw.pressure.noncore_share)
