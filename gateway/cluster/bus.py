"""The accounting queue between SETs: stream ``HONGBAO_CREDITS``, its relay and consumer.

- The stream: subjects ``credit.<set>``, file storage, 3 replicas on a 3-node cluster,
  a 2-minute duplicate window, work-queue retention: a message stays until the home SET's
  consumer acks it (kept while no consumer exists: a SET not started yet loses nothing),
  so what the stream holds is exactly the credits in flight, which the cluster reconcile
  reads. Work-queue consumers may not overlap: one durable per ``credit.<set>``.
- :class:`CreditRelay` (on the SET holding envelopes): takes the ledger's outbox of
  credits for users of other SETs, publishes each to ``credit.<home>`` with
  ``Nats-Msg-Id`` = the credit's transfer id, and takes it off the outbox only after the
  stream's PubAck. A relay killed between the two publishes again on restart; the
  stream's duplicate window drops the copy, and if it did not, the consumer would.
- :class:`CreditConsumer` (on every SET): a durable pull consumer ``credits-<set>`` on
  ``credit.<set>``; applies a fetched batch in one ledger write (each credit once by its
  transfer id, :meth:`Ledger.apply_remote_credits`) and acks only after that write is
  durable. A consumer killed between the two gets the batch again and applies nothing
  twice: the dedup window is a saving, the transfer id is the guarantee.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import defaultdict
from typing import Any

import structlog
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js import errors as js_errors

from gateway.cluster.forming import placed
from gateway.domain.model import CreditKind, RemoteCredit
from gateway.ledger import Ledger
from gateway.loops import BackgroundLoop

log = structlog.get_logger(__name__)

STREAM = "HONGBAO_CREDITS"
DUPLICATE_WINDOW_S = 120.0
# How long a fetched credit waits for its ack before JetStream hands it out again. It is
# the credit lag after a consumer dies holding a batch (measured: 30 s made a killed
# consumer's batch land half a minute late), and a batch is one ledger write of a few
# milliseconds, so 5 s is ample; a slower write is redelivered and applied as a no-op.
ACK_WAIT_S = 5.0


# credit.<set>: credits for <set>'s users; migrate.<set>: chunks of slot handoffs to <set>
# (gateway.cluster.handoff). One stream, so both share its replicas and dedup window.
SUBJECTS = ["credit.>", "migrate.>"]


async def ensure_stream(js: Any, replicas: int) -> None:
    """Creates the credit stream when it does not exist (the same settings every time), and
    adds the handoff's subjects to a stream made before they existed."""
    config = api.StreamConfig(name=STREAM, subjects=SUBJECTS,
                              storage=api.StorageType.FILE, num_replicas=replicas,
                              retention=api.RetentionPolicy.WORK_QUEUE,
                              duplicate_window=DUPLICATE_WINDOW_S)
    try:
        info = await placed(lambda: js.stream_info(STREAM))
    except js_errors.NotFoundError:
        await placed(lambda: js.add_stream(config))
        return
    if set(info.config.subjects or ()) != set(SUBJECTS):
        await placed(lambda: js.update_stream(
            dataclasses.replace(info.config, subjects=SUBJECTS)))


def encode(from_set: str, c: RemoteCredit) -> bytes:
    """One credit as the stream carries it (JSON).

    The reference id travels under its first name, ``envelope_id``, whatever the kind:
    a consumer from before photo credits then books a photo income as an envelope credit
    (the right wallet and amount, once by its transfer id) instead of refusing it, which
    would strand the money on x: accounts. ``kind`` and, for a photo income,
    ``photo_id`` came later. A slot handoff's ``wallet_move`` and ``escrow_move`` carry
    the move id or the envelope there; a consumer that does not know them refuses them
    (``decode`` raises), which strands nothing: the handoff's chunks carry the same money
    under the same transfer ids.
    """
    d = {"from": from_set, "tid": c.transfer_id, "user": c.user_id,
         "amount_fen": c.amount_fen, "envelope_id": c.reference_id, "kind": str(c.kind)}
    if c.kind == CreditKind.PHOTO_INCOME:
        d["photo_id"] = c.photo_id
    return json.dumps(d, separators=(",", ":")).encode()


def decode(raw: bytes, home: str) -> tuple[str, RemoteCredit]:
    """The sending SET and the credit; a message without ``kind`` (written before photo
    credits) is a grab's. Anything that is not a credit raises ValueError, KeyError or
    TypeError, before it could reach the books."""
    d = json.loads(raw)
    kind = CreditKind(d.get("kind", CreditKind.GRAB))
    amount = d["amount_fen"]
    if type(amount) is not int or amount <= 0:  # no float, bool or text touches money
        raise ValueError(f"amount_fen {amount!r} is not a positive integer")
    photo = _text(d, "photo_id") if kind == CreditKind.PHOTO_INCOME else ""
    return _text(d, "from"), RemoteCredit(home, _text(d, "tid"), _text(d, "user"), amount,
                                          _text(d, "envelope_id"), kind, photo)


