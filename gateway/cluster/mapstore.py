"""The slot map's home: key ``map`` of the JetStream key-value bucket ``hongbao-slots``.

The bucket is replicated like the streams (3 replicas on a 3-node cluster) and keeps the
last 64 versions, so ``hongbao cluster show --history`` can say what moved when. Every
change is a compare-and-set on the entry's revision: two operators moving slots at once
cannot overwrite each other (the second one reads the first one's map and retries).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nats.js import errors as js_errors

from gateway.cluster.forming import placed
from gateway.cluster.slotmap import MapError, SlotMap

BUCKET = "hongbao-slots"
KEY = "map"
HISTORY = 64
_CAS_ATTEMPTS = 10


async def bucket(js: Any, replicas: int | None = None) -> Any:
    """The bucket, created (with ``replicas``) when it does not exist yet."""
    try:
        return await placed(lambda: js.key_value(BUCKET))
    except js_errors.BucketNotFoundError:
        if replicas is None:
            raise MapError("the cluster has no slot map yet: run `hongbao cluster init`") from None
        return await placed(lambda: js.create_key_value(
            bucket=BUCKET, replicas=replicas, history=HISTORY))


async def load(js: Any) -> tuple[SlotMap, int]:
    """The current map and its entry revision, read from the bucket's stream leader.

    Not the key-value ``get``: on a bucket with direct gets (nats-server 2.9 makes them the
    default) any replica answers, and a follower a few milliseconds behind returns the
    previous map, so a ``show`` right after a ``move`` could print the old one (seen in
    tests/test_cluster_map.py). The leader's answer includes every acknowledged update.
    """
    await bucket(js)
    try:
        msg = await js.get_last_msg(f"KV_{BUCKET}", f"$KV.{BUCKET}.{KEY}", direct=False)
    except js_errors.NotFoundError:
        raise MapError("the cluster has no slot map yet: run `hongbao cluster init`") from None
    return SlotMap.from_json(msg.data), msg.seq


async def init(js: Any, slotmap: SlotMap, replicas: int) -> int:
    """Stores the first map; refuses when one exists (``move`` changes a map)."""
    kv = await bucket(js, replicas)
    try:
        return await kv.create(KEY, slotmap.to_json())
    except js_errors.KeyWrongLastSequenceError:
        current, _ = await load(js)
        raise MapError(f"the cluster has a slot map already (version {current.version}); "
                       "`hongbao cluster move` changes it") from None


async def move(js: Any, slots: list[int], to: str) -> SlotMap:
    """Hands ``slots`` to SET ``to`` (and thaws them): the next version, by compare-and-set."""
    return await update(js, lambda m: m.moved(slots, to))


async def freeze(js: Any, slots: list[int], to: str) -> SlotMap:
    """Freezes ``slots`` for a handoff to ``to``: the next version, by compare-and-set."""
    return await update(js, lambda m: m.freezing(slots, to))


async def thaw(js: Any, slots: list[int]) -> SlotMap:
    """Lets frozen ``slots`` serve again where they are (a handoff given up)."""
    return await update(js, lambda m: m.thawed(slots))


async def update(js: Any, change: Callable[[SlotMap], SlotMap]) -> SlotMap:
    """Stores ``change(current map)`` as the next version, by compare-and-set.

    nats-server 2.9 checks the expected revision of a clustered stream before the write's
    consensus, not in it (nats-io/nats-server#4320, fixed in 2.9.21; Debian ships 2.9.10),
    so two updates racing on the same revision can both be accepted, and the later one
    would silently drop the earlier one's change (tests/test_cluster_map.py caught it).
    So after writing, the writer looks at what landed between the revision it expected and
    its own: if another update slipped in, it writes the merge (that update's map with
    this change applied) on top of its own, again by compare-and-set. Every change here
    (move, freeze, thaw) is idempotent, so applying it again is always safe.
    """
    kv = await bucket(js)
    for _ in range(_CAS_ATTEMPTS):
        current, revision = await load(js)
        new = change(current)
        try:
            mine = await kv.update(KEY, new.to_json(), last=revision)
        except js_errors.KeyWrongLastSequenceError:
            continue   # somebody else changed it meanwhile: start from theirs
        between = await _landed_between(js, revision, mine)
        if not between:
            return new
        merged = change(SlotMap.from_json(between[-1]))
        merged = dataclasses.replace(merged, version=max(merged.version, new.version) + 1)
        try:
            await kv.update(KEY, merged.to_json(), last=mine)
            return merged
        except js_errors.KeyWrongLastSequenceError:
            continue   # a later writer again: take the newest map and apply the change
    raise MapError(f"the slot map kept changing under {_CAS_ATTEMPTS} attempts; try again")


async def _landed_between(js: Any, after: int, before: int) -> list[bytes]:
    """The map versions stored strictly between two revisions, oldest first (leader reads)."""
    out = []
    for seq in range(after + 1, before):
        try:
            msg = await js.get_msg(f"KV_{BUCKET}", seq, direct=False)
        except js_errors.NotFoundError:
            continue
        if msg.subject == f"$KV.{BUCKET}.{KEY}" and msg.data:
            out.append(msg.data)
    return out


async def history(js: Any) -> list[SlotMap]:
    """The stored versions, oldest first (at most HISTORY), read from the stream leader.

    Not the key-value ``history``: it watches through an ephemeral consumer, and on a
    replicated bucket that consumer can report nothing pending for a moment after an
    update, so the watch ends empty ("no keys found", seen in tests/test_cluster_map.py).
    The leader holds every acknowledged version; the bucket is small (one key, 64 kept).
    """
    await bucket(js)
    info = await js.stream_info(f"KV_{BUCKET}")
    first, last = info.state.first_seq, info.state.last_seq
    if not last:
        return []
    return [SlotMap.from_json(data) for data in await _landed_between(js, first - 1, last + 1)]
