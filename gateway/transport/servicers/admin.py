"""AdminService: live state, consumer rates, reconciliation and (cluster mode) the SET's
inter-SET credits (scope `admin`)."""

from __future__ import annotations

from gateway.transport.servicers._boundary import maps_errors
from gateway.usecases import Operations
from hongbao.v1 import admin_pb2 as pb
from hongbao.v1 import admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, operations: Operations) -> None:
        self._ops = operations

    @maps_errors
    async def GetQosStatus(self, request, context):
        status = await self._ops.qos_status()
        topics = [pb.TopicLag(topic=t.topic, lag=t.lag, rate_per_second=t.rate_per_s)
                  for t in status.topics]
        banks = [pb.BankHealth(bank_id=h["bank_id"], limit=h["limit"], in_flight=h["in_flight"],
                               latency_ms_p99=h["latency_ms_p99"], error_rate=h["error_rate"],
                               breaker_state=h["breaker_state"], channel=h["channel"],
                               traffic_share=h["traffic_share"], calls=h["calls"],
                               rerouted_in=h["rerouted_in"], capacity=h["capacity"])
                 for h in status.banks]
        response = pb.GetQosStatusResponse(topics=topics, banks=banks,
                                           writer_queue_depth=status.writer_queue_depth)
        a = status.admission
        if a is not None:
            response.tiers.extend(
                pb.TierStatus(tier=t.tier, shedding=t.shedding, admitted=t.admitted,
                              rejected=t.shed, offered=t.offered) for t in a.tiers)
            response.admission.CopyFrom(pb.AdmissionStatus(
                enabled=a.enabled, level=a.level, level_tier=a.level_tier,
                level_user_priority=a.level_user_priority,
                queuing_delay_ms=a.queuing_delay_ms, loop_lag_ms=a.loop_lag_ms,
                windows=a.windows, moments_free_share=a.free_share,
                noncore_share=a.noncore_share, loop_busy=a.loop_busy))
            response.degradations.extend(
                pb.Degradation(name=name, in_force=on, served=a.served.get(name, 0))
                for name, on in a.degradations.items())
        return response

    @maps_errors
    async def SetConsumerRate(self, request, context):
        rate = self._ops.set_consumer_rate(request.topic, request.rate_per_second)
        return pb.SetConsumerRateResponse(topic=request.topic, rate_per_second=rate)

    @maps_errors
    async def Reconcile(self, request, context):
        report = await self._ops.reconcile(bank_cross_check=not request.skip_bank_cross_check)
        return pb.ReconcileResponse(balanced=report.balanced,
                                    discrepancies=report.discrepancies,
                                    report_json=report.to_json())

    @maps_errors
    async def ListInterSetCredits(self, request, context):
        async for chunk in self._ops.interset_credits():
            yield pb.ListInterSetCreditsResponse(
                credits=[pb.InterSetCredit(peer_set=c.peer, direction=int(c.direction),
                                           transfer_id=c.transfer_id, amount_fen=c.amount_fen,
                                           in_outbox=c.in_outbox)
                         for c in chunk.credits],
                interset_fen=chunk.balances)

    @maps_errors
    async def ExportSlots(self, request, context):
        e = await self._ops.export_slots(list(request.slots), request.to_set, request.move_id,
                                         request.map_version)
        return pb.ExportSlotsResponse(move_id=e.move_id, chunks=e.chunks, wallets=e.wallets,
                                      wallet_fen=e.wallet_fen, envelopes=e.envelopes,
                                      escrow_fen=e.escrow_fen, records=e.records)

    @maps_errors
    async def GetImportStatus(self, request, context):
        return pb.GetImportStatusResponse(
            complete=await self._ops.import_complete(request.move_id))
