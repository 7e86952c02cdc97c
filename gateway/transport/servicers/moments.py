"""MomentsService: thin translation between hongbao.v1 and the Moments use case."""

from __future__ import annotations

from gateway.transport.servicers._boundary import limited_subject, maps_errors
from gateway.usecases import Gateway
from hongbao.v1 import moments_pb2 as pb
from hongbao.v1 import moments_pb2_grpc


class MomentsServicer(moments_pb2_grpc.MomentsServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    @maps_errors
    async def UnlockPhoto(self, request, context):
        user = limited_subject(self._gw.limits)
        r = await self._gw.moments.unlock(user, request.request_id, request.photo_id,
                                          request.owner_id)
        return pb.UnlockPhotoResponse(payment_id=r.payment_id, amount_fen=r.amount_fen,
                                      free=r.free)
