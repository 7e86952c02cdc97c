"""AuthService: mints tickets for callers holding the issuer key."""

from __future__ import annotations

from gateway import errors
from gateway.security import tickets
from gateway.transport.servicers._boundary import maps_errors
from gateway.transport.servicers._convert import timestamp_ms
from hongbao.v1 import auth_pb2 as pb
from hongbao.v1 import auth_pb2_grpc

ISSUER_KEY_HEADER = "x-hongbao-issuer-key"


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, keyring: tickets.KeyRing) -> None:
        self._keyring = keyring

    @maps_errors
    async def IssueTicket(self, request, context):
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == ISSUER_KEY_HEADER:
                presented = value
        if not presented or not self._keyring.check_issuer_key(presented):
            raise errors.Unauthenticated("ISSUER_KEY_INVALID", "a valid issuer key is required")
        ttl_s = request.ttl_seconds or 3600
        ticket, expires_at = tickets.mint(self._keyring, request.user_id, request.scopes, ttl_s)
        return pb.IssueTicketResponse(ticket=ticket, expires_at=timestamp_ms(expires_at * 1000))
