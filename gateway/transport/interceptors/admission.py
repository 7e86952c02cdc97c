"""Admission control at the door: shed by (tier, user priority) before anything else runs.

Installed outermost, so a shed call costs the least the server can spend on it:
no access line, no ticket verification, no body decoding, no ledger work. For
every call of a tiered method (``gateway.qos.tiers``) it

1. reads the user the ticket claims (:func:`gateway.security.tickets.subject_hint`,
   unverified: it only picks the priority; the auth interceptor still checks
   the ticket of every admitted call) and its hourly-salted priority;
2. asks the governor whether the level admits (tier, priority). If not, the
   call gets a prebuilt refusal of its own arity that never reads the request:
   RESOURCE_EXHAUSTED, ``ErrorInfo`` reason ``SHED`` with metadata ``tier`` and
   ``level``, ``grpc-retry-pushback-ms``, and the level in
   ``x-hongbao-admission-level``. A degradable method (``tiers.DEGRADABLE``)
   goes on instead, with :data:`gateway.qos.pressure.refused` set, and its use
   case answers from its cache. A shed call of any other method skips the inner
   interceptors altogether: its arity comes from the protobuf descriptor pool, so no
   handler is looked up and the ticket is not verified;
3. wraps an admitted call's behaviour: its queuing delay (arrival here to the
   handler's start) goes to the governor and the metrics, the level goes back
   in the trailing metadata of every response (DAGOR's collaborative
   admission: an upstream drops early what this server would shed), and the
   call's code and duration go to the metrics when it ends.

Exempt methods (health, reflection, admin, IssueTicket) are never shed; they
are measured like the others, with tier ``exempt``. Shed calls are counted
in ``hongbao_shed_total`` and summarised by the governor's level log line, not
logged one by one: under overload a JSON line per refusal would be load itself.
Handlers run by grpc's thread pool (sync) pass through unmeasured; the
gateway has none.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool

from gateway.errors import rich_status, with_trailers
from gateway.qos.governor import Governor
from gateway.qos.pressure import refused, shed_error
from gateway.qos.tiers import DEGRADABLE, Tier
from gateway.security.tickets import subject_hint_of_header
from gateway.transport.interceptors._plumbing import (
    ASYNC,
    ASYNC_GEN,
    HANDLER_FACTORIES,
    Behaviour,
    behaviour_kind,
    behaviour_of,
    code_of,
    code_of_exception,
    metadata_of,
    method_of,
    with_behaviour,
    with_context,
)

__all__ = ["LEVEL_HEADER", "AdmissionInterceptor", "RpcMetrics"]

LEVEL_HEADER = "x-hongbao-admission-level"
_AUTHORIZATION = "authorization"
_EXEMPT = "exempt"
_MAX_REFUSALS = 4096  # (tier, level, arity) triples cached; past it, built per call
_MAX_PRIORITIES = 65_536  # tickets whose user priority is remembered


class RpcMetrics(Protocol):
    """What the interceptor reports (``gateway.transport.metrics.Metrics``)."""

    def observe_rpc(self, method: str, tier: str, code: str, seconds: float) -> None: ...
    def shed(self, tier: str, reason: str) -> None: ...
    def observe_queuing(self, seconds: float) -> None: ...


@functools.cache
def _arity(method: str) -> tuple[bool, bool] | None:
    """(request streaming, response streaming) of a method of a compiled proto, or None.

    Read from the protobuf descriptor pool, so a shed call needs no handler lookup.
    """
    service, _, name = method.strip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return bool(found.client_streaming), bool(found.server_streaming)


def _shed_handler(status: grpc.Status, request_streaming: bool, response_streaming: bool
                  ) -> grpc.RpcMethodHandler:
    """A handler of the given arity that ends the call with ``status`` and reads nothing.

    Unlike the shared rejection handler it binds no log context: a shed call never
    reaches the access log (it is counted in the metrics instead).
    """
    async def shed(request: Any, context: Any) -> None:
        await context.abort_with_status(status)

    return HANDLER_FACTORIES[request_streaming, response_streaming](shed)


def _bearer_of(metadata: Any) -> str:
    """The authorization header's value ('' when there is none)."""
    for key, value in metadata or ():
        if key == _AUTHORIZATION:
            return value
    return ""


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Sheds by the governor's level; measures and tags every admitted call."""

    def __init__(self, governor: Governor, metrics: RpcMetrics,
                 table: dict[str, Tier | None]) -> None:
        self._governor = governor
        self._metrics = metrics
        self._table = table
        self._refusals: dict[tuple[int, int, bool, bool], grpc.RpcMethodHandler] = {}
        # authorization header -> user priority, for the current salt period: a client's
        # ticket comes back call after call, and decoding it and hashing the user cost
        # about 2 us of the interceptor's 7.
        self._priorities: dict[str, int] = {}
        self._priorities_epoch = -1

    async def intercept_service(  # type: ignore[override]  # may return None, as grpc allows
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        arrival = time.perf_counter()
        method = method_of(handler_call_details)
        tier = self._table.get(method)
        if tier is None:
            handler = await continuation(handler_call_details)
            return None if handler is None else self._measured(
                handler, method, _EXEMPT, arrival, None)
        gov = self._governor
        priority = self._priority(_bearer_of(metadata_of(handler_call_details)))
        if gov.admit(tier, priority):
            handler = await continuation(handler_call_details)
            return None if handler is None else self._measured(
                handler, method, tier.name, arrival, None)
        self._metrics.shed(tier.name, "level")
        if method in DEGRADABLE:  # goes on, and its use case answers from its cache
            handler = await continuation(handler_call_details)
            return None if handler is None else self._measured(
                handler, method, tier.name, arrival, tier)
        arity = _arity(method)
        if arity is None:  # a tier set in --config for a method no compiled proto has
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            arity = (handler.request_streaming, handler.response_streaming)
        # Otherwise the inner interceptors (access log, ticket check) never run.
        return self._refusal(arity, tier, gov.level)

    def _priority(self, bearer: str) -> int:
        epoch = self._governor.salt_epoch()
        if epoch != self._priorities_epoch or len(self._priorities) >= _MAX_PRIORITIES:
            self._priorities.clear()  # a new hour's salt, or full: start afresh
            self._priorities_epoch = epoch
        priority = self._priorities.get(bearer)
        if priority is None:
            priority = self._governor.user_priority(subject_hint_of_header(bearer))
            self._priorities[bearer] = priority
        return priority

    def _refusal(self, arity: tuple[bool, bool], tier: Tier, level: int
                 ) -> grpc.RpcMethodHandler:
        key = (int(tier), level, *arity)
        refusal = self._refusals.get(key)
        if refusal is None:
            err = shed_error(tier, level, self._governor.pressure.pushback_ms)
            status = with_trailers(rich_status(err), ((LEVEL_HEADER, str(level)),))
            refusal = _shed_handler(status, *arity)
            if len(self._refusals) < _MAX_REFUSALS:
                self._refusals[key] = refusal
        return refusal

    def _measured(self, handler: grpc.RpcMethodHandler, method: str, tier: str,
                  arrival: float, refused_tier: Tier | None) -> grpc.RpcMethodHandler:
        fn = behaviour_of(handler)
        kind = behaviour_kind(fn)
        if kind is ASYNC:
            wrapped = _unary(fn, self, method, tier, arrival)
        elif kind is ASYNC_GEN:
            wrapped = _stream(fn, self, method, tier, arrival)
        else:
            return handler
        measured = with_behaviour(handler, wrapped)
        if refused_tier is not None:
            measured = with_context(measured, refused, refused_tier)
        return measured

    def _start(self, context: Any, arrival: float, tiered: bool) -> float:
        """At the handler's start: the queuing delay, and the level in the trailers."""
        start = time.perf_counter()
        if tiered:
            queued = start - arrival
            self._governor.started(queued)
            self._metrics.observe_queuing(queued)
        context.set_trailing_metadata(((LEVEL_HEADER, self._governor.level_text()),))
        return start


def _unary(fn: Behaviour, ic: AdmissionInterceptor, method: str, tier: str, arrival: float
           ) -> Behaviour:
    tiered = tier != _EXEMPT

    async def wrapped(request: Any, context: Any) -> Any:
        start = ic._start(context, arrival, tiered)
        code = None
        try:
            return await fn(request, context)
        except BaseException as exc:
            code = code_of_exception(context, exc)
            raise
        finally:
            ic._metrics.observe_rpc(method, tier, code or code_of(context),
                                    time.perf_counter() - start)

    return wrapped


def _stream(fn: Behaviour, ic: AdmissionInterceptor, method: str, tier: str, arrival: float
            ) -> Behaviour:
    tiered = tier != _EXEMPT

    async def wrapped(request: Any, context: Any) -> Any:
        start = ic._start(context, arrival, tiered)
        code = None
        try:
            async for response in fn(request, context):
                yield response
        except BaseException as exc:
            code = code_of_exception(context, exc)
            raise
        finally:
            ic._metrics.observe_rpc(method, tier, code or code_of(context),
                                    time.perf_counter() - start)

    return wrapped