def _text(d: dict, key: str) -> str:
    value = d[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} {value!r} is not a non-empty string")
    return value


class OutboxPublisher(BackgroundLoop):
    """A durable outbox -> the stream, each entry taken off only after its PubAck.

    A publisher killed between the two publishes again on restart under the same message
    ids; the stream's duplicate window drops the copy, and the receiver's own idempotency
    would if it did not. Subclasses say what is due, how one entry is published and how
    acknowledged entries leave the outbox (the credit relay, the handoff's chunk shipper).
    """

    name = "outbox"

    def __init__(self, ledger: Ledger, js: Any, set_name: str, *, batch: int,
                 idle_s: float) -> None:
        super().__init__()
        self._ledger = ledger
        self._js = js
        self._set = set_name
        self._batch = batch
        self._idle_s = idle_s
        self.published = 0

    async def due(self, limit: int) -> list[Any]:
        raise NotImplementedError

    async def publish(self, entry: Any) -> Any:
        """Publishes one entry; returns its PubAck."""
        raise NotImplementedError

    async def sent(self, entries: list[Any]) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while not self.stopping:
            due = await self.due(self._batch)
            if not due:
                await self.pause(self._idle_s)
                continue
            try:
                acks = await asyncio.gather(*(self.publish(e) for e in due))
            except (TimeoutError, NatsTimeout, js_errors.Error) as err:
                # Nothing leaves the outbox unacknowledged: the next pass publishes again.
                log.warning(f"{self.name}_retry", error=repr(err), waiting=len(due))
                await self.pause(0.5)
                continue
            await self.sent(due)
            self.published += sum(1 for ack in acks if not ack.duplicate)


class CreditRelay(OutboxPublisher):
    """The credit outbox -> ``credit.<home>``, with ``Nats-Msg-Id`` = the transfer id."""

    name = "credit_relay"

    def __init__(self, ledger: Ledger, js: Any, set_name: str, *, batch: int = 256,
                 idle_s: float = 0.05) -> None:
        super().__init__(ledger, js, set_name, batch=batch, idle_s=idle_s)

    async def due(self, limit: int) -> list[RemoteCredit]:
        return await self._ledger.remote_credits_due(limit)

    async def publish(self, c: RemoteCredit) -> Any:
        return await self._js.publish(f"credit.{c.home}", encode(self._set, c), timeout=5.0,
                                      stream=STREAM, headers={"Nats-Msg-Id": c.transfer_id})

    async def sent(self, entries: list[RemoteCredit]) -> None:
        await self._ledger.remote_credits_sent([c.seq for c in entries])


class CreditConsumer(BackgroundLoop):
    """Stream -> this SET's wallets, acknowledged after the ledger's write."""

    def __init__(self, ledger: Ledger, js: Any, set_name: str, *, batch: int = 256) -> None:
        super().__init__()
        self._ledger = ledger
        self._js = js
        self._set = set_name
        self._batch = batch
        self.applied = 0

    async def run(self) -> None:
        sub = await self._js.pull_subscribe(
            f"credit.{self._set}", durable=f"credits-{self._set}", stream=STREAM,
            config=api.ConsumerConfig(ack_wait=ACK_WAIT_S, max_ack_pending=20_000))
        while not self.stopping:
            try:
                msgs = await sub.fetch(self._batch, timeout=0.5)
            except (NatsTimeout, TimeoutError):
                # Nothing to fetch. nats-py raises its own TimeoutError on one path and
                # asyncio's on another (a pull that expired while a batch was being
                # gathered); an uncaught one stopped this loop for good once.
                continue
            except js_errors.Error as err:
                log.warning("credit_consumer_retry", error=repr(err))
                await self.pause(0.5)
                continue
            by_sender: dict[str, list[RemoteCredit]] = defaultdict(list)
            good = []
            for m in msgs:
                try:
                    sender, credit = decode(m.data, self._set)
                except (ValueError, KeyError, TypeError) as exc:
                    # Not a credit: no SET wrote it. Logged loudly with its start, then
                    # terminated (never redelivered; work-queue retention drops it).
                    log.error("credit_message_refused", seq=m.metadata.sequence.stream,
                              error=repr(exc), data=m.data[:200].decode(errors="replace"))
                    await m.term()
                    continue
                by_sender[sender].append(credit)
                good.append(m)
            msgs = good
            for sender, credits in by_sender.items():
                self.applied += await self._ledger.apply_remote_credits(sender, credits)
            for m in msgs:
                await m.ack()
