"""Cluster mode: a call for a slot this SET does not own goes to the SET that does.

Any SET accepts any call (``ghz``, ``grpcurl`` and plain clients can use any address). The
interceptor is innermost, after admission, the access log and the ticket check, so a
forwarded call has been admitted and authenticated here and is again at the owner (the
SETs of a cluster share one ticket key file). What decides the owner:

- the caller (the verified ticket's subject) for the user's own calls: SendEnvelope (an
  envelope lives on its sender's SET), the wallet, notifications, photo unlocks;
- the envelope id's slot for GrabEnvelope and GetEnvelope (the id carries its sender's
  slot, so no lookup); an id without a slot, or a malformed one, is answered here;
- each item's envelope for BatchGrab: a batch is split by owner, the parts run here and
  at the owners at once (one stream to each owner for the life of the caller's stream),
  and the answers are put back in the caller's order.

A forward is one hop: the same method, the caller's metadata (its ticket and request id
among them), the caller's deadline (capped at ``forward_timeout_s``), and the header
``x-hongbao-forwarded-by``. A SET that receives a forwarded call for a slot it does not
own either (the map moved meanwhile) does not forward again: it answers UNAVAILABLE
``WRONG_SLOT`` (metadata ``slot``, ``owner``, ``address``, ``map_version``). So does a
SET called by a routing client (one that sends ``x-hongbao-map-version``, as
``gateway.cluster.client`` does) for a slot it does not own: that client routes by its
map, and a stale map is better corrected than hidden behind a hop.

The owner's answer goes back as it came: its message bytes, or its status with its
``ErrorInfo`` and pushback.

A SET may run as several gateway groups over the same data (two IDCs, the slot map
lists their addresses, A first). A forward goes to the owner's first group that is up
(``Peers.order``: groups that failed a forward in the last ``down_for_s`` are tried last)
and on to the next one when nobody answered: UNAVAILABLE without an ``ErrorInfo`` reason,
which is what grpc says when it cannot connect or the connection is lost, never what a
gateway answers. Most such calls were never delivered; one that was (the group died
mid-call) is still safe to send to the next group, because both groups serve one ledger
and every money call carries its request id (grabs: one per user and envelope), so the
second delivery returns the first one's result instead of doing it again. Any other
answer, DEADLINE_EXCEEDED included (the caller's time is spent), goes back as it came.
A server stream moves on only before its first message; a BatchGrab part is sent again
to the next group. Only when no group of the owner answers is the call refused
UNAVAILABLE ``SET_DOWN`` with ``grpc-retry-pushback-ms``, and the other SETs go on
serving their own slots.

Every routed answer carries the map version this SET used (trailer
``x-hongbao-map-version``), so a client holding an older map knows to read it again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc

from gateway import errors
from gateway.domain.keys import envelope_slot, slot_of
from gateway.errors import reason_of
from gateway.transport.interceptors._plumbing import (
    HANDLER_FACTORIES,
    behaviour_of,
    method_of,
)
from gateway.transport.interceptors.auth import claims
from hongbao.v1 import envelope_pb2

FORWARDED_BY = "x-hongbao-forwarded-by"
# A slot being handed off answers SLOT_MOVING with this pushback: a handoff takes a few
# seconds (the freeze reaching every worker, the drain, the export and import).
MOVING_PUSHBACK_MS = 500
MOVING_PART = "\0moving"   # BatchGrab items of frozen slots (not a SET name)
MAP_VERSION = "x-hongbao-map-version"

_ENVELOPE = "/hongbao.v1.EnvelopeService/"
BY_USER = frozenset({
    _ENVELOPE + "SendEnvelope",
    "/hongbao.v1.WalletService/GetBalance",
    "/hongbao.v1.WalletService/ListTransactions",
    "/hongbao.v1.WalletService/TopUp",
    "/hongbao.v1.WalletService/Withdraw",
    "/hongbao.v1.WalletService/BindCard",
    "/hongbao.v1.WalletService/UnbindCard",
    "/hongbao.v1.WalletService/ListCards",
    "/hongbao.v1.NotificationService/WatchNotifications",
    "/hongbao.v1.MomentsService/UnlockPhoto",
})
BY_ENVELOPE = frozenset({_ENVELOPE + "GrabEnvelope", _ENVELOPE + "GetEnvelope"})
BATCH = _ENVELOPE + "BatchGrab"

# Metadata that belongs to one hop and is not carried over.
_HOP_HEADERS = frozenset({"user-agent", "te", "content-type", "grpc-accept-encoding",
                          "grpc-encoding", "grpc-timeout", FORWARDED_BY, MAP_VERSION})
_THEIR_TRAILERS = frozenset({MAP_VERSION, "x-hongbao-admission-level"})
# A gateway group that failed a forward is tried after the others for this long.
DOWN_FOR_S = 1.0


class Placement(Protocol):
    """What routing needs of the cluster (``gateway.cluster.node.ClusterNode``)."""

    name: str

    @property
    def version(self) -> int: ...
    def owner_of_slot(self, slot: int) -> str: ...
    def address_of(self, set_name: str) -> str: ...
    def addresses_of(self, set_name: str) -> Sequence[str]: ...
    def frozen_to(self, slot: int) -> str | None: ...
    async def refresh_if_older(self, version: int) -> None: ...


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")),
              grpc.Status):
    """The owner's status, carried back as it came."""


