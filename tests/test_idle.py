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
