"""A gateway at rest writes nothing: its background workers look, and commit only work."""

from __future__ import annotations

import asyncio

from gateway.config import Settings
from gateway.ledger import LmdbLedger
from gateway.security import tickets
from gateway.transport.app import build_app
from tests.conftest import run


def test_an_idle_worker_commits_no_write_transaction(tmp_path):
    ledger = LmdbLedger(tmp_path / "data")
    app = build_app(Settings(expiry_sweep_s=0.05), tickets.KeyRing.load_or_create(tmp_path),
                    ledger)

    async def scenario():
        app.start_background()
        await asyncio.sleep(0.3)  # the loops have started and looked at least once
        before = (await ledger.stats()).batches
        await asyncio.sleep(1.5)
        after = (await ledger.stats()).batches
        await app.close()
        return before, after

    before, after = run(scenario())
    assert after == before


def test_a_grab_wakes_the_idle_credit_consumer(tmp_path):
    """With a 10 s idle pause the consumer would sleep through a grab; the grab's wake-up
    has it credited at once."""
    from gateway.usecases.background import CreditConsumer
    from tests.test_ledger import _fund, _send

    ledger = LmdbLedger(tmp_path / "data")
    consumer = CreditConsumer(ledger, idle_sleep_s=10.0)

    async def scenario():
        await _fund(ledger, "ada", 1000)
        env = await _send(ledger, "ada", 1000, 2)
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(0.2)  # idle now, in a 10 s pause
        await ledger.grab("bob", env.envelope_id, "r")
        consumer.wake()
        for _ in range(50):
            if consumer.applied:
                break
            await asyncio.sleep(0.02)
        consumer.stop()
        await task
        return consumer.applied

    try:
        assert run(scenario()) == 1
    finally:
        ledger.close()
