"""The slot handoff's transport: exported chunks from the old owner to the new one.

``hongbao cluster move`` freezes slots, has their old owner export them
(``Ledger.export_slots``: the money leaves as ``wallet_move``/``escrow_move`` credits through
the relay, the records as chunks on the migration outbox), waits for the new owner to have
imported every chunk, then hands the slots over in the map. Here the chunks travel:

- :class:`ChunkShipper` (every SET, background role): publishes each chunk on the outbox to
  ``migrate.<to_set>`` of ``HONGBAO_CREDITS`` with ``Nats-Msg-Id`` = ``<from>/<chunk id>``
  and the sender in the header ``Hongbao-From``, and takes it off the outbox only after the
  PubAck (a chunk is at most 256 KiB, under NATS's 1 MiB message limit).
- :class:`ChunkImporter` (every SET, background role): a durable pull consumer
  ``migrate-<set>`` on ``migrate.<set>``; imports each chunk in one ledger write
  (``Ledger.import_slots``, once per chunk id) and acks after it. A redelivered chunk
  changes nothing; one that is not a chunk is refused (term) and logged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js import errors as js_errors

from gateway import errors
from gateway.cluster.bus import ACK_WAIT_S, STREAM, OutboxPublisher
from gateway.domain.model import MigrationChunk
from gateway.ledger import Ledger
from gateway.loops import BackgroundLoop

log = structlog.get_logger(__name__)

FROM_HEADER = "Hongbao-From"


class ChunkShipper(OutboxPublisher):
    """Migration outbox -> ``migrate.<to_set>``, acknowledged before a chunk leaves it."""

    name = "chunk_shipper"

    def __init__(self, ledger: Ledger, js: Any, set_name: str, *, batch: int = 8,
                 idle_s: float = 0.2) -> None:
        super().__init__(ledger, js, set_name, batch=batch, idle_s=idle_s)

    async def due(self, limit: int) -> list[MigrationChunk]:
        return await self._ledger.migration_chunks_due(limit)

    async def publish(self, c: MigrationChunk) -> Any:
        return await self._js.publish(
            f"migrate.{c.to_set}", c.data, timeout=10.0, stream=STREAM,
            headers={"Nats-Msg-Id": f"{self._set}/{c.chunk_id}", FROM_HEADER: self._set})

    async def sent(self, entries: list[MigrationChunk]) -> None:
        await self._ledger.migration_chunks_sent([c.seq for c in entries])


class ChunkImporter(BackgroundLoop):
    """Stream -> this SET's books, acknowledged after the ledger's write."""

    def __init__(self, ledger: Ledger, js: Any, set_name: str) -> None:
        super().__init__()
        self._ledger = ledger
        self._js = js
        self._set = set_name
        self.imported = 0

    async def run(self) -> None:
        sub = await self._js.pull_subscribe(
            f"migrate.{self._set}", durable=f"migrate-{self._set}", stream=STREAM,
            config=api.ConsumerConfig(ack_wait=ACK_WAIT_S * 6, max_ack_pending=64))
        while not self.stopping:
            try:
                msgs = await sub.fetch(4, timeout=0.5)
            except (NatsTimeout, TimeoutError):
                continue
            except js_errors.Error as err:
                log.warning("chunk_importer_retry", error=repr(err))
                await self.pause(0.5)
                continue
            for m in msgs:
                await self._one(m)

    async def _one(self, m: Any) -> None:
        sender = (m.headers or {}).get(FROM_HEADER, "")
        try:
            self.imported += await self._ledger.import_slots(sender, m.data)
        except errors.InvalidArgument as err:
            log.error("migration_chunk_refused", seq=m.metadata.sequence.stream,
                      sender=sender, reason=err.reason, error=err.message)
            await m.term()
            return
        await m.ack()
        await asyncio.sleep(0)
