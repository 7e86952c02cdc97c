"""The project's client for a cluster: each call straight to the SET that owns its slot.

    async with ClusterClient(["127.0.0.1:7101"]) as cc:
        await cc.start()                       # reads ClusterService/GetClusterMap
        md = cc.metadata(ticket)
        r = await cc.call(lambda c: c.wallet.GetBalance(req, metadata=md), user="alice")
        g = await cc.call(lambda c: c.envelopes.GrabEnvelope(req, metadata=md), envelope=env)

It reads the slot map from any SET it is given (the seeds), computes a user's slot as the
SETs do (``gateway.domain.keys.slot_of``) and an envelope's from its id, and calls the
owner's address with a plain :class:`gateway.client.Client`. Every call carries the map
version it was routed by (``x-hongbao-map-version``): a SET that no longer owns the slot
answers UNAVAILABLE ``WRONG_SLOT`` instead of forwarding it, and the client reads the map
again and retries once at the new owner. So a map change costs a client one refused
call, never a wrong answer: the refused call did nothing.

**Two IDCs per SET.** A SET may run as several gateway groups over the same data; the map
lists their addresses, A first. The client keeps each address's health: a call that
nobody answered marks its group down, ``grpc.health.v1.Health/Check`` (deadline
``health_timeout_s``) is asked at start and, for a group marked down, again every
``recheck_s`` (in the background, while calls go elsewhere) until it answers SERVING.
A call goes to the owner's first group that is up, and moves on to the next group, with
the SAME request (so the same request id), in exactly these cases:

- UNAVAILABLE without an ``ErrorInfo`` reason: nobody answered. Grpc says this when it
  cannot connect (the call was not delivered) and when the connection is lost mid-call
  (it may have been delivered, and even done);
- DEADLINE_EXCEEDED, when a health check of the group then fails too (the group is hung
  or gone; a group that is up but slow is not called twice: the error goes back).

Both may mean the call was delivered, and the retry is still safe: the groups of a SET
serve one ledger, every money call (TopUp, Withdraw, SendEnvelope, UnlockPhoto) carries a
request id that the ledger makes idempotent in the same write transaction as its first
effect (a card payment's intent is saved before the bank is called), a grab is once per
user and envelope, and reads change nothing. So the second delivery finds the first one's
record and answers its result (a card payment still with the bank answers its state,
PENDING or UNKNOWN, and the resolver finishes it): neither lost nor doubled. ``fn`` must
therefore build the same request each time it is called (close over it). Every other
answer goes back to the caller as it came, never retried here: an answer with a reason
(``SHED``, ``BANK_BUSY``, ``INSUFFICIENT_BALANCE``, ``SET_DOWN`` ...) came from a gateway
that decided. At most one attempt per group and one map refresh per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.client import Client
from gateway.domain.keys import SLOTS, envelope_slot, slot_of
from gateway.errors import reason_of
from hongbao.v1 import cluster_pb2, cluster_pb2_grpc

MAP_VERSION = "x-hongbao-map-version"
HEALTH_TIMEOUT_S = 0.5
RECHECK_S = 1.0


def nobody_answered(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE without a reason: grpc could not connect or lost the connection."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and reason_of(err) is None


class ClusterClient:
    def __init__(self, seeds: list[str], *, throttle: bool = False,
                 health_timeout_s: float = HEALTH_TIMEOUT_S, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert seeds, "a cluster client needs at least one SET address"
        self._seeds = list(seeds)
        self._throttle = throttle
        self._clients: dict[str, Client] = {}
        self.version = 0
        self.owners: list[str] = []
        self.addresses: dict[str, str] = {}          # SET -> its first group's address
        self.groups: dict[str, list[str]] = {}       # SET -> every group's address, A first
        self._stale = True
        self.refreshes = 0
        self._health_timeout_s = health_timeout_s
        self._recheck_s = recheck_s
        self._clock = clock
        self._down: dict[str, float] = {}            # address -> last seen down
        self._probes: dict[str, asyncio.Task] = {}
        self.failovers = 0                           # calls sent again to another group

    async def start(self) -> ClusterClient:
        await self.refresh()
        await self.check_health()
        return self

    async def refresh(self) -> None:
        """Reads the map from the first known group or seed that answers."""
        last: Exception | None = None
        known = [a for name in self.groups for a in self.targets(name)]
        for address in [*known, *self._seeds]:
            stub = cluster_pb2_grpc.ClusterServiceStub(self.client(address).channel)
            try:
                m = await stub.GetClusterMap(cluster_pb2.GetClusterMapRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as err:
                last = err
                continue
            self._adopt(m)
            return
        raise ConnectionError(f"no SET answered with the slot map: {last!r}")

    def _adopt(self, m: cluster_pb2.GetClusterMapResponse) -> None:
        if m.version < self.version:
            return
        owners = [""] * SLOTS
        for s in m.sets:
            for run in s.runs:
                for slot in range(run.first, run.last + 1):
                    owners[slot] = s.name
        self.owners = owners
        self.addresses = {s.name: s.address for s in m.sets}
        # A SET map service from before groups answers `address` alone.
        self.groups = {s.name: list(s.addresses) or [s.address] for s in m.sets}
        self.version = m.version
        self._stale = False
        self.refreshes += 1

    def client(self, address: str) -> Client:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = Client(address, throttle=self._throttle)
        return c

    # -- health ------------------------------------------------------------------------

    async def check_health(self, addresses: list[str] | None = None) -> dict[str, bool]:
        """Health/Check of every group (or of ``addresses``) at once; marks each."""
        wanted = addresses if addresses is not None else [
            a for groups in self.groups.values() for a in groups]
        answers = await asyncio.gather(*(self._serving(a) for a in wanted))
        for address, ok in zip(wanted, answers, strict=True):
            self._mark(address, ok)
        return dict(zip(wanted, answers, strict=True))

    async def _serving(self, address: str) -> bool:
        stub = health_pb2_grpc.HealthStub(self.client(address).channel)
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(),
                                 timeout=self._health_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def _mark(self, address: str, up: bool) -> None:
        if up:
            self._down.pop(address, None)
        else:
            self._down[address] = self._clock()

    def is_up(self, address: str) -> bool:
        return address not in self._down

    def targets(self, set_name: str) -> list[str]:
        """The SET's groups in the order a call tries them: those up (A first), then
        those marked down, whose health is checked again in the background."""
        groups = self.groups[set_name]
        for address in groups:
            if address in self._down:
                self._maybe_probe(address)
        return ([a for a in groups if a not in self._down]
                + [a for a in groups if a in self._down])

    def _maybe_probe(self, address: str) -> None:
        due = self._clock() - self._down[address] >= self._recheck_s
        if not due or address in self._probes:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:   # asked outside the event loop: the next call checks
            return
        self._probes[address] = loop.create_task(self._probe(address))

    async def _probe(self, address: str) -> None:
        try:
            self._mark(address, await self._serving(address))
        finally:
            self._probes.pop(address, None)

    # -- routing -----------------------------------------------------------------------

    def owner(self, *, user: str | None = None, envelope: str | None = None) -> str:
        """The SET owning the user's slot, or the envelope's (by the slot its id carries)."""
        if user is not None:
            return self.owners[slot_of(user)]
        assert envelope is not None
        slot = envelope_slot(envelope) if envelope.startswith("env_") else None
        # An id without a slot can be answered by any SET only if it made it; the first
        # SET in the map stands in (such ids predate cluster mode).
        return self.owners[slot] if slot is not None else next(iter(self.addresses))

    def target(self, *, user: str | None = None, envelope: str | None = None) -> str:
        """The address a call (or a stream) for this user or envelope goes to now."""
        return self.targets(self.owner(user=user, envelope=envelope))[0]

    def metadata(self, ticket: str) -> tuple[tuple[str, str], ...]:
        return (*Client.bearer(ticket), (MAP_VERSION, str(self.version)))

    async def call(self, fn: Callable[[Client], Awaitable[Any]], *, user: str | None = None,
                   envelope: str | None = None) -> Any:
        """``fn(client)`` at the owner's first group that is up; at the next group after
        a failure the module docstring lists; once more after a WRONG_SLOT answer."""
        if self._stale:
            await self.refresh()
        tried: set[str] = set()
        moved = False
        while True:
            left = [a for a in self.targets(self.owner(user=user, envelope=envelope))
                    if a not in tried]
            address = left[0]
            tried.add(address)
            try:
                answer = await fn(self.client(address))
            except grpc.aio.AioRpcError as err:
                if reason_of(err) == "WRONG_SLOT" and not moved:
                    moved = True
                    tried.clear()
                    await self.refresh()
                    continue
                if not await self._gone(address, err, others=len(left) > 1):
                    raise
                self.failovers += 1
                continue
            self._mark(address, True)
            return answer

    async def _gone(self, address: str, err: grpc.aio.AioRpcError, *, others: bool) -> bool:
        """Whether to send the call to the next group: its failure says this group is
        gone (then it is marked down) and ``others`` are left to try."""
        if nobody_answered(err):
            self._mark(address, False)
            return others
        if others and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            up = await self._serving(address)
            self._mark(address, up)
            return not up
        return False

    async def close(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
