"""The slot map: which SET owns each slot, and where each SET is reached.

A map is a value: every change makes a new one with the next version, so a SET or a
client holding version N knows a map of version N + 1 is newer. ``even`` spreads the
slots in contiguous runs (SET i of k owns slots [i * 1024 // k, (i + 1) * 1024 // k)).
"""

from __future__ import annotations

import dataclasses
import json
import re

from gateway.domain.keys import SLOTS

SET_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


class MapError(ValueError):
    """A slot map, or a change to one, that cannot be: the message says why."""


@dataclasses.dataclass(frozen=True)
class SlotMap:
    version: int
    owners: tuple[str, ...]          # the owning SET of each slot, SLOTS long
    addresses: dict[str, str]        # SET name -> host:port its gateways listen on

    def __post_init__(self) -> None:
        if len(self.owners) != SLOTS:
            raise MapError(f"a slot map has {SLOTS} slots, not {len(self.owners)}")
        unknown = set(self.owners) - set(self.addresses)
        if unknown:
            raise MapError(f"slots owned by SETs with no address: {sorted(unknown)}")
        for name, address in self.addresses.items():
            if not SET_NAME.fullmatch(name):
                raise MapError(f"bad SET name {name!r}: want [a-z][a-z0-9_-]{{0,31}}")
            if not ADDRESS.fullmatch(address):
                raise MapError(f"bad address {address!r} for SET {name}: want host:port")

    @classmethod
    def even(cls, addresses: dict[str, str], version: int = 1) -> SlotMap:
        """The slots spread evenly, in contiguous runs, over the SETs in the order given."""
        if not addresses:
            raise MapError("a cluster needs at least one SET")
        names = list(addresses)
        owners = tuple(names[slot * len(names) // SLOTS] for slot in range(SLOTS))
        return cls(version, owners, dict(addresses))

    def owner(self, slot: int) -> str:
        return self.owners[slot]

    def slots_of(self, name: str) -> list[int]:
        return [s for s, owner in enumerate(self.owners) if owner == name]

    def moved(self, slots: list[int], to: str) -> SlotMap:
        """The next version, with ``slots`` owned by ``to``."""
        if to not in self.addresses:
            raise MapError(f"no SET {to!r} in the map (SETs: {', '.join(self.addresses)})")
        bad = [s for s in slots if not 0 <= s < SLOTS]
        if bad or not slots:
            raise MapError(f"slots must be in 0..{SLOTS - 1}" + (f": {bad[:5]}" if bad else ""))
        owners = list(self.owners)
        for s in slots:
            owners[s] = to
        return SlotMap(self.version + 1, tuple(owners), dict(self.addresses))

    def runs(self, name: str) -> list[tuple[int, int]]:
        """The SET's slots as inclusive (first, last) runs."""
        out: list[tuple[int, int]] = []
        for s in self.slots_of(name):
            if out and out[-1][1] == s - 1:
                out[-1] = (out[-1][0], s)
            else:
                out.append((s, s))
        return out

    def describe(self) -> str:
        lines = [f"slot map version {self.version}: {len(self.addresses)} SETs, {SLOTS} slots"]
        for name, address in self.addresses.items():
            runs = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.runs(name))
            lines.append(f"  {name:<12} {address:<22} {len(self.slots_of(name)):>5} slots  "
                         f"{runs or '-'}")
        return "\n".join(lines)

    def to_json(self) -> bytes:
        # Owners as runs keep the stored value small (one run per SET when spread evenly).
        runs = {name: self.runs(name) for name in self.addresses}
        return json.dumps({"version": self.version, "addresses": self.addresses,
                           "runs": runs}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SlotMap:
        try:
            d = json.loads(raw)
            owners: list[str | None] = [None] * SLOTS
            for name, runs in d["runs"].items():
                for first, last in runs:
                    for s in range(first, last + 1):
                        owners[s] = name
            if None in owners:
                raise MapError(f"slot {owners.index(None)} has no owner")
            return cls(int(d["version"]), tuple(owners), dict(d["addresses"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, MapError):
                raise
            raise MapError(f"not a slot map: {exc!r}") from exc


def parse_slots(text: str) -> list[int]:
    """``0-99,200,300-310`` -> the slots."""
    slots: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            slots += range(int(first), int(last or first) + 1)
    except ValueError as exc:
        raise MapError(f"bad slot list {text!r}: want e.g. 0-99,200") from exc
    return slots
