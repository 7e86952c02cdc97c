"""The slot map: which SET owns each slot, and where each SET is reached.

A map is a value: every change makes a new one with the next version, so a SET or a
client holding version N knows a map of version N + 1 is newer. ``even`` spreads the
slots in contiguous runs (SET i of k owns slots [i * 1024 // k, (i + 1) * 1024 // k)).

A SET may run as several gateway groups over the same data (two IDCs: "A", then "B"),
each at its own address. ``groups`` holds every address of each SET in order of
preference (the first is where callers go while it is up); ``addresses`` keeps the first
one alone, as before, for what only needs one address (a WRONG_SLOT hint, reconcile).
Stored, ``addresses`` stays a map of strings and the other groups sit beside it under
``groups``, written only for a SET that has more than one: a map of single-group SETs
is stored byte for byte as before, and code that predates groups still reads any map
(it sees group A of each SET).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence

from gateway.domain.keys import SLOTS

SET_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
MAX_GROUPS = 8   # gateway groups (IDCs) of one SET


class MapError(ValueError):
    """A slot map, or a change to one, that cannot be: the message says why."""


@dataclasses.dataclass(frozen=True)
class SlotMap:
    version: int
    owners: tuple[str, ...]          # the owning SET of each slot, SLOTS long
    addresses: dict[str, str]        # SET name -> host:port of its first gateway group
    # SET name -> host:port of each of its gateway groups, the first one first. Left out
    # (or a SET missing from it), the SET has one group, at ``addresses[name]``.
    groups: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Slots being handed off (``hongbao cluster move``): slot -> the SET taking it. While a
    # slot is frozen every SET refuses its calls (SLOT_MOVING), its old owner exports its
    # data and the new one imports it; the map that hands it over also thaws it.
    frozen: dict[int, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.owners) != SLOTS:
            raise MapError(f"a slot map has {SLOTS} slots, not {len(self.owners)}")
        unknown = set(self.owners) - set(self.addresses)
        if unknown:
            raise MapError(f"slots owned by SETs with no address: {sorted(unknown)}")
        extra = set(self.groups) - set(self.addresses)
        if extra:
            raise MapError(f"groups for SETs not in the map: {sorted(extra)}")
        groups = {name: tuple(self.groups.get(name) or (address,))
                  for name, address in self.addresses.items()}
        object.__setattr__(self, "groups", groups)   # normalised: every SET, as tuples
        seen: dict[str, str] = {}
        for name, address in self.addresses.items():
            if not SET_NAME.fullmatch(name):
                raise MapError(f"bad SET name {name!r}: want [a-z][a-z0-9_-]{{0,31}}")
            _check_groups(name, address, groups[name], seen)
        for slot, to in self.frozen.items():
            if not 0 <= slot < SLOTS or to not in self.addresses:
                raise MapError(f"frozen slot {slot} -> {to!r}: no such slot or SET")

    @classmethod
    def even(cls, addresses: Mapping[str, str | Sequence[str]], version: int = 1) -> SlotMap:
        """The slots spread evenly, in contiguous runs, over the SETs in the order given;
        a SET's value is its address, or the addresses of its groups (A first)."""
        if not addresses:
            raise MapError("a cluster needs at least one SET")
        names = list(addresses)
        owners = tuple(names[slot * len(names) // SLOTS] for slot in range(SLOTS))
        first, groups = _split_groups(addresses)
        return cls(version, owners, first, groups)

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
        frozen = {s: t for s, t in self.frozen.items() if s not in set(slots)}
        return SlotMap(self.version + 1, tuple(owners), dict(self.addresses),
                       dict(self.groups), frozen)

    def freezing(self, slots: list[int], to: str) -> SlotMap:
        """The next version, with ``slots`` frozen for a handoff to ``to``."""
        self.moved(slots, to)   # the same checks
        frozen = dict(self.frozen)
        frozen.update((s, to) for s in slots)
        return SlotMap(self.version + 1, self.owners, dict(self.addresses),
                       dict(self.groups), frozen)

    def thawed(self, slots: list[int]) -> SlotMap:
        """The next version, with ``slots`` serving again where they are (a handoff given up)."""
        frozen = {s: t for s, t in self.frozen.items() if s not in set(slots)}
        return SlotMap(self.version + 1, self.owners, dict(self.addresses),
                       dict(self.groups), frozen)

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
        for name in self.addresses:
            runs = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.runs(name))
            where = ",".join(self.groups[name])
            lines.append(f"  {name:<12} {where:<22} {len(self.slots_of(name)):>5} slots  "
                         f"{runs or '-'}")
        if self.frozen:
            lines.append(f"  handing off: {len(self.frozen)} slots frozen ("
                         + ", ".join(f"{s}->{t}" for s, t in sorted(self.frozen.items())[:8])
                         + (", ..." if len(self.frozen) > 8 else "") + ")")
        return "\n".join(lines)

    def to_json(self) -> bytes:
        # Owners as runs keep the stored value small (one run per SET when spread evenly).
        runs = {name: self.runs(name) for name in self.addresses}
        value: dict = {"version": self.version, "addresses": self.addresses, "runs": runs}
        several = {name: list(g) for name, g in self.groups.items() if len(g) > 1}
        if several:
            value["groups"] = several
        if self.frozen:
            value["frozen"] = {str(s): t for s, t in sorted(self.frozen.items())}
        return json.dumps(value, sort_keys=True).encode()

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
            # A SET's address may also be stored as the list of its groups.
            first, groups = _split_groups(d["addresses"])
            for name, listed in dict(d.get("groups") or {}).items():
                groups[name] = tuple(listed)
            frozen = {int(k): str(v) for k, v in dict(d.get("frozen") or {}).items()}
            return cls(int(d["version"]), tuple(owners), first, groups,  # type: ignore[arg-type]
                       frozen)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, MapError):
                raise
            raise MapError(f"not a slot map: {exc!r}") from exc


def _split_groups(addresses: Mapping[str, str | Sequence[str]],
                  ) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """{SET: address or [addresses]} -> ({SET: first address}, {SET: all addresses})."""
    first: dict[str, str] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for name, value in addresses.items():
        listed = (value,) if isinstance(value, str) else tuple(value)
        if not listed or not all(isinstance(a, str) for a in listed):
            raise MapError(f"SET {name} needs host:port addresses, not {value!r}")
        first[name], groups[name] = listed[0], listed
    return first, groups


def _check_groups(name: str, address: str, groups: tuple[str, ...],
                  seen: dict[str, str]) -> None:
    """Each address host:port, the first group at ``address``, no address used twice."""
    if groups[0] != address:
        raise MapError(f"SET {name}: its first group is at {groups[0]}, its address is "
                       f"{address}")
    if len(groups) > MAX_GROUPS:
        raise MapError(f"SET {name} has {len(groups)} gateway groups (at most {MAX_GROUPS})")
    for a in groups:
        if not isinstance(a, str) or not ADDRESS.fullmatch(a):
            raise MapError(f"bad address {a!r} for SET {name}: want host:port")
        if a in seen:
            twice = "twice" if seen[a] == name else f"also for SET {seen[a]}"
            raise MapError(f"address {a} is listed {twice}: one gateway group, one SET")
        seen[a] = name


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
