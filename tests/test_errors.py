"""The one error boundary: codes, ErrorInfo reasons and retry pushback reach real clients."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import errors
from tests.conftest import run


class _Refusing(health_pb2_grpc.HealthServicer):
    def __init__(self, err: errors.GatewayError) -> None:
        self.err = err

    async def Check(self, request, context):
        await errors.abort(context, self.err)


async def _call(err: errors.GatewayError) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_Refusing(err), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
            return exc.value
    finally:
        await server.stop(None)


def test_reason_and_code_reach_the_client():
    """A domain error arrives as its class's code with its ErrorInfo reason and message."""
    err = run(_call(errors.FailedPrecondition("INSUFFICIENT_BALANCE", "not enough")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert errors.reason_of(err) == "INSUFFICIENT_BALANCE"
    assert err.details() == "not enough"


def test_shed_requests_carry_retry_pushback():
    """RESOURCE_EXHAUSTED carries grpc-retry-pushback-ms as well as its reason."""
    err = run(_call(errors.ResourceExhausted("WRITER_QUEUE_FULL", "busy", retry_after_ms=50)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.reason_of(err) == "WRITER_QUEUE_FULL"
    assert ("grpc-retry-pushback-ms", "50") in tuple(err.trailing_metadata())
