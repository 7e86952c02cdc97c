"""Per-user rate limits: one user's storm is refused USER_RATE_LIMITED, the others go on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway import errors
from gateway.client import Client
from gateway.errors import reason_of
from gateway.qos.userlimit import UserRateLimiter
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.test_gateway import send, top_up


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refills_at_its_rate_and_says_when():
    clock = Clock()
    lim = UserRateLimiter(10, 3, clock=clock)
    for _ in range(3):
        lim.check("a")
    with pytest.raises(errors.ResourceExhausted) as exc:
        lim.check("a")
    assert exc.value.reason == "USER_RATE_LIMITED" and exc.value.retry_after_ms == 100
    lim.check("b")                      # another user has a bucket of their own
    clock.t += 0.1                      # one token back
    lim.check("a")
    with pytest.raises(errors.ResourceExhausted):
        lim.check("a")
    clock.t += 60                       # refills to the burst, not beyond
    for _ in range(3):
        lim.check("a")
    with pytest.raises(errors.ResourceExhausted):
        lim.check("a")
    assert lim.refused == 3


def test_off_and_bounded():
    UserRateLimiter(0, 0).check("x")    # 0: no limit at all
    lim = UserRateLimiter(1, 1, max_users=2)
    for u in ("a", "b", "c"):
        lim.check(u)
    assert len(lim) == 2                # the least recently seen user was forgotten
    lim.check("a")                      # ...and gets a full bucket back
    with pytest.raises(ValueError):
        UserRateLimiter(-1, 1)


def test_one_users_grab_storm_is_limited_and_others_are_not(stack, tmp_path):
    (tmp_path / "limits.toml").write_text("user_rate_per_s = 5.0\nuser_burst = 5\n")
    stack.start_gateway("--config", str(tmp_path / "limits.toml"))

    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 1_000, 50)
            storm = stack.meta("stormy")

            async def grab(meta, rid):
                try:
                    r = await c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                        envelope_id=sent.envelope_id, request_id=rid), metadata=meta, timeout=10)
                    return r.outcome
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert reason_of(err) == "USER_RATE_LIMITED"
                    assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"]
                    return "limited"
            stormed = await asyncio.gather(*(grab(storm, f"s{i}") for i in range(40)))
            calm = await asyncio.gather(*(grab(stack.meta(f"calm{i}"), "g") for i in range(20)))
            assert stormed.count("limited") >= 30
            assert stormed.count(envelope_pb2.GRAB_OUTCOME_GRABBED) == 1   # one share per user
            assert calm == [envelope_pb2.GRAB_OUTCOME_GRABBED] * 20
            b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=storm)
            assert b.balance_fen + b.pending_credit_fen > 0
    asyncio.run(scenario())
