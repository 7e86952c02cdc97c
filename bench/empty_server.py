"""An empty grpc.aio server: the baseline that hongbao's cost per call is measured against.

It serves hongbao.v1 ``EnvelopeService`` and ``WalletService`` with handlers that
answer a response built once at start, of the same message type and about the
same size as hongbao's answers (``RESPONSES``), with grpc.aio's defaults: no
interceptors, no reflection, no health service, no settings changed (hongbao's
own server also sets a 0.5 ms GIL switch interval; this one keeps Python's 5 ms), on
asyncio's own event loop unless ``--loop uvloop`` (hongbao's default loop) is given.
What it costs per call is grpc.aio's own work: HTTP/2, the call's coroutine,
protobuf parsing of the request and serializing of the answer.

    python bench/empty_server.py --port 0 --port-file PATH [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from gateway.transport.portfile import write_port_file
from hongbao.v1 import envelope_pb2, envelope_pb2_grpc, wallet_pb2, wallet_pb2_grpc

GRACE_S = 1.0

# What hongbao answers, field for field (values of the same magnitude, so the same sizes):
# a wallet of a few thousand yuan read at a millisecond timestamp; a grabbed share still
# pending credit; an envelope paid from the balance ("env_" + 20 hex digits, no payment id).
RESPONSES = {
    "GetBalance": wallet_pb2.GetBalanceResponse(
        balance_fen=4_987_600, pending_credit_fen=0,
        as_of=timestamp_pb2.Timestamp(seconds=1_796_228_114, nanos=214_000_000)),
    "GrabEnvelope": envelope_pb2.GrabEnvelopeResponse(
        outcome=envelope_pb2.GRAB_OUTCOME_GRABBED, amount_fen=187, remaining_count=42,
        credit_status=envelope_pb2.CREDIT_STATUS_PENDING),
    "SendEnvelope": envelope_pb2.SendEnvelopeResponse(
        envelope_id="env_" + "0123456789abcdef0123", status=envelope_pb2.ENVELOPE_STATUS_ACTIVE,
        paid_via=envelope_pb2.PAY_METHOD_BALANCE),
}


class _Envelopes(envelope_pb2_grpc.EnvelopeServiceServicer):
    async def SendEnvelope(self, request, context):
        return RESPONSES["SendEnvelope"]

    async def GrabEnvelope(self, request, context):
        return RESPONSES["GrabEnvelope"]


class _Wallet(wallet_pb2_grpc.WalletServiceServicer):
    async def GetBalance(self, request, context):
        return RESPONSES["GetBalance"]


async def serve(port: int, port_file: Path | None) -> None:
    """Serves on 127.0.0.1:``port`` until SIGTERM or SIGINT, then stops within GRACE_S."""
    server = grpc.aio.server()
    envelope_pb2_grpc.add_EnvelopeServiceServicer_to_server(_Envelopes(), server)
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(_Wallet(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if port_file is not None:
        write_port_file(port_file, bound)
    await stop.wait()
    await server.stop(GRACE_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = ap.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port, args.port_file))
    else:
        asyncio.run(serve(args.port, args.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
