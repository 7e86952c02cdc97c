"""The slot map's home: key ``map`` of the JetStream key-value bucket ``hongbao-slots``.

The bucket is replicated like the streams (3 replicas on a 3-node cluster) and keeps the
last 64 versions, so ``hongbao cluster show --history`` can say what moved when. Every
change is a compare-and-set on the entry's revision: two operators moving slots at once
cannot overwrite each other (the second one reads the first one's map and retries).
"""

from __future__ import annotations

from typing import Any

from nats.js import errors as js_errors

from gateway.cluster.slotmap import MapError, SlotMap

BUCKET = "hongbao-slots"
KEY = "map"
HISTORY = 64
_CAS_ATTEMPTS = 10


async def bucket(js: Any, replicas: int | None = None) -> Any:
    """The bucket, created (with ``replicas``) when it does not exist yet."""
    try:
        return await js.key_value(BUCKET)
    except js_errors.BucketNotFoundError:
        if replicas is None:
            raise MapError("the cluster has no slot map yet: run `hongbao cluster init`") from None
        return await js.create_key_value(bucket=BUCKET, replicas=replicas, history=HISTORY)


async def load(js: Any) -> tuple[SlotMap, int]:
    """The current map and its entry revision."""
    kv = await bucket(js)
    try:
        entry = await kv.get(KEY)
    except (js_errors.KeyNotFoundError, js_errors.KeyDeletedError):
        raise MapError("the cluster has no slot map yet: run `hongbao cluster init`") from None
    return SlotMap.from_json(entry.value), entry.revision


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
    """Hands ``slots`` to SET ``to``: the next version, stored by compare-and-set."""
    kv = await bucket(js)
    for _ in range(_CAS_ATTEMPTS):
        current, revision = await load(js)
        new = current.moved(slots, to)
        try:
            await kv.update(KEY, new.to_json(), last=revision)
            return new
        except js_errors.KeyWrongLastSequenceError:
            continue   # somebody else changed it meanwhile: start from theirs
    raise MapError(f"the slot map kept changing under {_CAS_ATTEMPTS} attempts; try again")


async def history(js: Any) -> list[SlotMap]:
    """The stored versions, oldest first (at most HISTORY)."""
    kv = await bucket(js)
    return [SlotMap.from_json(e.value) for e in await kv.history(KEY) if e.value]
