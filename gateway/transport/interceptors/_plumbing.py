"""What every server interceptor does with grpc's handler objects, in one place.

An interceptor module keeps only its own policy (who may call, what to log, what to
admit); the mechanics it shares with the others live here:

- reading the call: :func:`method_of`, :func:`metadata_of`, :func:`service_of`;
- wrapping a handler's behaviour whatever its RPC kind (unary-unary, unary-stream,
  stream-unary, stream-stream) and however grpc runs it (awaited, iterated
  asynchronously, or in its thread pool): :func:`behaviour_of`, :func:`behaviour_kind`,
  :func:`with_behaviour`;
- refusing a call with a prebuilt handler of the method's own arity that aborts with a
  precise code and ``ErrorInfo`` reason: :class:`Rejections`, :func:`rejection_handler`;
- running the behaviour with a context variable set: :func:`with_context`, and the
  variable behind a ``structlog.contextvars`` key: :func:`structlog_var`.

Why wrap the behaviour rather than set a variable in ``intercept_service``: recent grpcio
runs interceptors and handler in one context, but that is an implementation detail older
releases did not share, and sync handlers run in a thread pool that never sees the
interceptor's context. A wrapper is one closure and one handler tuple per call (see
``bench/bench_tickets.py``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
import structlog

from gateway.errors import GatewayError, rich_status, trailing_metadata

__all__ = [
    "ASYNC",
    "ASYNC_GEN",
    "HANDLER_FACTORIES",
    "SYNC",
    "Behaviour",
    "Rejections",
    "behaviour_kind",
    "behaviour_of",
    "code_of",
    "code_of_exception",
    "metadata_of",
    "method_of",
    "rejection_handler",
    "service_of",
    "structlog_var",
    "with_behaviour",
    "with_context",
]

T = TypeVar("T")

# A handler's behaviour: (request or request iterator, context) -> response(s).
Behaviour = Callable[..., Any]

# -- reading the call ----------------------------------------------------------------------


def method_of(details: grpc.HandlerCallDetails) -> str:
    """The full method name, ``/<package>.<Service>/<Method>``."""
    return details.method


def metadata_of(details: grpc.HandlerCallDetails) -> Any:
    """The invocation metadata: (key, value) pairs, or None when the caller sent none."""
    return details.invocation_metadata


def service_of(method: str) -> str:
    """The ``/<package>.<Service>/`` prefix of a full method name."""
    return method[: method.rfind("/") + 1]


def code_of(context: Any) -> str:
    """The status code name a handler has set on ``context`` ("OK" when none)."""
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def code_of_exception(context: Any, exc: BaseException) -> str:
    """The status code name of a call its handler ended by raising ``exc``."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"  # the caller went away (a closed stream ends with GeneratorExit)
    if isinstance(exc, grpc.aio.AbortError):
        return code_of(context)
    # Anything else is a bug in the servicer; grpc reports it as UNKNOWN unless the
    # handler had set a code first.
    code = code_of(context)
    return "UNKNOWN" if code == "OK" else code


# -- behaviour wrapping by RPC kind --------------------------------------------------------

ASYNC, ASYNC_GEN, SYNC = "async", "async_gen", "sync"

HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour_kind(fn: Behaviour) -> str:
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


