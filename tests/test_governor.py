"""The governor: signals into the controller, windows into the Pressure (injected clock)."""

from __future__ import annotations

import random

import pytest

from gateway.qos.controller import MAX_LEVEL, USER_LEVELS, AdmissionController, ControllerOptions
from gateway.qos.governor import Governor, Thresholds, WriterSample
from gateway.qos.pressure import Pressure
from gateway.qos.tiers import Tier
from tests.conftest import run


class World:
    """A clock, a writer whose counters the test sets, and a bank switch."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sample = WriterSample()
        self.bank_down = False

    def clock(self) -> float:
        return self.now

    async def writer(self) -> WriterSample:
        return self.sample


def governor(world: World, thresholds=..., **kw) -> Governor:
    return Governor(
        lambda **hooks: AdmissionController(ControllerOptions(window_requests=1_000_000),
                                            clock=world.clock, wall_clock=lambda: 0.0, **hooks),
        Pressure(), writer=world.writer, bank_trouble=lambda: world.bank_down,
        thresholds=(Thresholds(loop_lag_ms=50, writer_depth=100, loop_busy=1.0)
                    if thresholds is ... else thresholds),
        clock=world.clock, **kw)


def one_second(gov: Governor, world: World, lag_ms: float = 1.0, delay_s: float = 0.001) -> None:
    """Calls over all tiers and ten ticks of 100 ms (the last closes the window)."""
    rng = random.Random(5)
    for _ in range(10):
        for tier in Tier:
            for _ in range(25):
                if gov.admit(tier, rng.randrange(USER_LEVELS)):
                    gov.started(delay_s)
        world.now += 0.101  # ten of them make a full 1 s window
        run(gov.tick(lag_ms))


def test_calm_ticks_keep_full_admission_and_count_every_tier():
    world = World()
    gov = governor(world)
    one_second(gov, world)
    assert gov.level == MAX_LEVEL and gov.pressure.level == MAX_LEVEL
    assert gov.offered == gov.admitted == [250] * 4 and gov.shed == [0] * 4
    assert gov.level_text() == "511"


def test_a_deep_writer_queue_tightens_and_marks_writer_trouble():
    world = World()
    gov = governor(world)
    world.sample = WriterSample(depth=500)
    one_second(gov, world)
    assert gov.level < MAX_LEVEL and gov.pressure.writer_trouble
    assert gov.pressure.sheds(Tier.P3) and not gov.pressure.sheds(Tier.P0)


def test_the_writers_queue_wait_joins_the_queuing_delay():
    """40 ms mean wait per committed write over the window: overloaded, though handlers
    start within a millisecond."""
    world = World()
    gov = governor(world)
    world.sample = WriterSample(depth=0, wait_s_total=4.0, requests=100)
    one_second(gov, world)
    assert gov.writer_wait_ms == 40.0 and gov.level < MAX_LEVEL


def test_loop_lag_tightens():
    world = World()
    gov = governor(world)
    one_second(gov, world, lag_ms=80.0)
    assert gov.level < MAX_LEVEL and gov.loop_lag_ms == 80.0


def test_bank_trouble_frees_moments_but_leaves_the_level():
    world = World()
    gov = governor(world)
    world.bank_down = True
    one_second(gov, world)
    assert gov.level == MAX_LEVEL
    assert gov.pressure.bank_trouble and gov.pressure.free_share == 0.25
    world.bank_down = False
    one_second(gov, world)
    assert gov.pressure.free_share == 0.0


def test_admission_off_admits_everything_and_reports_511():
    world = World()
    gov = governor(world, enabled=False)
    world.sample = WriterSample(depth=500)
    one_second(gov, world)
    one_second(gov, world)
    assert gov.shed == [0] * 4 and gov.level == MAX_LEVEL and gov.pressure.level == MAX_LEVEL


def test_a_busy_gil_reports_saturation_which_stops_at_p0s_top():
    """Loop thread and writer thread together on the CPU 95 % of each tick: P3..P1 shed,
    P0 whole."""
    from gateway.qos.controller import P0_TOP

    world = World()
    gov = governor(world, thresholds=None)  # default loop_busy 0.9
    rng = random.Random(9)
    for _ in range(400):  # 40 windows of ten 100 ms ticks
        for tier in Tier:
            for _ in range(25):
                if gov.admit(tier, rng.randrange(USER_LEVELS)):
                    gov.started(0.001)
        world.now += 0.101
        world.sample = WriterSample(cpu_s_total=world.sample.cpu_s_total + 0.045)
        run(gov.tick(1.0, loop_cpu_s=0.05, elapsed_s=0.1))
    assert gov.loop_busy == pytest.approx(0.95)
    assert gov.level == P0_TOP and gov.pressure.sheds(Tier.P1)
    assert not gov.pressure.sheds(Tier.P0)
