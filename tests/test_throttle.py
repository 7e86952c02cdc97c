"""The client's adaptive throttle (Google SRE) and level memory, with injected clocks."""

from __future__ import annotations

from gateway.client import Throttle
from gateway.qos.controller import USER_LEVELS
from gateway.qos.tiers import Tier


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def throttle(clock: Clock, draw: float = 0.5, **kw) -> Throttle:
    return Throttle(clock=clock, wall_clock=lambda: 0.0, rng=lambda: draw, **kw)


def test_a_healthy_server_is_never_throttled():
    clock = Clock()
    t = throttle(clock, draw=0.0)
    for _ in range(1000):
        assert t.refusal(Tier.P0, "u") is None
        t.record(True, "511")
        clock.t += 0.01
    assert t.throttled_locally == 0


def test_rejections_raise_the_local_refusal_probability_as_the_sre_formula_says():
    """After 100 requests with 10 accepts, K=2: p = (100 - 20) / 101."""
    clock = Clock()
    t = throttle(clock, draw=0.79)  # just below p = 0.792
    for i in range(100):
        t.record(i < 10, None)
    assert t.refusal(Tier.P2, "u") == "THROTTLED_LOCALLY"
    t2 = throttle(clock, draw=0.80)
    for i in range(100):
        t2.record(i < 10, None)
    assert t2.refusal(Tier.P2, "u") is None


def test_the_window_forgets_old_rejections():
    clock = Clock()
    t = throttle(clock, draw=0.0, window_s=10.0)
    for _ in range(100):
        t.record(False, None)
    assert t.refusal(Tier.P1, "u") == "THROTTLED_LOCALLY"
    clock.t += 12.0
    assert t.refusal(Tier.P1, "u") is None


def test_a_level_is_honoured_then_expires():
    """Level 127 sheds P1 and up; after level_ttl_s the client asks the server again."""
    clock = Clock()
    t = throttle(clock, draw=1.0, level_ttl_s=1.0)
    t.record(True, str(USER_LEVELS - 1))
    assert t.refusal(Tier.P1, "u") == "SHED_LOCALLY"
    assert t.refusal(Tier.P0, "u") is None
    clock.t += 1.5
    assert t.refusal(Tier.P1, "u") is None


def test_p0_is_never_throttled_adaptively_only_by_the_level():
    """However many refusals, a P0 call is sent unless the level itself sheds it."""
    clock = Clock()
    t = throttle(clock, draw=0.0)
    for _ in range(1000):
        t.record(False, None)
    assert t.refusal(Tier.P0, "u") is None and t.refusal(Tier.P3, "u") == "THROTTLED_LOCALLY"
    t.record(False, "0")  # level 0: P0 users above priority 0 are shed
    refused = [t.refusal(Tier.P0, f"user{i}") for i in range(50)]
    assert set(refused) <= {"SHED_LOCALLY", None} and "SHED_LOCALLY" in refused
