"""AdminService: live state, consumer rates and reconciliation (scope `admin`)."""

from __future__ import annotations

import math

from gateway import errors
from gateway.ops import reconcile
from gateway.transport.servicers._boundary import maps_errors
from gateway.usecases import Gateway
from gateway.usecases.background import CreditConsumer
from hongbao.v1 import admin_pb2 as pb
from hongbao.v1 import admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, gateway: Gateway, credit: CreditConsumer | None,
                 resolver=None) -> None:
        self._gw = gateway
        self._credit = credit
        self._resolver = resolver

    @maps_errors
    async def GetQosStatus(self, request, context):
        ledger = self._gw.ledger
        topics = [pb.TopicLag(topic="credit", lag=ledger.credit_backlog(),
                              rate_per_second=self._credit.rate_per_s if self._credit else 0.0)]
        topics.append(pb.TopicLag(
            topic="payment-unknown", lag=len(ledger.due_payments(10_000)),
            rate_per_second=self._resolver.rate_per_s if self._resolver else 0.0))
        banks = [pb.BankHealth(bank_id=h["bank_id"], limit=h["limit"], in_flight=h["in_flight"],
                               latency_ms_p99=h["latency_ms_p99"], error_rate=h["error_rate"],
                               breaker_state=h["breaker_state"])
                 for h in (self._gw.butler.health() if self._gw.butler else ())]
        return pb.GetQosStatusResponse(topics=topics, banks=banks,
                                       writer_queue_depth=ledger.queue_depth)

    @maps_errors
    async def SetConsumerRate(self, request, context):
        consumers = {"credit": self._credit, "payment-unknown": self._resolver}
        if request.topic not in consumers:
            raise errors.NotFound("UNKNOWN_TOPIC", f"no topic {request.topic!r}; "
                                  f"topics: {', '.join(consumers)}")
        rate = request.rate_per_second
        if not math.isfinite(rate) or not 0 <= rate <= 10_000_000:
            raise errors.InvalidArgument("BAD_RATE", "rate_per_second must be in 0..10000000")
        consumer = consumers[request.topic]
        if consumer is None:
            raise errors.FailedPrecondition(
                "NO_CONSUMER_HERE", "this worker runs no consumer of that topic; ask worker 0")
        consumer.rate_per_s = rate
        return pb.SetConsumerRateResponse(topic=request.topic, rate_per_second=rate)

    @maps_errors
    async def Reconcile(self, request, context):
        report = reconcile.audit(self._gw.ledger)
        if self._gw.bank is not None:
            await reconcile.cross_check_bank(report, self._gw.bank)
        return pb.ReconcileResponse(balanced=report.balanced,
                                    discrepancies=report.discrepancies,
                                    report_json=report.to_json())