def behaviour_of(handler: Any) -> Behaviour:
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


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` (same arity and serializers) running ``behaviour``."""
    req, resp = handler.request_streaming, handler.response_streaming
    if type(handler) is _GRPC_HANDLER_TYPE:
        # The stubs declare RpcMethodHandler without its namedtuple fields.
        return _GRPC_HANDLER_TYPE(  # type: ignore[call-arg]
            req, resp, handler.request_deserializer, handler.response_serializer,
            None if req or resp else behaviour,
            behaviour if resp and not req else None,
            behaviour if req and not resp else None,
            behaviour if req and resp else None,
        )
    return HANDLER_FACTORIES[req, resp](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# -- prebuilt rejections -------------------------------------------------------------------


def rejection_handler(
    status: grpc.Status, reason: str, request_streaming: bool, response_streaming: bool
) -> grpc.RpcMethodHandler:
    """A handler of the given arity that aborts every call with ``status``.

    It binds ``reason`` for the access log line, which then says why the call was refused.
    """
    # A coroutine serves every arity: grpc awaits it for unary and streaming responses
    # alike. No deserializer: the request, if any, is never read.
    async def reject(request: Any, context: Any) -> None:
        structlog.contextvars.bind_contextvars(reason=reason)
        await context.abort_with_status(status)

    return HANDLER_FACTORIES[request_streaming, response_streaming](reject)


class Rejections:
    """Refusals built once per distinct error and arity, then reused.

    A refusal must have the arity of the method it stands in for (grpc drives a stream
    differently from a unary call), so it is asked for with the handler the continuation
    returned. Distinct refusals are few (one per reason, detail and arity); ``limit``
    bounds the cache all the same, and past it refusals are built per call.
    """

    def __init__(self, limit: int = 256) -> None:
        assert limit >= 0
        self._limit = limit
        self._handlers: dict[tuple[Any, ...], grpc.RpcMethodHandler] = {}

    def __len__(self) -> int:
        return len(self._handlers)

    def handler(self, handler: grpc.RpcMethodHandler, err: GatewayError) -> grpc.RpcMethodHandler:
        """The handler that refuses ``handler``'s call with ``err``'s status and reason."""
        arity = (handler.request_streaming, handler.response_streaming)
        key = (type(err), err.reason, err.message, tuple(sorted(err.metadata.items())),
               trailing_metadata(err), arity)
        rejection = self._handlers.get(key)
        if rejection is None:
            rejection = rejection_handler(rich_status(err), err.reason, *arity)
            if len(self._handlers) < self._limit:
                self._handlers[key] = rejection
        return rejection


# -- context variables ---------------------------------------------------------------------


def structlog_var(key: str) -> ContextVar[Any]:
    """The context variable behind ``structlog.contextvars`` for ``key``.

    Found through public API (a bind returns tokens, and a token knows its variable).
    Setting it directly is what ``bind_contextvars(key=...)`` does, at a quarter of
    the cost, which matters for something done on every call.
    """
    token = structlog.contextvars.bind_contextvars(**{key: None})[key]
    structlog.contextvars.reset_contextvars(**{key: token})
    return token.var


def with_context(handler: grpc.RpcMethodHandler, var: ContextVar[T], value: T
                 ) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour runs with ``var`` set to ``value``.

    It is set inside the handler's own task (or, for a sync handler, its worker thread).
    For async behaviours the variable is set and deliberately not reset: grpc runs each
    call in its own task, whose context dies with it, and leaving it set lets an outer
    interceptor (the access log) see it once the handler is done. A pool thread's
    context outlives the call, so there it is set and always reset.
    """
    fn = behaviour_of(handler)
    kind = behaviour_kind(fn)
    if kind is ASYNC:
        wrapped = _async_with(fn, var, value)
    elif kind is ASYNC_GEN:
        wrapped = _async_gen_with(fn, var, value)
    else:
        wrapped = _sync_with(fn, var, value, handler.response_streaming)
    return with_behaviour(handler, wrapped)


def _async_with(fn: Behaviour, var: ContextVar[T], value: T) -> Behaviour:
    async def wrapped(request: Any, context: Any) -> Any:
        var.set(value)
        return await fn(request, context)

    return wrapped


def _async_gen_with(fn: Behaviour, var: ContextVar[T], value: T) -> Behaviour:
    async def wrapped(request: Any, context: Any) -> Any:
        var.set(value)
        async for response in fn(request, context):
            yield response

    return wrapped


def _sync_with(fn: Behaviour, var: ContextVar[T], value: T, streaming: bool) -> Behaviour:
    def wrapped(request: Any, context: Any) -> Any:
        token = var.set(value)
        try:
            result = fn(request, context)
        finally:
            var.reset(token)
        return _ContextIterator(result, var, value) if streaming else result

    return wrapped


class _ContextIterator:
    """A sync response stream whose every step runs with the variable set.

    grpc may run each ``next()`` on a different pool thread, so the variable is set
    and reset around each step rather than once.
    """

    __slots__ = ("_it", "_value", "_var")

    def __init__(self, iterable: Any, var: ContextVar[Any], value: Any) -> None:
        self._it: Iterator[Any] = iter(iterable)
        self._var = var
        self._value = value

    def __iter__(self) -> _ContextIterator:
        return self

    def __next__(self) -> Any:
        token = self._var.set(self._value)
        try:
            return next(self._it)
        finally:
            self._var.reset(token)