def _passthrough(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """The response serializer: a forwarded answer is bytes already."""
    def serializer(response: Any) -> bytes:
        return response if response.__class__ is bytes else serialize(response)
    return serializer


class Peers:
    """One channel per gateway-group address, opened on first use, closed with the worker,
    and which groups failed a forward lately (to try them after the others)."""

    def __init__(self, down_for_s: float = DOWN_FOR_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._channels: dict[str, Any] = {}
        self._down_until: dict[str, float] = {}
        self._down_for_s = down_for_s
        self._clock = clock

    def channel(self, address: str) -> Any:   # grpc.aio.Channel (its stubs lag grpcio)
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", 4 << 20),
                # Find a dead peer quickly and keep looking for its return.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.enable_retries", 0)])
            self._channels[address] = ch
        return ch

    def order(self, addresses: Sequence[str]) -> list[str]:
        """The groups to try, in turn: those up in the map's order, then those down (a
        group marked down is still tried when every group is)."""
        now = self._clock()
        up = [a for a in addresses if self._down_until.get(a, 0.0) <= now
              and not self._failing(a)]
        return up + [a for a in addresses if a not in up]

    def _failing(self, address: str) -> bool:
        ch = self._channels.get(address)
        return (ch is not None and
                ch.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE)

    def mark_down(self, address: str) -> None:
        self._down_until[address] = self._clock() + self._down_for_s

    def mark_up(self, address: str) -> None:
        self._down_until.pop(address, None)

    def is_down(self, address: str) -> bool:
        return self._down_until.get(address, 0.0) > self._clock()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


class RoutingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, placement: Placement, peers: Peers, *, forward_timeout_s: float = 10.0,
                 pushback_ms: int = 1000) -> None:
        self._placement = placement
        self._peers = peers
        self._timeout_s = forward_timeout_s
        self._pushback_ms = pushback_ms
        self.forwarded = 0
        self.unanswered = 0   # forward attempts nobody answered (the next group tried)

    async def intercept_service(  # type: ignore[override]
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = method_of(details)
        if handler is None or not (method in BY_USER or method in BY_ENVELOPE
                                   or method == BATCH):
            return handler
        fn = behaviour_of(handler)
        if method == BATCH:
            behaviour = self._batch_behaviour(fn, method)
        elif handler.response_streaming:
            behaviour = self._stream_behaviour(fn, method)
        else:
            behaviour = self._unary_behaviour(fn, method)
        return HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming](
            behaviour, request_deserializer=handler.request_deserializer,
            response_serializer=_passthrough(handler.response_serializer))

    # -- deciding -----------------------------------------------------------------------

    def _slot(self, method: str, request: Any) -> int | None:
        if method in BY_USER:
            return slot_of(claims().subject)
        return _envelope_slot(getattr(request, "envelope_id", ""))

    async def _owner(self, slot: int | None, context: Any) -> str | None:
        """None when the call is this SET's; the owner's name when it is to be forwarded;
        raises WRONG_SLOT when it is not ours and must not be forwarded."""
        if slot is None:
            return None
        headers = _headers(context)
        seen = headers.get(MAP_VERSION)
        if seen is not None and seen.isdigit():
            await self._placement.refresh_if_older(int(seen))
        owner = self._placement.owner_of_slot(slot)
        _tag_version(context, self._placement.version)
        to = self._placement.frozen_to(slot)
        if to is not None:
            raise self._slot_moving(slot, owner, to)
        if owner == self._placement.name:
            return None
        if FORWARDED_BY in headers or seen is not None:
            raise self._wrong_slot(slot, owner)
        return owner

    def _slot_moving(self, slot: int, owner: str, to: str) -> errors.Unavailable:
        return errors.Unavailable(
            "SLOT_MOVING", f"slot {slot} is being handed from SET {owner} to SET {to}; "
            "try again shortly", retry_after_ms=MOVING_PUSHBACK_MS, slot=str(slot),
            owner=owner, to=to, map_version=str(self._placement.version))

    def _wrong_slot(self, slot: int, owner: str) -> errors.Unavailable:
        return errors.Unavailable(
            "WRONG_SLOT", f"slot {slot} belongs to SET {owner}, not {self._placement.name}",
            retry_after_ms=100, slot=str(slot), owner=owner,
            address=self._placement.address_of(owner),
            map_version=str(self._placement.version))

    def _set_down(self, owner: str, err: grpc.aio.AioRpcError) -> errors.Unavailable:
        groups = len(self._placement.addresses_of(owner))
        which = (f"SET {owner} cannot" if groups == 1
                 else f"none of the {groups} gateway groups of SET {owner} can")
        return errors.Unavailable(
            "SET_DOWN", f"{which} be reached: {err.details()}",
            retry_after_ms=self._pushback_ms, set=owner)

    def _groups(self, owner: str) -> list[str]:
        return self._peers.order(self._placement.addresses_of(owner))

    def _failed_over(self, address: str) -> None:
        self._peers.mark_down(address)
        self.unanswered += 1

    # -- unary ------------------------------------------------------------------------------

    def _unary_behaviour(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def routed(request: Any, context: Any) -> Any:
            if not hasattr(request, "SerializeToString"):   # undecodable: refused locally
                return await fn(request, context)
            try:
                owner = await self._owner(self._slot(method, request), context)
            except errors.GatewayError as err:
                await errors.abort(context, err)
            if owner is None:
                return await fn(request, context)
            return await self._forward_unary(owner, method, request, context)
        return routed

    async def _forward_unary(self, owner: str, method: str, request: Any, context: Any) -> bytes:
        body = request.SerializeToString()
        self.forwarded += 1
        last: grpc.aio.AioRpcError | None = None
        for address in self._groups(owner):
            call = self._peers.channel(address).unary_unary(method)
            try:
                answer = await call(body, timeout=self._deadline(context),
                                    metadata=self._metadata(context))
            except grpc.aio.AioRpcError as err:
                if not nobody_answered(err):
                    await self._relay_error(owner, err, context)   # raises: the call ends
                self._failed_over(address)
                last = err
                continue
            self._peers.mark_up(address)
            return answer
        assert last is not None
        await self._relay_error(owner, last, context)
        raise AssertionError("unreachable")

    # -- server streams (WatchNotifications) ----------------------------------------------

    def _stream_behaviour(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def routed(request: Any, context: Any) -> AsyncIterator[Any]:
            owner = None
            if hasattr(request, "SerializeToString"):
                try:
                    owner = await self._owner(self._slot(method, request), context)
                except errors.GatewayError as err:
                    await errors.abort(context, err)
            if owner is None:
                async for item in fn(request, context):
                    yield item
                return
            async for item in self._forward_stream(owner, method, request, context):
                yield item
        return routed

    async def _forward_stream(self, owner: str, method: str, request: Any,
                              context: Any) -> AsyncIterator[Any]:
        """The owner's stream, from its first group that answers; once a message has
        come, a lost stream ends with its error (the caller resumes where it was)."""
        body = request.SerializeToString()
        self.forwarded += 1
        last: grpc.aio.AioRpcError | None = None
        for address in self._groups(owner):
            stream = self._peers.channel(address).unary_stream(method)(
                body, timeout=self._deadline(context), metadata=self._metadata(context))
            started = False
            try:
                async for item in stream:
                    started = True
                    yield item
                return
            except grpc.aio.AioRpcError as err:
                if started or not nobody_answered(err):
                    await self._relay_error(owner, err, context)
                self._failed_over(address)
                last = err
            finally:
                stream.cancel()
        assert last is not None
        await self._relay_error(owner, last, context)

    # -- BatchGrab --------------------------------------------------------------------------

    def _batch_behaviour(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def routed(requests: Any, context: Any) -> AsyncIterator[Any]:
            split = _BatchSplit(self, fn, method, requests, context)
            try:
                async for response in split.run():
                    yield response
            finally:
                await split.close()
        return routed

    # -- the hop ----------------------------------------------------------------------------

    def _deadline(self, context: Any) -> float:
        remaining = context.time_remaining()
        return self._timeout_s if remaining is None else max(0.001, min(remaining,
                                                                        self._timeout_s))

    def _metadata(self, context: Any) -> tuple[tuple[str, Any], ...]:
        kept = tuple((k, v) for k, v in _pairs(context.invocation_metadata())
                     if k not in _HOP_HEADERS and not k.startswith(":"))
        return (*kept, (FORWARDED_BY, self._placement.name),
                (MAP_VERSION, str(self._placement.version)))

    async def _relay_error(self, owner: str, err: grpc.aio.AioRpcError, context: Any) -> None:
        """Ends the call with the owner's own status, or SET_DOWN when nobody answered."""
        if nobody_answered(err):
            await errors.abort(context, self._set_down(owner, err))
        theirs = tuple((k, v) for k, v in _pairs(err.trailing_metadata())
                       if k not in _THEIR_TRAILERS)
        mine = tuple(context.trailing_metadata() or ())
        await context.abort_with_status(_Status(err.code(), err.details() or "",
                                                (*mine, *theirs)))


class _BatchSplit:
    """One caller's BatchGrab stream, split by the owners of the items' envelopes."""

    def __init__(self, router: RoutingInterceptor, fn: Callable[..., Any], method: str,
                 requests: Any, context: Any) -> None:
        self._r = router
        self._fn = fn
        self._method = method
        self._requests = requests
        self._context = context
        self._local_in: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._local_out: Any = None
        self._remote: dict[str, tuple[str, Any]] = {}   # owner -> (group address, stream)

    async def _local_requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self._local_in.get()
            if item is None:
                return
            yield item

    async def _local(self, batch: Any) -> Any:
        if self._local_out is None:
            self._local_out = self._fn(self._local_requests(), self._context)
        await self._local_in.put(batch)
        return await self._local_out.__anext__()

    async def run(self) -> AsyncIterator[Any]:
        async for batch in self._requests:
            owners = self._owners(batch)
            if owners is None or set(owners) == {None}:
                yield await self._local(batch)     # all ours, or refused as a whole here
                continue
            yield await self._split(batch, owners)

    def _owners(self, batch: Any) -> list[str | None] | None:
        if not hasattr(batch, "items"):
            return None   # undecodable: the local servicer refuses it
        placement = self._r._placement
        owners: list[str | None] = []
        for item in batch.items:
            slot = _envelope_slot(item.envelope_id)
            owner = None if slot is None else placement.owner_of_slot(slot)
            if slot is not None and placement.frozen_to(slot) is not None:
                owner = MOVING_PART
            owners.append(None if owner == placement.name else owner)
        return owners

    async def _split(self, batch: Any, owners: list[str | None]) -> Any:
        parts: dict[str | None, list[int]] = {}
        for index, owner in enumerate(owners):
            parts.setdefault(owner, []).append(index)
        answers = await asyncio.gather(*(
            self._part(owner, batch, indexes) for owner, indexes in parts.items()))
        results: list[Any] = [None] * len(owners)
        for indexes, answer in zip(parts.values(), answers, strict=True):
            for index, result in zip(indexes, answer, strict=True):
                results[index] = result
        return envelope_pb2.BatchGrabResponse(batch_id=batch.batch_id, results=results)

    async def _part(self, owner: str | None, batch: Any, indexes: list[int]) -> list[Any]:
        sub = envelope_pb2.BatchGrabRequest(batch_id=batch.batch_id,
                                            items=[batch.items[i] for i in indexes])
        if owner is None:
            return list((await self._local(sub)).results)
        if owner == MOVING_PART:
            return [self._moving(batch.items[i]) for i in indexes]
        if FORWARDED_BY in _headers(self._context):
            # A forwarded part must be all ours: the map moved under it. No second hop.
            return [self._wrong_slot(batch.items[i], owner) for i in indexes]
        code, reason = grpc.StatusCode.UNAVAILABLE, None
        for address in self._order(owner):
            try:
                raw = await self._exchange(owner, address, sub)
            except grpc.aio.AioRpcError as err:
                self._remote.pop(owner, None)
                code, reason = err.code(), reason_of(err)
                if not nobody_answered(err):
                    break
                self._r._failed_over(address)
                continue
            if isinstance(raw, bytes):
                return list(envelope_pb2.BatchGrabResponse.FromString(raw).results)
            # grpc.aio.EOF: the group ended its stream (shutting down): the next one.
            self._remote.pop(owner, None)
            code, reason = grpc.StatusCode.UNAVAILABLE, None
            self._r._failed_over(address)
        return [self._failed(batch.items[i], code, reason) for i in indexes]

    def _order(self, owner: str) -> list[str]:
        """The owner's groups to try; the one this caller's stream already goes to first.
        Sending a part again to another group is safe: each item carries its request id,
        and a user grabs an envelope once, so a part that was delivered is only replayed."""
        order = self._r._groups(owner)
        held = self._remote.get(owner)
        if held is not None and held[0] in order:
            order.remove(held[0])
            order.insert(0, held[0])
        return order

    async def _exchange(self, owner: str, address: str, sub: Any) -> Any:
        """One part over the caller's stream to ``address`` (opened on first use)."""
        held = self._remote.get(owner)
        if held is None or held[0] != address:
            if held is not None:
                held[1].cancel()
            channel = self._r._peers.channel(address)
            # The part's stream lives as long as the caller's: its deadline, or none.
            call = channel.stream_stream(self._method)(
                timeout=self._context.time_remaining(),
                metadata=self._r._metadata(self._context))
            self._remote[owner] = (address, call)
            self._r.forwarded += 1
        else:
            call = held[1]
        await call.write(sub.SerializeToString())
        return await call.read()

    def _moving(self, item: Any) -> Any:
        slot = _envelope_slot(item.envelope_id) or 0
        p = self._r._placement
        err = self._r._slot_moving(slot, p.owner_of_slot(slot), p.frozen_to(slot) or "")
        return envelope_pb2.BatchGrabResult(
            user_id=item.user_id, envelope_id=item.envelope_id, request_id=item.request_id,
            code=err.code.value[0], reason=err.reason)

    def _wrong_slot(self, item: Any, owner: str) -> Any:
        err = self._r._wrong_slot(_envelope_slot(item.envelope_id) or 0, owner)
        return envelope_pb2.BatchGrabResult(
            user_id=item.user_id, envelope_id=item.envelope_id, request_id=item.request_id,
            code=err.code.value[0], reason=err.reason)

    @staticmethod
    def _failed(item: Any, code: grpc.StatusCode, reason: str | None) -> Any:
        if reason is None and code == grpc.StatusCode.UNAVAILABLE:
            reason = "SET_DOWN"
        return envelope_pb2.BatchGrabResult(
            user_id=item.user_id, envelope_id=item.envelope_id, request_id=item.request_id,
            code=code.value[0], reason=reason or code.name)

    async def close(self) -> None:
        for _address, call in self._remote.values():
            call.cancel()
        if self._local_out is not None:
            with contextlib.suppress(Exception):
                await self._local_out.aclose()


def nobody_answered(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE without an ErrorInfo reason: grpc could not connect, or lost the
    connection; no gateway answers that (its own UNAVAILABLE answers carry a reason)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and reason_of(err) is None


def _envelope_slot(envelope_id: str) -> int | None:
    if not envelope_id.startswith("env_"):
        return None
    try:
        return envelope_slot(envelope_id)
    except ValueError:   # not hex: answered here, BAD_ENVELOPE_ID
        return None


def _pairs(metadata: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs of grpc metadata (a Metadata object, a tuple, or None)."""
    return [(k, v) for k, v in (metadata or ())]


def _headers(context: Any) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ())
            if k in (FORWARDED_BY, MAP_VERSION)}


def _tag_version(context: Any, version: int) -> None:
    kept = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata((*kept, (MAP_VERSION, str(version))))
