"""A small asyncio client for the gateway (demo, tests, benchmarks)."""

from __future__ import annotations

import grpc

from hongbao.v1 import (
    admin_pb2_grpc,
    auth_pb2_grpc,
    envelope_pb2_grpc,
    notification_pb2_grpc,
    wallet_pb2_grpc,
)


class Client:
    """Stubs over one channel; each call names the ticket it carries."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.envelopes = envelope_pb2_grpc.EnvelopeServiceStub(self.channel)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self.channel)
        self.notifications = notification_pb2_grpc.NotificationServiceStub(self.channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    @staticmethod
    def bearer(ticket: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ticket}"),)

    async def close(self) -> None:
        await self.channel.close(grace=None)  # cancels calls still in flight at once

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
