"""Makes a failing plan smaller while it still fails the same way.

Greedy, in the manner of delta debugging: try the plan without a chunk of its calls
(halves, then quarters, ... then single calls), without each fault phase, crash and
bank restart, with each fault phase's probabilities zeroed (and its channels brought
up) one at a time and each short client deadline made the default; keep any smaller
plan whose first failed check is the same, and start over from it, until nothing
smaller fails or the budget of runs is spent. A call that needed a removed one (a grab
of a removed send, a retry of a removed call) is skipped when the plan runs, so every
candidate is a valid plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from gateway.sim.plan import Plan
from gateway.sim.run import Result


def _without_ops(plan: Plan) -> Iterator[Plan]:
    ops = plan.ops
    size = len(ops) // 2
    while size >= 1:
        for start in range(len(ops) - size, -1, -size):
            yield dataclasses.replace(plan, ops=ops[:start] + ops[start + size:])
        size //= 2


def _without_one(plan: Plan, field: str) -> Iterator[Plan]:
    items = getattr(plan, field)
    for i in range(len(items)):
        yield dataclasses.replace(plan, **{field: items[:i] + items[i + 1:]})


def _simpler(plan: Plan) -> Iterator[Plan]:
    for i, (t, f) in enumerate(plan.faults):
        for name in ("busy", "timeout", "decline", "lost_response", "late_debit", "down",
                     "down_channels"):
            if getattr(f, name):
                calmer = dataclasses.replace(f, **{name: type(getattr(f, name))()})
                yield dataclasses.replace(
                    plan, faults=(*plan.faults[:i], (t, calmer), *plan.faults[i + 1:]))
    for i, op in enumerate(plan.ops):
        if op.deadline_s != 10.0:
            patient = dataclasses.replace(op, deadline_s=10.0)
            yield dataclasses.replace(plan, ops=(*plan.ops[:i], patient, *plan.ops[i + 1:]))


def candidates(plan: Plan) -> Iterator[Plan]:
    """Smaller or simpler plans, biggest steps first."""
    if plan.faults:
        yield dataclasses.replace(plan, faults=())
    if plan.crashes:
        yield dataclasses.replace(plan, crashes=())
    yield from _without_ops(plan)
    for field in ("faults", "crashes", "bank_restarts"):
        yield from _without_one(plan, field)
    yield from _simpler(plan)


def shrink(plan: Plan, signature: str, run: Callable[[Plan], Result], budget: int = 400,
           ) -> tuple[Plan, int]:
    """The smallest plan found that still fails ``signature``, and the runs it took."""
    runs = 0
    current = plan
    progress = True
    while progress and runs < budget:
        progress = False
        for candidate in candidates(current):
            if runs >= budget:
                break
            runs += 1
            if run(candidate).signature == signature:
                current, progress = candidate, True
                break
    return current, runs
