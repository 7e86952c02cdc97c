"""A scenario, written down: what the clients do, when the bank misbehaves, where the
process dies. A plan is a pure function of its seed (:func:`generate`), is what the
shrinker makes smaller, and is saved as JSON to replay a failure exactly (a plan saved
before the bank had channels loads with every channel up).

A fault phase may take bank channels down (``Faults.down_channels``): most often the
direct one, so payments move to the clearing channel and the resolver must ask there;
sometimes the clearing one alone, or both.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from gateway.domain.model import PayMethod
from gateway.sim.bank import Faults
from gateway.sim.world import POINTS

KINDS = ("topup", "withdraw", "send", "grab", "retry")
_WEIGHTS = (3.0, 1.5, 3.0, 4.0, 1.5)
# The channels a fault phase takes down, and how often.
_DOWN = ((), ("direct",), ("clearing",), ("direct", "clearing"))
_DOWN_WEIGHTS = (0.55, 0.30, 0.07, 0.08)


@dataclasses.dataclass(frozen=True)
class Op:
    """One client call. ``target`` is the id of the send a grab takes from, or of the
    op a retry repeats (same request id, same payload)."""

    id: int
    t: float
    kind: str
    user: int
    amount: int = 0
    count: int = 0
    lucky: bool = True
    method: int = 0
    expires_s: int = 0
    target: int = -1
    deadline_s: float = 10.0

    @property
    def request_id(self) -> str:
        return f"r{self.id}"


@dataclasses.dataclass(frozen=True)
class Plan:
    seed: int
    users: int
    opening_fen: int
    ops: tuple[Op, ...]
    faults: tuple[tuple[float, Faults], ...] = ()
    crashes: tuple[tuple[str, int], ...] = ()
    bank_restarts: tuple[float, ...] = ()
    restart_s: float = 1.0

    @property
    def size(self) -> int:
        return len(self.ops) + len(self.faults) + len(self.crashes) + len(self.bank_restarts)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["faults"] = [[t, f.to_json()] for t, f in self.faults]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(d["seed"], d["users"], d["opening_fen"],
                   tuple(Op(**o) for o in d["ops"]),
                   tuple((t, Faults.from_json(f)) for t, f in d["faults"]),
                   tuple((p, n) for p, n in d["crashes"]),
                   tuple(d["bank_restarts"]), d["restart_s"])

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())


def _faults(rng: random.Random) -> Faults:
    p = (0.0, 0.0, 0.0, 0.05, 0.2, 0.5)
    return Faults(busy=rng.choice(p), timeout=rng.choice(p), decline=rng.choice(p),
                  lost_response=rng.choice(p), late_debit=rng.choice(p),
                  down=rng.random() < 0.15, latency_s=rng.choice((0.005, 0.02, 0.2)),
                  late_s=rng.choice((0.5, 4.0, 12.0)),
                  down_channels=rng.choices(_DOWN, _DOWN_WEIGHTS)[0])


def _deadline(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.10:
        return round(rng.uniform(0.001, 0.1), 4)  # a client that gives up at once
    if roll < 0.15:
        return round(rng.uniform(0.1, 3.0), 3)
    return 10.0


def _op(rng: random.Random, i: int, t: float, users: int, earlier: list[Op]) -> Op:
    kind = rng.choices(KINDS, _WEIGHTS)[0]
    sends = [o.id for o in earlier if o.kind == "send"]
    if kind == "grab" and not sends:
        kind = "send"
    if kind == "retry" and not earlier:
        kind = "topup"
    user, deadline = rng.randrange(users), _deadline(rng)
    if kind == "topup":
        return Op(i, t, kind, user, amount=rng.randint(100, 20_000), deadline_s=deadline)
    if kind == "withdraw":
        return Op(i, t, kind, user, amount=rng.randint(50, 5_000), deadline_s=deadline)
    if kind == "grab":
        return Op(i, t, kind, user, target=rng.choice(sends), deadline_s=deadline)
    if kind == "retry":
        first = rng.choice([o for o in earlier if o.kind != "retry"])
        return Op(i, t, kind, first.user, target=first.id, deadline_s=deadline)
    count, lucky = rng.randint(1, 5), rng.random() < 0.7
    total = rng.randint(count, 5_000) if lucky else count * rng.randint(1, 1_000)
    return Op(i, t, "send", user, amount=total, count=count, lucky=lucky,
              method=rng.choice((PayMethod.AUTO, PayMethod.BALANCE, PayMethod.CARD)),
              expires_s=rng.randint(3, 60), deadline_s=deadline)


def generate(seed: int) -> Plan:
    """The scenario of ``seed``: 2-5 users, 8-40 calls over 40 simulated seconds, up to
    four fault phases (each perhaps with channels down), up to three crashes, perhaps a
    bank restart."""
    rng = random.Random(seed)
    users = rng.randint(2, 5)
    times = sorted(round(rng.uniform(0.0, 40.0), 3) for _ in range(rng.randint(8, 40)))
    ops: list[Op] = []
    for i, t in enumerate(times):
        ops.append(_op(rng, i, t, users, ops))
    faults = tuple(sorted(((round(rng.uniform(0.0, 40.0), 3), _faults(rng))
                           for _ in range(rng.randint(0, 4))), key=lambda x: x[0]))
    crashes = tuple(sorted({(rng.choice(POINTS), rng.randint(1, 6))
                            for _ in range(rng.randint(0, 3))}))
    restarts = tuple(round(rng.uniform(0.0, 40.0), 3) for _ in range(rng.random() < 0.2))
    return Plan(seed, users, rng.choice((3_000, 20_000, 200_000)), tuple(ops), faults,
                crashes, restarts, rng.choice((0.05, 1.0, 6.0)))
