"""Admission control against a real server: the level on every response, precise
refusals before the body is read, P0 shed only by user priority, the tier table
from --config, status for operators."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.client import Client
from gateway.errors import reason_of
from gateway.qos.controller import USER_LEVELS, priority_of, salt_of
from hongbao.v1 import (
    admin_pb2,
    envelope_pb2,
    notification_pb2,
    wallet_pb2,
)
from tests.conftest import run
from tests.test_gateway import balance, top_up

LEVEL = "x-hongbao-admission-level"
P3_ALL_SHED = 2 * USER_LEVELS + USER_LEVELS - 1  # 383: P0..P2 admitted, P3 refused


def write_config(path: Path, tiers: dict[str, str] | None = None, **values) -> Path:
    """A TOML settings file: scalar values, then a [tiers] table."""
    lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
    if tiers:
        lines.append("[tiers]")
        lines += [f'"{m}" = "{t}"' for m, t in tiers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def users_by_priority(count: int, *, below: int) -> tuple[list[str], list[str]]:
    """``count`` users whose priority this hour is < ``below``, and ``count`` whose is not."""
    salt = salt_of(int(time.time() // 3600))
    low, high = [], []
    for i in range(10_000):
        user = f"qos{i}"
        (low if priority_of(user, salt) < below else high).append(user)
        if len(low) >= count and len(high) >= count:
            return low[:count], high[:count]
    raise AssertionError("not enough users")


def trailers(call_or_error) -> dict[str, str]:
    md = call_or_error.trailing_metadata()
    return {k: v for k, v in (md or ()) if isinstance(v, str)}


def shed_info(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "SHED"
    return dict(info.metadata)


def test_every_response_carries_the_admission_level(stack):
    """OK answers, refusals by the use case and exempt calls all carry the level."""
    async def scenario():
        async with Client(stack.target) as c:
            call = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=stack.meta("a"))
            await call
            assert (await call.trailing_metadata())[LEVEL] == "511"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(envelope_id="x"),
                                              metadata=stack.meta("a"))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert trailers(exc.value)[LEVEL] == "511"
            health = health_pb2_grpc.HealthStub(c.channel)
            call = health.Check(health_pb2.HealthCheckRequest())
            await call
            assert (await call.trailing_metadata())[LEVEL] == "511"
    run(scenario())


def test_a_raised_level_refuses_p3_precisely_and_serves_the_rest(stack, tmp_path):
    """P3 gets RESOURCE_EXHAUSTED/SHED with tier, level, pushback; P0..P2, health, admin go on."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml",
                                                     qos_pin_level=P3_ALL_SHED)))

    async def scenario():
        async with Client(stack.target) as c:
            stream = c.notifications.WatchNotifications(
                notification_pb2.WatchNotificationsRequest(), metadata=stack.meta("a"))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stream.read()
            err = exc.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert shed_info(err) == {"tier": "P3", "level": str(P3_ALL_SHED)}
            assert trailers(err)["grpc-retry-pushback-ms"] == "1000"
            assert trailers(err)[LEVEL] == str(P3_ALL_SHED)
            await top_up(c, stack.meta("a"), 500)
            assert (await balance(c, stack.meta("a"))).balance_fen == 500
            health = health_pb2_grpc.HealthStub(c.channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                             metadata=stack.meta("ops", scopes=("admin",)))
            tiers = {t.tier: t for t in qos.tiers}
            assert tiers["P3"].shedding and tiers["P3"].rejected == 1
            assert not tiers["P0"].shedding and tiers["P0"].admitted >= 1
            assert tiers["P0"].rejected == 0 and tiers["P2"].rejected == 0
            assert qos.admission.level == P3_ALL_SHED and qos.admission.level_tier == "P2"
            assert qos.admission.enabled
            degraded = {d.name: d.in_force for d in qos.degradations}
            assert degraded["noncore_stepdown"] and not degraded["balance_cache"]
    run(scenario())


