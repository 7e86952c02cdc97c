"""The admission controller, driven deterministically with an injected clock."""

from __future__ import annotations

import random

import pytest

from gateway.qos.controller import (
    MAX_LEVEL,
    USER_LEVELS,
    AdmissionController,
    ControllerOptions,
    split_level,
)
from gateway.qos.tiers import DEFAULT_TIERS, EXEMPT, Tier, tier_of, tier_table


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _window(ctl: AdmissionController, clock: Clock, delay_ms: float, per_tier: int = 500,
            rng: random.Random | None = None) -> dict[Tier, int]:
    """One second of an even mix over the tiers; returns the admitted count per tier."""
    rng = rng or random.Random(7)
    admitted = dict.fromkeys(Tier, 0)
    for _ in range(per_tier):
        for tier in Tier:
            if ctl.admit(tier, rng.randrange(USER_LEVELS)):
                admitted[tier] += 1
                ctl.record_delay(delay_ms)
    clock.now += 1.0
    ctl.tick()
    return admitted


def _controller(clock: Clock, **kw) -> AdmissionController:
    opts = ControllerOptions(window_requests=1_000_000, **kw)
    return AdmissionController(opts, clock=clock, wall_clock=lambda: 0.0)


def test_calm_traffic_is_all_admitted():
    """Below the delay threshold nothing is shed and the level stays at full admission."""
    clock = Clock()
    ctl = _controller(clock)
    for _ in range(5):
        assert _window(ctl, clock, delay_ms=2.0) == dict.fromkeys(Tier, 500)
    assert ctl.level == MAX_LEVEL


def test_overload_sheds_from_the_lowest_tier_up():
    """Under sustained overload P3 goes first, then P2, then P1; P0 last."""
    clock = Clock()
    ctl = _controller(clock)
    emptied = []
    for _ in range(200):
        level = ctl.level  # the level the window ran under
        admitted = _window(ctl, clock, delay_ms=80.0)
        for tier in sorted(Tier, reverse=True):
            if admitted[tier] == 0 and tier not in emptied:
                emptied.append(tier)
        assert all(admitted[t] == 0 for t in Tier if t > split_level(level)[0])
        assert all(admitted[t] == 500 for t in Tier if t < split_level(level)[0])
    assert emptied == [Tier.P3, Tier.P2, Tier.P1]
    # Each window sheds about 5 % more of the traffic: a tier of four takes about five.
    assert split_level(ctl.level)[0] == Tier.P0


def test_p0_is_shed_only_by_user_priority_and_never_below_its_floor():
    """However long the overload, P0 keeps its highest user priorities."""
    clock = Clock()
    ctl = _controller(clock, p0_user_floor=32)
    for _ in range(500):
        admitted = _window(ctl, clock, delay_ms=500.0)
    assert ctl.level == 31 == ctl.min_level
    assert 0 < admitted[Tier.P0] < 500  # the users with priority 0..31 only
    assert ctl.admit(Tier.P0, 0) and ctl.admit(Tier.P0, 31) and not ctl.admit(Tier.P0, 32)


def test_it_tightens_fast_and_loosens_slowly():
    """Shedding a tier takes a few windows; admitting it again takes several times as many."""
    clock = Clock()
    ctl = _controller(clock)
    windows_down = 0
    while split_level(ctl.level)[0] == Tier.P3:  # until all of P3 is shed
        _window(ctl, clock, delay_ms=80.0)
        windows_down += 1
    windows_up = 0
    while ctl.level < MAX_LEVEL:
        _window(ctl, clock, delay_ms=1.0)
        windows_up += 1
    # A quarter of the traffic is P3: 5 % a window sheds it in about five windows, and
    # 1 % a window admits it back in about five times as many.
    assert windows_down <= 8
    assert windows_up >= 4 * windows_down


def test_hysteresis_a_single_calm_window_does_not_undo_the_shedding():
    """After an overload one calm window admits only about 1 % more, not everything."""
    clock = Clock()
    ctl = _controller(clock)
    for _ in range(8):
        _window(ctl, clock, delay_ms=80.0)
    shedding = ctl.level
    _window(ctl, clock, delay_ms=1.0)
    assert shedding < ctl.level < MAX_LEVEL
    assert split_level(ctl.level)[0] < Tier.P3  # P3 is still shed after the calm window


def test_an_outside_overload_signal_tightens_too():
    """Loop lag, a full writer queue or bank errors (report_overload) shed like queuing delay."""
    clock = Clock()
    ctl = _controller(clock)
    ctl.report_overload()
    _window(ctl, clock, delay_ms=1.0)
    tightened = ctl.level
    assert tightened < MAX_LEVEL
    _window(ctl, clock, delay_ms=1.0)  # the signal lasts one window only: this one loosens
    assert ctl.level > tightened


def test_a_window_also_closes_after_enough_requests():
    """A window ends after window_requests even if its time is not up."""
    clock = Clock()
    ctl = AdmissionController(ControllerOptions(window_requests=100), clock=clock,
                              wall_clock=lambda: 0.0)
    for i in range(250):
        if ctl.admit(Tier.P3, i % USER_LEVELS):
            ctl.record_delay(100.0)
    assert ctl.windows == 2 and ctl.level < MAX_LEVEL


def test_user_priority_is_stable_within_the_hour_and_changes_with_it():
    """The same user keeps their priority for the salt period; the next hour reshuffles."""
    wall = [3600.0 * 10]
    ctl = AdmissionController(wall_clock=lambda: wall[0], secret=b"k")
    users = [f"user{i}" for i in range(400)]
    first = [ctl.user_priority(u) for u in users]
    wall[0] += 3599
    assert [ctl.user_priority(u) for u in users] == first
    wall[0] += 1
    nxt = [ctl.user_priority(u) for u in users]
    assert nxt != first
    assert all(0 <= p < USER_LEVELS for p in first + nxt)
    assert len(set(first)) > USER_LEVELS // 2  # spread over the levels


