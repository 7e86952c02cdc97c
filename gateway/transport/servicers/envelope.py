"""EnvelopeService: thin translation between hongbao.v1 and the sending and grabbing use cases."""

from __future__ import annotations

from gateway import errors
from gateway.domain.model import GrabOutcome, GrabResult
from gateway.transport.servicers._boundary import limited_subject, maps_errors
from gateway.transport.servicers._convert import timestamp_ms
from gateway.usecases import Gateway, SendCommand
from hongbao.v1 import envelope_pb2 as pb
from hongbao.v1 import envelope_pb2_grpc


def _credit_status(r: GrabResult) -> int:
    if r.outcome != GrabOutcome.GRABBED:
        return pb.CREDIT_STATUS_UNSPECIFIED
    return pb.CREDIT_STATUS_CREDITED if r.credited else pb.CREDIT_STATUS_PENDING


class EnvelopeServicer(envelope_pb2_grpc.EnvelopeServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    @maps_errors
    async def SendEnvelope(self, request, context):
        user = limited_subject(self._gw.limits)
        cmd = SendCommand(
            request_id=request.request_id, total_fen=request.total_fen, count=request.count,
            kind=request.kind, greeting=request.greeting, pay_method=request.pay_method,
            card_id=request.card_id, expires_in_s=request.expires_in_seconds)
        r = await self._gw.sending.send(user, cmd)
        return pb.SendEnvelopeResponse(envelope_id=r.envelope_id, status=r.status,
                                       paid_via=r.paid_via, payment_id=r.payment_id)

    @maps_errors
    async def GrabEnvelope(self, request, context):
        user = limited_subject(self._gw.limits)
        r = await self._gw.grabbing.grab(user, request.envelope_id, request.request_id)
        return pb.GrabEnvelopeResponse(outcome=int(r.outcome), amount_fen=r.amount_fen,
                                       remaining_count=r.remaining_count,
                                       credit_status=_credit_status(r))

    @staticmethod
    def _batch_result(item, r: GrabResult | errors.GatewayError) -> pb.BatchGrabResult:
        out = pb.BatchGrabResult(user_id=item.user_id, envelope_id=item.envelope_id,
                                 request_id=item.request_id)
        if isinstance(r, errors.GatewayError):
            out.code = r.code.value[0]
            out.reason = r.reason
            return out
        out.outcome = int(r.outcome)
        out.amount_fen = r.amount_fen
        out.remaining_count = r.remaining_count
        out.credit_status = _credit_status(r)
        return out

    @maps_errors
    async def BatchGrab(self, request_iterator, context):
        """Grabs on behalf of users: the one call where the user is a request field.

        A batch's grabs share one writer request (so one group commit); an
        item refused on its own carries its code and reason; the batch goes on.
        """
        limit = self._gw.settings.batch_grab_max_items
        async for batch in request_iterator:
            if len(batch.items) > limit:
                raise errors.InvalidArgument("BATCH_TOO_LARGE",
                                             f"a batch holds at most {limit} items")
            items = [(i.user_id, i.envelope_id, i.request_id) for i in batch.items]
            results = await self._gw.grabbing.grab_batch(items)
            yield pb.BatchGrabResponse(
                batch_id=batch.batch_id,
                results=[self._batch_result(i, r)
                         for i, r in zip(batch.items, results, strict=True)])

    @maps_errors
    async def GetEnvelope(self, request, context):
        v = await self._gw.grabbing.get_envelope(request.envelope_id)
        env = pb.Envelope(
            envelope_id=v.envelope_id, sender_id=v.sender_id, total_fen=v.total_fen,
            count=v.count, kind=v.kind, status=v.status, remaining_fen=v.remaining_fen,
            remaining_count=v.remaining_count, greeting=v.greeting,
            created_at=timestamp_ms(v.created_at_ms), expires_at=timestamp_ms(v.expires_at_ms),
            grabs=[pb.Grab(user_id=g.user_id, amount_fen=g.amount_fen,
                           grabbed_at=timestamp_ms(g.grabbed_at_ms)) for g in v.grabs],
            best_luck_user_id=v.best_luck_user_id)
        return pb.GetEnvelopeResponse(envelope=env)
