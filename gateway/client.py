"""A small asyncio client for the gateway (demo, tests, benchmarks).

``Client(target, throttle=True)`` protects an overloaded gateway from its own
callers, in two ways (both local: a call refused here never reaches the wire):

- Collaborative admission (DAGOR): every response carries the server's
  admission level (``x-hongbao-admission-level``); a call whose (tier, user
  priority) is above the last level seen is refused locally, the way the
  server would refuse it. The user priority is computed as the server does
  (``gateway.qos.controller.priority_of``, the hourly salt), from the user the
  call's ticket names. A level is trusted for ``level_ttl_s`` only, so a client
  that sends nothing but shed calls still hears of the recovery.
- Adaptive throttling (Google SRE book, "Handling Overload"): over the last
  ``window_s`` the client counts requests and accepts (calls the server
  answered other than RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED or
  CANCELLED: under overload grpc's core cancels calls it cannot hand over)
  and refuses a call locally with probability ``max(0, (requests - K * accepts) / (requests + 1))``.

A local refusal is a ``grpc.aio.AioRpcError`` with RESOURCE_EXHAUSTED and an
``ErrorInfo`` reason: ``SHED_LOCALLY`` (the level) or ``THROTTLED_LOCALLY``.
Only unary calls are throttled adaptively; streams are checked against the level.

One thing every caller of a grpc.aio stream must handle: when the connection dies under
a stream (the gateway killed or restarted, the network gone), reading the stream or
awaiting its ``code()`` can raise ``asyncio.CancelledError`` rather than an
``AioRpcError``. Treat it like UNAVAILABLE: the call's outcome is unknown, and a money
call is retried with the same request id (the fault campaign's clients do exactly
that, ``gateway/ops/chaos.py``). Catching it is safe only around the grpc call itself,
not around code whose own task may be cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway.errors import DOMAIN
from gateway.qos.controller import MAX_LEVEL, key_of, priority_of, salt_of
from gateway.qos.tiers import DEFAULT_TIERS, Tier
from gateway.security.tickets import subject_hint_of_header
from hongbao.v1 import (
    admin_pb2_grpc,
    auth_pb2_grpc,
    envelope_pb2_grpc,
    moments_pb2_grpc,
    notification_pb2_grpc,
    wallet_pb2_grpc,
)

LEVEL_HEADER = "x-hongbao-admission-level"
# Answers that say the server could not take the call (not an accept, for the throttle).
_OVERLOADED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


class Throttle:
    """The client's side of admission: the server's last level and its accept rate."""

    def __init__(self, *, k: float = 2.0, window_s: float = 10.0, level_ttl_s: float = 1.0,
                 tiers: dict[str, Tier | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random) -> None:
        assert k >= 1 and window_s > 0
        self.k = k
        self._window_s = window_s
        self._level_ttl_s = level_ttl_s
        self._tiers = DEFAULT_TIERS if tiers is None else tiers
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._buckets: collections.deque[list[float]] = collections.deque()  # [t, req, acc]
        self._level = MAX_LEVEL
        self._level_at = -math.inf
        self._salt_epoch = -1
        self._salt = b""
        self.shed_locally = 0
        self.throttled_locally = 0

    def tier_of(self, method: str) -> Tier | None:
        return self._tiers.get(method)

    def _priority(self, user: str) -> int:
        epoch = int(self._wall_clock() // 3600)
        if epoch != self._salt_epoch:
            self._salt_epoch, self._salt = epoch, salt_of(epoch)
        return priority_of(user, self._salt)

    def refusal(self, tier: Tier, user: str, *, adaptive: bool = True) -> str | None:
        """The reason to refuse this call locally, or None to send it."""
        now = self._clock()
        if now - self._level_at <= self._level_ttl_s and \
                key_of(tier, self._priority(user)) > self._level:
            self.shed_locally += 1
            return "SHED_LOCALLY"
        if not adaptive or tier == Tier.P0:
            return None
        requests, accepts = self._counts(now)
        if self._rng() < max(0.0, (requests - self.k * accepts) / (requests + 1)):
            self._bucket(now)[1] += 1  # a refused request still counts as a request
            self.throttled_locally += 1
            return "THROTTLED_LOCALLY"
        return None

    def check(self, details: Any, *, adaptive: bool) -> Tier | None:
        """Raises the local refusal for a call that must not be sent; else its tier
        (None for a method without one, which is neither checked nor recorded)."""
        method = details.method
        tier = self.tier_of(method.decode() if isinstance(method, bytes) else method)
        if tier is not None:
            reason = self.refusal(tier, _user_of(details.metadata), adaptive=adaptive)
            if reason is not None:
                raise _local_refusal(reason, tier)
        return tier

    def record(self, accepted: bool, level: str | None) -> None:
        """One sent call's outcome and the level its response carried."""
        now = self._clock()
        bucket = self._bucket(now)
        bucket[1] += 1
        if accepted:
            bucket[2] += 1
        if level is not None and level.isdigit():
            self._level, self._level_at = min(int(level), MAX_LEVEL), now

    def _bucket(self, now: float) -> list[float]:
        if not self._buckets or now - self._buckets[-1][0] >= 1.0:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def _counts(self, now: float) -> tuple[float, float]:
        while self._buckets and now - self._buckets[0][0] > self._window_s:
            self._buckets.popleft()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)


