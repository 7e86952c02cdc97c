"""Non-core step-down (peak shaving): notification streams poll less often while the
level is raised and catch up after; the credit consumer slows only when the writer
is the bottleneck. Nothing waiting is lost."""

from __future__ import annotations

import asyncio
import time

from gateway.client import Client
from gateway.qos.pressure import Pressure
from gateway.usecases.background import CreditConsumer
from hongbao.v1 import admin_pb2, notification_pb2
from tests.conftest import run
from tests.test_gateway import grab, send, top_up
from tests.test_ledger import _fund, _send, assert_balanced, make_ledger
from tests.test_qos import write_config

RAISED = 510  # only P3's lowest user priority shed: the level counts as raised


def test_streams_poll_at_the_floor_while_the_level_is_raised_and_lose_nothing(stack, tmp_path):
    """Pinned raised level: noncore_share 0.1, events arrive late (polled every ~1 s), all
    of them, in order."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml", qos_pin_level=RAISED)))

    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            env = await send(c, owner, 5_000, 5)
            watcher = stack.meta("watcher")
            stream = c.notifications.WatchNotifications(
                notification_pb2.WatchNotificationsRequest(), metadata=watcher)
            delays, seen = [], []
            for i in range(5):
                started = time.monotonic()
                await top_up(c, watcher, 10 + i, rid=f"w{i}")
                while True:
                    msg = await asyncio.wait_for(stream.read(), 10)
                    seen.append(msg.notification.event_id)
                    if msg.notification.amount_fen == 10 + i:
                        break
                delays.append(time.monotonic() - started)
            await grab(c, watcher, env.envelope_id)
            stream.cancel()
            qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(),
                                             metadata=stack.meta("ops", scopes=("admin",)))
            return delays, seen, qos

    delays, seen, qos = run(scenario())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert sum(delays) / len(delays) > 0.15, delays  # polled at a tenth of the 100 ms rate
    assert abs(qos.admission.noncore_share - 0.1) < 1e-9
    assert {d.name: d.in_force for d in qos.degradations}["noncore_stepdown"]


def test_the_credit_consumer_slows_to_its_floor_only_when_the_writer_is_the_bottleneck(tmp_path):
    """Writer trouble: credits at the floor rate; a raised level alone changes nothing; when
    the trouble clears the backlog drains; every credit lands exactly once."""
    led = make_ledger("lmdb", tmp_path)
    pressure = Pressure()

    async def scenario():
        await _fund(led, "fay", 40_000)
        env = await _send(led, "fay", 40_000, 40)
        for i in range(40):
            await led.grab(f"u{i}", env.envelope_id, "r")
        consumer = CreditConsumer(led, rate_per_s=10_000, pressure=pressure,
                                  floor_rate_per_s=10, idle_sleep_s=0.01)
        pressure.update(0, writer_trouble=True)
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(1.0)
        slow = consumer.applied
        pressure.update(0, writer_trouble=False)  # level still at 0: credits are core work
        for _ in range(100):
            if (await led.stats()).credit_backlog == 0:
                break
            await asyncio.sleep(0.05)
        consumer.stop()
        await task
        return slow, consumer.applied, (await led.stats()).credit_backlog

    try:
        slow, applied, backlog = run(scenario())
        assert 1 <= slow <= 20, slow  # about 10/s for one second, not 10,000/s
        assert applied == 40 and backlog == 0
        assert_balanced(led)
    finally:
        led.close()


def test_credits_keep_their_rate_while_the_level_is_raised(stack, tmp_path):
    """A raised level steps the non-core work down, not crediting: grabs land in wallets
    as promptly as ever (the writer is not the bottleneck here)."""
    stack.start_gateway("--config", str(write_config(tmp_path / "q.toml", qos_pin_level=RAISED)))

    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            env = await send(c, owner, 3_000, 3)
            got = [await grab(c, stack.meta(u), env.envelope_id) for u in ("x", "y", "z")]
            started = time.monotonic()
            admin = stack.meta("ops", scopes=("admin",))
            while time.monotonic() - started < 5:
                qos = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin)
                if {t.topic: t.lag for t in qos.topics}["credit"] == 0:
                    break
                await asyncio.sleep(0.05)
            return got, time.monotonic() - started, qos

    got, waited, qos = run(scenario())
    assert all(g.amount_fen > 0 for g in got)
    assert waited < 2.0, waited
    assert {t.topic: t.rate_per_second for t in qos.topics}["credit"] == 100_000
    assert not {d.name: d.in_force for d in qos.degradations}["credit_stepdown"]
