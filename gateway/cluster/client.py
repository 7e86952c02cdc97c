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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.client import Client
from gateway.domain.keys import SLOTS, envelope_slot, slot_of
from gateway.errors import reason_of
from hongbao.v1 import cluster_pb2, cluster_pb2_grpc

MAP_VERSION = "x-hongbao-map-version"


class ClusterClient:
    def __init__(self, seeds: list[str], *, throttle: bool = False) -> None:
        assert seeds, "a cluster client needs at least one SET address"
        self._seeds = list(seeds)
        self._throttle = throttle
        self._clients: dict[str, Client] = {}
        self.version = 0
        self.owners: list[str] = []
        self.addresses: dict[str, str] = {}
        self._stale = True
        self.refreshes = 0

    async def start(self) -> ClusterClient:
        await self.refresh()
        return self

    async def refresh(self) -> None:
        """Reads the map from the first seed or known SET that answers."""
        last: Exception | None = None
        for address in [*self.addresses.values(), *self._seeds]:
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
        self.version = m.version
        self._stale = False
        self.refreshes += 1

    def client(self, address: str) -> Client:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = Client(address, throttle=self._throttle)
        return c

    def owner(self, *, user: str | None = None, envelope: str | None = None) -> str:
        """The SET owning the user's slot, or the envelope's (by the slot its id carries)."""
        if user is not None:
            return self.owners[slot_of(user)]
        assert envelope is not None
        slot = envelope_slot(envelope) if envelope.startswith("env_") else None
        # An id without a slot can be answered by any SET only if it made it; the first
        # SET in the map stands in (such ids predate cluster mode).
        return self.owners[slot] if slot is not None else next(iter(self.addresses))

    def metadata(self, ticket: str) -> tuple[tuple[str, str], ...]:
        return (*Client.bearer(ticket), (MAP_VERSION, str(self.version)))

    async def call(self, fn: Callable[[Client], Awaitable[Any]], *, user: str | None = None,
                   envelope: str | None = None) -> Any:
        """``fn(client)`` on the owner's client; once more after a WRONG_SLOT answer."""
        if self._stale:
            await self.refresh()
        for attempt in (1, 2):
            target = self.addresses[self.owner(user=user, envelope=envelope)]
            try:
                return await fn(self.client(target))
            except grpc.aio.AioRpcError as err:
                if attempt == 2 or reason_of(err) != "WRONG_SLOT":
                    raise
                await self.refresh()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