def _local_refusal(reason: str, tier: Tier) -> grpc.aio.AioRpcError:
    message = f"refused by the client: the gateway is shedding {tier.name} ({reason})"
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"tier": tier.name})
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                trailers, details=message, debug_error_string=reason)


def _user_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return subject_hint_of_header(value)
    return ""


def _level_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == LEVEL_HEADER:
            return value
    return None


class _ThrottleUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, throttle: Throttle) -> None:
        self._t = throttle

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if self._t.check(client_call_details, adaptive=True) is None:
            return await continuation(client_call_details, request)
        call = await continuation(client_call_details, request)
        try:
            await call
        except grpc.aio.AioRpcError as err:
            self._t.record(err.code() not in _OVERLOADED, _level_of(err.trailing_metadata()))
            raise
        self._t.record(True, _level_of(await call.trailing_metadata()))
        return call


class _ThrottleStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, throttle: Throttle) -> None:
        self._t = throttle

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        self._t.check(client_call_details, adaptive=False)
        return await continuation(client_call_details, request)


class Client:
    """Stubs over one channel; each call names the ticket it carries.

    ``throttle=True`` (or a :class:`Throttle`) turns on the client's side of
    admission control (see the module docstring); it is off by default, so a
    test or a tool sees exactly what the server answered.
    """

    def __init__(self, target: str, *, throttle: bool | Throttle = False) -> None:
        self.throttle: Throttle | None = None
        interceptors: list[Any] = []
        if throttle:
            self.throttle = throttle if isinstance(throttle, Throttle) else Throttle()
            interceptors = [_ThrottleUnary(self.throttle), _ThrottleStream(self.throttle)]
        self.channel = grpc.aio.insecure_channel(target, interceptors=interceptors or None)
        self.envelopes = envelope_pb2_grpc.EnvelopeServiceStub(self.channel)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self.channel)
        self.notifications = notification_pb2_grpc.NotificationServiceStub(self.channel)
        self.moments = moments_pb2_grpc.MomentsServiceStub(self.channel)
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


async def call_patiently(call: Any, attempts: int = 100) -> Any:
    """``await call()``, again after the server's pushback while admission sheds it (or the
    writer's queue is full): for reads a tool wants answered exactly, on a busy machine. A
    RESOURCE_EXHAUSTED answer changed nothing, so asking again is always safe."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            pushback = "100"
            trailers: Any = err.trailing_metadata() or ()  # the stubs type it loosely
            for key, value in trailers:
                if key == "grpc-retry-pushback-ms":
                    pushback = str(value)
            await asyncio.sleep(min(int(pushback), 2_000) / 1000)
    return await call()
