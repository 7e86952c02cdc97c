"""Ticket check: every call names a verified subject with the scope its method needs.

The interceptor reads ``authorization: Bearer <ticket>``, verifies the ticket
(:func:`gateway.security.tickets.verify`) and compares its scopes with :data:`METHOD_SCOPES`.
A method with no entry there is refused (fail closed), except the exempt ones: the
health and reflection services, and ``AuthService/IssueTicket``, whose servicer
checks the issuer key itself.

A refusal is a prebuilt handler of the method's own arity that aborts with the rich
status of :mod:`gateway.errors` (code plus ``ErrorInfo`` reason); it is built once
per reason and arity and reused (:class:`~gateway.transport.interceptors._plumbing.Rejections`).
An accepted call gets the handler whose behaviour first sets :data:`current_claims`,
inside the handler's own task (or, for a sync handler, its worker thread), and
servicers read it with :func:`claims`. For async handlers the variable is left set,
so that the outer access log sees who called once the handler is done (see
:func:`~gateway.transport.interceptors._plumbing.with_context` for why and how).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import grpc

from gateway.errors import GatewayError, PermissionDenied, Unauthenticated
from gateway.security.tickets import DEFAULT_LEEWAY_S, Claims, KeyRing, verify
from gateway.transport.interceptors._plumbing import (
    Rejections,
    metadata_of,
    method_of,
    service_of,
    with_context,
)

__all__ = [
    "EXEMPT",
    "METHOD_SCOPES",
    "SERVICE_SCOPES",
    "AuthInterceptor",
    "claims",
    "current_claims",
]

current_claims: ContextVar[Claims | None] = ContextVar("hongbao_claims", default=None)


def claims() -> Claims:
    """The verified claims of the current call (asserts the auth interceptor ran)."""
    value = current_claims.get()
    assert value is not None, "no verified ticket in this call: is the method exempt?"
    return value


EXEMPT = "-"  # the pseudo scope of methods callable without a ticket

_ENVELOPE = "/hongbao.v1.EnvelopeService/"
_WALLET = "/hongbao.v1.WalletService/"
METHOD_SCOPES: Mapping[str, str] = MappingProxyType({
    _ENVELOPE + "SendEnvelope": "pay",
    _ENVELOPE + "GrabEnvelope": "grab",
    _ENVELOPE + "BatchGrab": "batch",
    _ENVELOPE + "GetEnvelope": "read",
    _WALLET + "GetBalance": "read",
    _WALLET + "ListTransactions": "read",
    _WALLET + "TopUp": "pay",
    _WALLET + "Withdraw": "pay",
    _WALLET + "BindCard": "pay",
    _WALLET + "UnbindCard": "pay",
    _WALLET + "ListCards": "read",
    "/hongbao.v1.NotificationService/WatchNotifications": "read",
    "/hongbao.v1.MomentsService/UnlockPhoto": "pay",  # moves money out of the caller's wallet
    "/hongbao.v1.AuthService/IssueTicket": EXEMPT,
})
# Whole services, keyed by "/<package>.<Service>/"; a method entry above wins.
SERVICE_SCOPES: Mapping[str, str] = MappingProxyType({
    "/hongbao.v1.AdminService/": "admin",
    "/grpc.health.v1.Health/": EXEMPT,
    # The slot map (cluster mode): the addresses a client connects to anyway.
    "/hongbao.v1.ClusterService/": EXEMPT,
    "/grpc.reflection.v1alpha.ServerReflection/": EXEMPT,
    "/grpc.reflection.v1.ServerReflection/": EXEMPT,
})

_AUTHORIZATION = "authorization"
# Distinct refusals are few (one per reason, scope and arity); the bound is a backstop.
_MAX_DENIALS = 256


def scope_for(method: str) -> str | None:
    """The scope ``method`` needs, :data:`EXEMPT`, or None when it is not allowed at all."""
    scope = METHOD_SCOPES.get(method)
    if scope is None:
        scope = SERVICE_SCOPES.get(service_of(method))
    return scope


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a genuine, current ticket holding the method's scope."""

    def __init__(self, keyring: KeyRing, *, leeway_s: int = DEFAULT_LEEWAY_S) -> None:
        self._keyring = keyring
        self._leeway_s = leeway_s
        self._denials = Rejections(_MAX_DENIALS)

    async def intercept_service(  # type: ignore[override]  # may return None, as grpc allows
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        scope = scope_for(method_of(handler_call_details))
        if scope == EXEMPT:
            return await continuation(handler_call_details)
        error: GatewayError | None = None
        verified: Claims | None = None
        if scope is None:
            error = PermissionDenied("METHOD_NOT_ALLOWED", "this method is not open to callers")
        else:
            try:
                verified = verify(
                    self._keyring,
                    _bearer(metadata_of(handler_call_details)),
                    None,
                    self._leeway_s,
                )
            except Unauthenticated as err:
                error = err
            else:
                if scope not in verified.scopes:
                    error = PermissionDenied(
                        "SCOPE_MISSING", f"this method needs scope {scope!r}", scope=scope
                    )
        # The handler is looked up either way: a refusal must match the method's arity.
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: grpc answers UNIMPLEMENTED
        if error is not None:
            return self._denials.handler(handler, error)
        assert verified is not None
        return _with_claims(handler, verified)


def _bearer(metadata: Any) -> str:
    """The ticket in ``authorization: Bearer <ticket>``; '' when there is none."""
    found: str | None = None
    for key, value in metadata or ():
        if key == _AUTHORIZATION:
            if found is not None:
                raise Unauthenticated("TICKET_MALFORMED", "more than one authorization header")
            found = value
    if found is None:
        return ""
    scheme, _, ticket = found.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated("TICKET_MALFORMED", "authorization must be 'Bearer <ticket>'")
    return ticket.strip()


def _with_claims(handler: grpc.RpcMethodHandler, verified: Claims) -> grpc.RpcMethodHandler:
    """``handler`` with :data:`current_claims` set to ``verified`` while it runs."""
    return with_context(handler, current_claims, verified)