def test_the_tier_table_is_data_and_can_be_overridden():
    """Every money-path method is P0; an override changes one entry; bad entries are refused."""
    assert {m for m, t in DEFAULT_TIERS.items() if t == Tier.P0} == {
        "/hongbao.v1.EnvelopeService/SendEnvelope", "/hongbao.v1.EnvelopeService/GrabEnvelope",
        "/hongbao.v1.EnvelopeService/BatchGrab", "/hongbao.v1.WalletService/TopUp",
        "/hongbao.v1.WalletService/Withdraw"}
    table = tier_table({"/hongbao.v1.EnvelopeService/GetEnvelope": "P2"})
    assert tier_of(table, "/hongbao.v1.EnvelopeService/GetEnvelope") == Tier.P2
    assert tier_of(table, "/grpc.health.v1.Health/Check") is EXEMPT
    with pytest.raises(ValueError):
        tier_table({"/hongbao.v1.WalletService/GetBalance": "P9"})
    with pytest.raises(ValueError):
        tier_table({"GetBalance": "P1"})


def test_saturation_alone_sheds_down_to_p0_but_never_into_it():
    """A saturated loop with short queuing delays sheds P3..P1, then holds at P0's top."""
    from gateway.qos.controller import P0_TOP

    clock = Clock()
    ctl = _controller(clock)
    for _ in range(60):
        ctl.report_saturation()
        _window(ctl, clock, delay_ms=1.0)
    assert ctl.level == P0_TOP
    admitted = _window(ctl, clock, delay_ms=1.0)  # no signal: loosens from there
    assert admitted[Tier.P0] == 500 and ctl.level > P0_TOP


def test_when_the_load_stops_full_admission_returns_within_5_s():
    """After a deep overload, a trickle of P0 calls alone: back to 511 within 5 windows."""
    clock = Clock()
    ctl = _controller(clock)
    for _ in range(40):
        _window(ctl, clock, delay_ms=80.0)
    assert split_level(ctl.level)[0] == Tier.P0
    rng = random.Random(3)
    windows = 0
    while ctl.level < MAX_LEVEL and windows < 10:
        for _ in range(20):
            ctl.admit(Tier.P0, rng.randrange(USER_LEVELS))
        clock.now += 1.0
        ctl.tick()
        windows += 1
    assert ctl.level == MAX_LEVEL and windows <= 5


def test_a_downstream_queue_wait_counts_as_queuing_delay():
    """The writer's mean queue wait is added to the window's mean (handler start is quick)."""
    clock = Clock()
    waits = [30.0]
    ctl = AdmissionController(ControllerOptions(window_requests=1_000_000), clock=clock,
                              wall_clock=lambda: 0.0, extra_delay_ms=lambda: waits[0])
    _window(ctl, clock, delay_ms=1.0)
    assert ctl.level < MAX_LEVEL and ctl.last_mean_delay_ms == pytest.approx(31.0)
    waits[0] = 0.0
    level = ctl.level
    _window(ctl, clock, delay_ms=1.0)
    assert ctl.level > level


def test_a_pinned_level_holds_whatever_the_signals():
    clock = Clock()
    windows = []
    ctl = AdmissionController(ControllerOptions(window_requests=1_000_000), clock=clock,
                              wall_clock=lambda: 0.0, pinned_level=300,
                              on_window=lambda: windows.append(1))
    assert ctl.level == 300
    _window(ctl, clock, delay_ms=500.0)
    _window(ctl, clock, delay_ms=0.0)
    assert ctl.level == 300 and len(windows) == 2


def test_without_spare_capacity_the_level_opens_slowly_even_over_empty_keys():
    """Callers dropping locally leave keys empty; a busy window opens only a few of them."""
    from gateway.qos.controller import OPEN_KEYS_BUSY, P0_TOP

    clock = Clock()
    ctl = AdmissionController(ControllerOptions(window_requests=1_000_000), clock=clock,
                              wall_clock=lambda: 0.0, pinned_level=None)
    ctl.level = P0_TOP
    for _ in range(100):
        ctl.admit(Tier.P0, 5)  # only P0 arrives: the rest is dropped by the callers
    ctl.report_no_spare()
    clock.now += 1.0
    ctl.tick()
    assert ctl.level == P0_TOP + OPEN_KEYS_BUSY
    for _ in range(100):
        ctl.admit(Tier.P0, 5)
    clock.now += 1.0
    ctl.tick()  # spare capacity: the empty keys open at once
    assert ctl.level == MAX_LEVEL


def test_saturation_with_few_refusals_sheds_p0_by_user_priority():
    """Only P0 reaches the worker (callers drop the rest, and what the level refuses) and it
    still saturates: the admitted calls are the cause, so P0's lowest user priorities go,
    down to the floor. Were the refusals a quarter of the calls, it would hold instead."""
    from gateway.qos.controller import P0_TOP

    clock = Clock()
    ctl = _controller(clock)
    ctl.level = P0_TOP
    rng = random.Random(11)
    for _ in range(30):
        for _ in range(1000):
            priority = rng.randrange(USER_LEVELS)
            if priority > ctl.level and rng.random() < 0.95:
                continue  # the caller knows the level and keeps its call
            ctl.admit(Tier.P0, priority)
        ctl.report_saturation()
        clock.now += 1.0
        ctl.tick()
    assert ctl.level == ctl.min_level == USER_LEVELS // 2 - 1
