"""NotificationService: the caller's payment events (arrives with the bank link)."""

from __future__ import annotations

from gateway import errors
from gateway.services._boundary import maps_errors
from hongbao.v1 import notification_pb2_grpc


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    @maps_errors
    async def WatchNotifications(self, request, context):
        raise errors.Unimplemented("NOTIFICATIONS_UNAVAILABLE",
                                   "payment notifications are not available yet")
        yield  # pragma: no cover - makes this an async generator
