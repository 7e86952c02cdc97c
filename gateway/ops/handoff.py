"""``hongbao cluster move``: hands slots, with their data, from their SETs to another.

For each SET that owns some of the slots (A), in turn:

1. **Freeze** (a new map version): every SET refuses the slots' calls, UNAVAILABLE
   ``SLOT_MOVING`` with a 500 ms pushback (BatchGrab: per item); the users of the slots
   count as living on the new owner B, so credits for them made meanwhile leave for B.
2. **Drain**: wait ``drain_s`` (default 3 s: every worker reads the map at least every
   second, and a call admitted before it saw the freeze finishes its write well within the
   rest). Money never depends on the wait: the export refuses while a payment of the slots
   is open, and money that reaches a moved user on A afterwards is sent on to B.
3. **Export** on A (``AdminService/ExportSlots``, idempotent by move id), asked again while
   it answers ``SLOT_BUSY`` (an open payment the resolver has still to finish), up to the
   timeout. Wallet balances and escrows leave through x:B as credits; the records as
   chunks the shipper carries over ``migrate.B``.
4. **Import** on B: wait until B says every chunk is in (``GetImportStatus``).
5. **Hand over** (a new map version): B owns the slots, thawed.

If the export was never accepted, the slots are thawed where they were and the command
exits 2. If it was, the data has left A: the slots stay frozen, and running the same
command again finishes the handoff (the move id is the map version that froze them, found
in the map's history, so the export is not repeated).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from gateway.client import Client
from gateway.cluster import mapstore
from gateway.cluster.slotmap import MapError, SlotMap
from gateway.errors import reason_of
from hongbao.v1 import admin_pb2


class HandoffError(Exception):
    """The handoff stopped; the message says where, and what state the slots are in."""


async def move(js: Any, slots: list[int], to: str, ticket: str, *, drain_s: float = 3.0,
               timeout_s: float = 120.0, say=print) -> SlotMap:
    current, _ = await mapstore.load(js)
    if to not in current.addresses:
        raise MapError(f"no SET {to!r} in the map (SETs: {', '.join(current.addresses)})")
    by_owner: dict[str, list[int]] = {}
    for s in slots:
        if current.owner(s) != to:
            by_owner.setdefault(current.owner(s), []).append(s)
    for owner, theirs in by_owner.items():
        await _hand_over(js, owner, theirs, to, ticket, drain_s, timeout_s, say)
    return (await mapstore.load(js))[0]


async def _hand_over(js: Any, owner: str, slots: list[int], to: str, ticket: str,
                     drain_s: float, timeout_s: float, say) -> None:
    current, _ = await mapstore.load(js)
    if all(current.frozen.get(s) == to for s in slots):
        version = await _frozen_since(js, slots, to)
        say(f"{len(slots)} slots of {owner} already frozen for {to} (version {version}): "
            "finishing that handoff")
    else:
        frozen = await mapstore.freeze(js, slots, to)
        version = frozen.version
        say(f"froze {len(slots)} slots of {owner} for {to} (map version {version}); "
            f"draining {drain_s:g} s")
        await asyncio.sleep(drain_s)
    move_id = f"m{version}-{owner}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        export = await _export(current, owner, slots, to, move_id, version, ticket, deadline)
    except HandoffError:
        await mapstore.thaw(js, slots)
        raise
    say(f"exported from {owner}: {export.wallets} wallets ({export.wallet_fen} fen), "
        f"{export.envelopes} envelopes ({export.escrow_fen} fen in escrow), "
        f"{export.records} records in {export.chunks} chunks")
    if export.chunks:
        await _until_imported(current, to, move_id, ticket, deadline)
    done = await mapstore.move(js, slots, to)
    say(f"{to} owns the {len(slots)} slots (map version {done.version})")


async def _frozen_since(js: Any, slots: list[int], to: str) -> int:
    """The version that froze ``slots`` for ``to``: the oldest of the unbroken run of
    stored versions, newest back, in which they all are."""
    since = 0
    for m in reversed(await mapstore.history(js)):
        if not all(m.frozen.get(s) == to for s in slots):
            break
        since = m.version
    if not since:
        raise HandoffError("the slots are frozen, but the map's history no longer shows "
                           "which version froze them")
    return since


async def _call(m: SlotMap, set_name: str, ticket: str, fn) -> Any:
    """``fn(client, metadata)`` at the SET's first gateway group that answers."""
    last: grpc.aio.AioRpcError | None = None
    for address in m.groups[set_name]:
        async with Client(address) as c:
            try:
                return await fn(c, Client.bearer(ticket))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or reason_of(err):
                    raise
                last = err
    assert last is not None
    raise last


async def _export(m: SlotMap, owner: str, slots: list[int], to: str, move_id: str,
                  version: int, ticket: str, deadline: float) -> Any:
    request = admin_pb2.ExportSlotsRequest(slots=slots, to_set=to, move_id=move_id,
                                           map_version=version)
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await _call(m, owner, ticket, lambda c, md: c.admin.ExportSlots(
                request, metadata=md, timeout=30))
        except grpc.aio.AioRpcError as err:
            why = reason_of(err) or err.code().name
            retry = why in ("SLOT_BUSY", "SLOT_NOT_FROZEN", "UNAVAILABLE", "WRITER_QUEUE_FULL")
            if not retry or loop.time() > deadline:
                raise HandoffError(f"{owner} did not export the slots ({why}: "
                                   f"{err.details()}); they serve on {owner} again") from None
            await asyncio.sleep(0.5)


async def _until_imported(m: SlotMap, to: str, move_id: str, ticket: str,
                          deadline: float) -> None:
    loop = asyncio.get_running_loop()
    request = admin_pb2.GetImportStatusRequest(move_id=move_id)
    while loop.time() < deadline:
        try:
            status = await _call(m, to, ticket, lambda c, md: c.admin.GetImportStatus(
                request, metadata=md, timeout=10))
            if status.complete:
                return
        except grpc.aio.AioRpcError:
            pass   # B restarting: its importer resumes from the stream
        await asyncio.sleep(0.2)
    raise HandoffError(f"{to} has not imported move {move_id} yet; the data has left its old "
                       "SET and waits in the stream; the slots stay frozen: run the same "
                       "move again to finish")
