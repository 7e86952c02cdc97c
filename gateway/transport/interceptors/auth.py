"""Ticket check: every call names a verified subject with the scope its method needs.

The interceptor reads ``authorization: Bearer <ticket>``, verifies the ticket
(:func:`gateway.security.tickets.verify`) and compares its scopes with :data:`METHOD_SCOPES`.
A method with no entry there is refused (fail closed), except the exempt ones: the
health and reflection services, and ``AuthService/IssueTicket``, whose servicer
checks the issuer key itself.

A refusal is a prebuilt handler of the method's own arity that aborts with the rich
status of :mod:`gateway.errors` (code plus ``ErrorInfo`` reason); it is built once
per reason and arity and reused. An accepted call gets the handler whose behaviour
first sets :data:`current_claims`, inside the handler's own task (or, for a sync
handler, its worker thread), and servicers read it with :func:`claims`.

Why wrap the behaviour rather than set the variable in ``intercept_service``: recent
grpcio runs interceptors and handler in one context, but that is an implementation
detail older releases did not share, and sync handlers run in a thread pool that
never sees the interceptor's context. The wrapper is one closure and one handler
tuple per call (see ``bench/bench_tickets.py``).

For async handlers the variable is set and deliberately not reset: grpc runs each
call in its own task, whose context dies with it, and leaving it set lets an outer
interceptor (the access log) see who called once the handler is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import grpc
import structlog

from gateway.errors import GatewayError, PermissionDenied, Unauthenticated, to_status
from gateway.security.tickets import DEFAULT_LEEWAY_S, Claims, KeyRing, verify

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
    "/hongbao.v1.NotificationService/WatchNotifications": "read",
    "/hongbao.v1.AuthService/IssueTicket": EXEMPT,
})
# Whole services, keyed by "/<package>.<Service>/"; a method entry above wins.
SERVICE_SCOPES: Mapping[str, str] = MappingProxyType({
    "/hongbao.v1.AdminService/": "admin",
    "/grpc.health.v1.Health/": EXEMPT,
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
        scope = SERVICE_SCOPES.get(method[: method.rfind("/") + 1])
    return scope


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a genuine, current ticket holding the method's scope."""

    def __init__(self, keyring: KeyRing, *, leeway_s: int = DEFAULT_LEEWAY_S) -> None:
        self._keyring = keyring
        self._leeway_s = leeway_s
        self._denials: dict[tuple[Any, ...], grpc.RpcMethodHandler] = {}

    async def intercept_service(  # type: ignore[override]  # may return None, as grpc allows
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        scope = scope_for(method)
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
                    _bearer(handler_call_details.invocation_metadata),  # type: ignore[attr-defined]
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
            return self._denial(handler, error)
        assert verified is not None
        return _with_claims(handler, verified)

    def _denial(self, handler: grpc.RpcMethodHandler, err: GatewayError) -> grpc.RpcMethodHandler:
        arity = (handler.request_streaming, handler.response_streaming)
        key = (type(err), err.reason, err.message, tuple(sorted(err.metadata.items())), arity)
        denial = self._denials.get(key)
        if denial is None:
            denial = _denial_handler(to_status(err), err.reason, *arity)
            if len(self._denials) < _MAX_DENIALS:
                self._denials[key] = denial
        return denial


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


def _denial_handler(
    status: grpc.Status, reason: str, request_streaming: bool, response_streaming: bool
) -> grpc.RpcMethodHandler:
    # A coroutine serves every arity: grpc awaits it for unary and streaming responses
    # alike. No deserializer: the request, if any, is never read.
    async def deny(request: Any, context: Any) -> None:
        # Bound for the access log line, which then says why the call was refused.
        structlog.contextvars.bind_contextvars(reason=reason)
        await context.abort_with_status(status)

    return _HANDLER_FACTORIES[request_streaming, response_streaming](deny)


_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# -- behaviour wrapping (shared with the logging interceptor) -------------------------------

ASYNC, ASYNC_GEN, SYNC = "async", "async_gen", "sync"


def behaviour_kind(fn: Callable[..., Any]) -> str:
    """How grpc will run ``fn``: awaited, iterated asynchronously, or in its thread pool."""
    code = getattr(fn, "__code__", None)  # functions and bound methods: no inspect call
    if code is not None:
        if code.co_flags & inspect.CO_COROUTINE:
            return ASYNC
        if code.co_flags & inspect.CO_ASYNC_GENERATOR:
            return ASYNC_GEN
        return SYNC
    if inspect.iscoroutinefunction(fn):
        return ASYNC
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GEN
    return SYNC


def behaviour_of(handler: Any) -> Callable[..., Any]:
    """The behaviour function of a ``grpc.RpcMethodHandler``, whatever its arity."""
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


# grpc's own handler type (a namedtuple), found through the public factory. Building
# it directly costs 0.3 us against 0.8 us for the keyword-taking factory, and every
# call pays this once per wrapping interceptor.
_GRPC_HANDLER_TYPE = type(grpc.unary_unary_rpc_method_handler(lambda request, context: None))
_GRPC_HANDLER_FIELDS = (
    "request_streaming", "response_streaming", "request_deserializer", "response_serializer",
    "unary_unary", "unary_stream", "stream_unary", "stream_stream",
)
assert getattr(_GRPC_HANDLER_TYPE, "_fields", None) == _GRPC_HANDLER_FIELDS


def with_behaviour(
    handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` (same arity and serializers) running ``behaviour``."""
    req, resp = handler.request_streaming, handler.response_streaming
    if type(handler) is _GRPC_HANDLER_TYPE:
        return _GRPC_HANDLER_TYPE(  # type: ignore[call-arg]  # the stubs omit the fields
            req, resp, handler.request_deserializer, handler.response_serializer,
            None if req or resp else behaviour,
            behaviour if resp and not req else None,
            behaviour if req and not resp else None,
            behaviour if req and resp else None,
        )
    return _HANDLER_FACTORIES[req, resp](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _with_claims(handler: grpc.RpcMethodHandler, verified: Claims) -> grpc.RpcMethodHandler:
    fn = behaviour_of(handler)
    kind = behaviour_kind(fn)
    wrapped: Callable[..., Any]
    if kind is ASYNC:

        async def wrapped(request: Any, context: Any) -> Any:
            current_claims.set(verified)
            return await fn(request, context)

    elif kind is ASYNC_GEN:

        async def wrapped(request: Any, context: Any) -> Any:  # type: ignore[misc]
            current_claims.set(verified)
            async for response in fn(request, context):
                yield response

    else:
        streaming = handler.response_streaming

        def wrapped(request: Any, context: Any) -> Any:
            # A pool thread's context outlives the call: set, then always reset.
            token = current_claims.set(verified)
            try:
                result = fn(request, context)
            finally:
                current_claims.reset(token)
            return _ClaimsIterator(result, verified) if streaming else result

    return with_behaviour(handler, wrapped)


class _ClaimsIterator:
    """A sync response stream whose every step sees the claims.

    grpc may run each ``next()`` on a different pool thread, so the variable is set
    and reset around each step rather than once.
    """

    __slots__ = ("_claims", "_it")

    def __init__(self, iterable: Any, verified: Claims) -> None:
        self._it: Iterator[Any] = iter(iterable)
        self._claims = verified

    def __iter__(self) -> _ClaimsIterator:
        return self

    def __next__(self) -> Any:
        token = current_claims.set(self._claims)
        try:
            return next(self._it)
        finally:
            current_claims.reset(token)
