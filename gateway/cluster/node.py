"""A SET's view of the cluster: who it is, its NATS connection, the slot map in force.

Every worker of a SET holds one :class:`ClusterNode`. It connects to the NATS servers of
the cluster file (reconnecting for ever: a SET that loses the bus keeps serving its own
users, and its relay's outbox waits), reads the slot map and then keeps it fresh:

- by polling the map's leader every ``poll_s`` (1 s): a read of one small value, and it
  survives the loss of a NATS node, where a key-value watch's ordered consumer stalls
  until it is recreated;
- at once when a caller or another SET shows a newer version (:meth:`refresh_if_older`),
  so a ``hongbao cluster move`` is seen within one call, not one poll.

A map only moves forward: an answer with a lower version than the one held is ignored.
The node answers placement questions in the writer's hot path (:meth:`away`), so those
are a hash and a tuple lookup, with no I/O and no await.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from gateway.cluster import bus, handoff, mapstore
from gateway.cluster.config import ClusterConfig, ClusterStartError
from gateway.cluster.slotmap import MapError, SlotMap
from gateway.domain.keys import envelope_slot, slot_of

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0


class ClusterNode:
    def __init__(self, config: ClusterConfig, *, poll_s: float = 1.0) -> None:
        self.config = config
        self.name = config.set_name
        self.poll_s = poll_s
        self.nc: Any = None
        self.js: Any = None
        self.map: SlotMap | None = None
        self._refreshing: asyncio.Lock | None = None
        self._poller: asyncio.Task | None = None
        self.relay: Any = None      # built by loops(), for the metrics
        self.consumer: Any = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Connects, reads the map and checks this SET is in it with this address."""
        import nats
        from nats.errors import Error as NatsError

        self._refreshing = asyncio.Lock()

        async def quiet(exc: Exception) -> None:
            log.warning("nats_error", error=repr(exc))

        try:
            self.nc = await nats.connect(
                servers=list(self.config.nats), connect_timeout=CONNECT_TIMEOUT_S,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=quiet,
                name=f"hongbao-{self.config.group}".replace("/", "-"))
        except (TimeoutError, NatsError, OSError) as exc:
            raise ClusterStartError(
                f"cannot reach NATS at {','.join(self.config.nats)}: {exc!r}") from None
        self.js = self.nc.jetstream(timeout=5.0)
        await self._first_map(timeout_s)
        await bus.ensure_stream(self.js, replicas=3 if len(self.config.nats) >= 3 else 1)
        self._check_membership()
        self._poller = asyncio.create_task(self._poll())

    async def _first_map(self, timeout_s: float) -> None:
        from nats.errors import Error as NatsError

        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                self.map, _ = await mapstore.load(self.js)
                return
            except MapError as exc:
                raise ClusterStartError(str(exc)) from None
            except (TimeoutError, NatsError) as exc:
                # JetStream elects its leaders for a few seconds after a node comes up.
                if asyncio.get_running_loop().time() > deadline:
                    raise ClusterStartError(f"no slot map from JetStream: {exc!r}") from None
                await asyncio.sleep(0.5)

    def _check_membership(self) -> None:
        """This group's address must be one of its SET's in the map: a SET run as two
        gateway groups (IDCs A and B over the same data) lists both, and either may start."""
        assert self.map is not None
        if self.name not in self.map.addresses:
            raise ClusterStartError(
                f"SET {self.name!r} is not in the slot map (SETs: "
                f"{', '.join(self.map.addresses)})")
        listed = self.map.groups[self.name]
        if self.config.address not in listed:
            raise ClusterStartError(
                f"the slot map says SET {self.name} is at {', '.join(listed)}, the cluster "
                f"file says {self.config.address}")
        if len(listed) > 1:
            log.info("gateway_group", set=self.name, idc=self.config.idc or "",
                     address=self.config.address, group=listed.index(self.config.address),
                     groups=list(listed))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    # -- keeping the map fresh --------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    async def refresh(self) -> SlotMap:
        """Reads the map now; keeps the newer of it and the one held. Never raises: with
        the bus unreachable the SET goes on with the map it has."""
        from nats.errors import Error as NatsError

        assert self._refreshing is not None and self.map is not None
        async with self._refreshing:
            try:
                fresh, _ = await mapstore.load(self.js)
            except (TimeoutError, NatsError, MapError) as exc:
                log.warning("slot_map_refresh_failed", error=repr(exc))
                return self.map
            if fresh.version > self.map.version:
                log.info("slot_map_changed", version=fresh.version, was=self.map.version)
                self.map = fresh
            return self.map

    async def refresh_if_older(self, version: int) -> None:
        """Someone has seen map ``version``: read it if ours is older."""
        assert self.map is not None
        if version > self.map.version:
            await self.refresh()

    def loops(self, ledger: Any) -> list[Any]:
        """The SET's part of the accounting queue, run by the background role's worker:
        the relay (outbox -> stream) and the consumer (stream -> wallets)."""
        self.relay = bus.CreditRelay(ledger, self.js, self.name)
        self.consumer = bus.CreditConsumer(ledger, self.js, self.name)
        return [self.relay, self.consumer, handoff.ChunkShipper(ledger, self.js, self.name),
                handoff.ChunkImporter(ledger, self.js, self.name)]

    # -- placement ---------------------------------------------------------------------

    @property
    def version(self) -> int:
        assert self.map is not None
        return self.map.version

    def owner_of_slot(self, slot: int) -> str:
        assert self.map is not None
        return self.map.owners[slot]

    def owner_of_user(self, user_id: str) -> str:
        return self.owner_of_slot(slot_of(user_id))

    def owner_of_envelope(self, envelope_id: str) -> str:
        """The SET holding an envelope: its id's slot; an id without one (made before ids
        carried their slot) or a malformed one is this SET's to answer."""
        try:
            slot = envelope_slot(envelope_id) if envelope_id.startswith("env_") else None
        except ValueError:   # not hex: the local use case refuses it, BAD_ENVELOPE_ID
            slot = None
        return self.name if slot is None else self.owner_of_slot(slot)

    def address_of(self, set_name: str) -> str:
        """The address of the SET's first gateway group."""
        assert self.map is not None
        return self.map.addresses[set_name]

    def addresses_of(self, set_name: str) -> tuple[str, ...]:
        """The addresses of each of the SET's gateway groups, in order of preference."""
        assert self.map is not None
        return self.map.groups[set_name]

    def frozen_to(self, slot: int) -> str | None:
        """The SET a slot is being handed to, while it is frozen; else None."""
        assert self.map is not None
        return self.map.frozen.get(slot)

    def away(self, user: bytes) -> bytes | None:
        """The ledger's placement (``Ledger.set_placement``): the SET a user's wallet lives
        on when it is not this one. A user of a frozen slot counts as living on the SET
        taking it, on both sides of the handoff: the old owner's credits for the user leave
        for it, and the new owner keeps what arrives. Runs on the writer thread: no I/O."""
        assert self.map is not None
        slot = slot_of(user.decode())
        owner = self.map.frozen.get(slot) or self.map.owners[slot]
        return None if owner == self.name else owner.encode()