def test_a_shed_call_is_refused_before_its_body_is_read(stack, tmp_path):
    """Bytes that are no protobuf at all still get SHED: the body was never decoded."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml",
                                                     qos_pin_level=P3_ALL_SHED)))

    async def scenario():
        async with Client(stack.target) as c:
            raw = c.channel.unary_stream("/hongbao.v1.NotificationService/WatchNotifications",
                                         request_serializer=None, response_deserializer=None)
            call = raw(b"\xff\xff\xff\xff", metadata=stack.meta("a"))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call.read()
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(exc.value) == "SHED"
            # No ticket at all: still SHED, not UNAUTHENTICATED (the ticket check never ran).
            call = raw(b"", metadata=())
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call.read()
            assert reason_of(exc.value) == "SHED"
    run(scenario())
    log = (stack.root / "gateway.log").read_text()
    assert "WatchNotifications" not in log  # refused before the access log too


def test_p0_is_shed_only_by_user_priority(stack, tmp_path):
    """At a level inside P0, users above it are refused and users below it served."""
    floor = 64
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml",
                                                     qos_pin_level=floor - 1)))
    served, refused = users_by_priority(3, below=floor)

    async def scenario():
        async with Client(stack.target) as c:
            for user in served:
                await top_up(c, stack.meta(user), 100)
            for user in refused:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await top_up(c, stack.meta(user), 100)
                assert shed_info(exc.value) == {"tier": "P0", "level": str(floor - 1)}
    run(scenario())


def test_the_tier_table_comes_from_config_and_a_shed_call_changes_nothing(stack, tmp_path):
    """TopUp moved to P3 by [tiers] is shed at a P3 level; the wallet stays as it was."""
    topup = "/hongbao.v1.WalletService/TopUp"
    stack.start_gateway("--config", str(write_config(
        tmp_path / "q.toml", tiers={topup: "P3"}, qos_pin_level=P3_ALL_SHED)))

    async def scenario():
        async with Client(stack.target) as c:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await top_up(c, stack.meta("a"), 700)
            assert shed_info(exc.value)["tier"] == "P3"
            b = await balance(c, stack.meta("a"))
            assert (b.balance_fen, b.pending_credit_fen) == (0, 0)
    run(scenario())


def test_admission_off_measures_but_never_sheds(stack, tmp_path):
    """qos_enabled = false: even a pinned level admits everything and reports 511."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml", qos_enabled=False,
                                                     qos_pin_level=0)))

    async def scenario():
        async with Client(stack.target) as c:
            call = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=stack.meta("a"))
            await call
            assert (await call.trailing_metadata())[LEVEL] == "511"
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                             metadata=stack.meta("ops", scopes=("admin",)))
            assert not qos.admission.enabled and qos.admission.level == 511
    run(scenario())


@pytest.mark.parametrize("tiers, values, message", [
    ({"/hongbao.v1.WalletService/TopUp": "P9"}, {}, "use one of"),
    ({"TopUp": "P1"}, {}, "not a /package.Service/Method name"),
    ({}, {"qos_p0_user_floor": 0}, "qos_p0_user_floor"),
    ({}, {"qos_pin_level": 512}, "qos_pin_level"),
])
def test_a_bad_qos_setting_stops_the_server_at_start(tmp_path, tiers, values, message):
    cfg = write_config(tmp_path / "bad.toml", tiers=tiers, **values)
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "serve", "--port", "0",
                           "--data-dir", str(tmp_path / "d"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr


def test_a_setting_of_the_wrong_type_is_refused(tmp_path):
    """"false" (a string) for a bool would read as true: the file is refused instead."""
    from gateway.config import Settings

    cfg = tmp_path / "s.toml"
    cfg.write_text('qos_enabled = "false"\n')
    with pytest.raises(ValueError, match="qos_enabled must be bool, not str"):
        Settings.load(cfg)
    cfg.write_text("qos_delay_threshold_ms = 5\nqos_window_requests = 100\n")
    assert Settings.load(cfg).qos_delay_threshold_ms == 5


def test_the_client_drops_locally_what_the_server_would_shed(stack, tmp_path):
    """Once a response said the level sheds P1, the throttled client refuses P1 calls
    itself (SHED_LOCALLY) and the server never sees them."""
    level = USER_LEVELS - 1  # P0 admitted, P1 and up shed
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml", qos_pin_level=level)))

    async def scenario():
        async with Client(stack.target, throttle=True) as c:
            user = stack.meta("a")
            await top_up(c, user, 100)  # learns the level from the trailers
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await c.envelopes.GetEnvelope(
                        envelope_pb2.GetEnvelopeRequest(envelope_id="e" * 20), metadata=user)
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert reason_of(exc.value) == "SHED_LOCALLY"
            assert c.throttle is not None and c.throttle.shed_locally == 5
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                             metadata=stack.meta("ops", scopes=("admin",)))
            assert {t.tier: t.offered for t in qos.tiers}["P1"] == 0
    run(scenario())


def test_hongbao_qos_shows_the_level_and_the_tiers(stack, tmp_path):
    """`hongbao qos --once` draws one table: the pinned level, P3 shedding, the banks."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml",
                                                     qos_pin_level=P3_ALL_SHED)))
    shown = subprocess.run(
        [sys.executable, "-m", "gateway.ops.cli", "qos", "--target", stack.target,
         "--data-dir", str(stack.data_dir), "--once"],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "120", "PATH": ""})
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"level {P3_ALL_SHED}" in out and "(P2, user priority 127)" in out
    p3 = next(line for line in out.splitlines() if "P3" in line and "│" in line)
    assert "yes" in p3
    assert "icbc" in out and "credit" in out and "noncore_stepdown" in out
    icbc = [line for line in out.splitlines() if "icbc" in line]
    assert [("direct" in line, "clearing" in line) for line in icbc] == [
        (True, False), (False, True)], "one row per channel, direct first"
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.ops.cli", "qos", "--target", stack.target,
         "--ticket", stack.ticket("a", scopes=("read",)), "--once"],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PERMISSION_DENIED" in bad.stderr
