"""A background loop that raises is logged and started again, never left dead."""

from __future__ import annotations

import asyncio

from gateway.loops import BackgroundLoop
from gateway.transport.app import _kept_running


class Flaky(BackgroundLoop):
    """Raises on its first two runs, then counts passes until stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.passes = 0

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= 2:
            raise TimeoutError("a library raised what nobody caught")
        while not self.stopping:
            self.passes += 1
            await self.pause(0.01)


def test_a_loop_that_raises_is_started_again_after_its_pause(capsys):
    """Two failures, two restarts after the pause; the third run keeps working and stops
    when asked."""
    async def scenario():
        loop = Flaky()
        task = asyncio.create_task(_kept_running(loop, restart_s=0.05))
        for _ in range(200):
            if loop.passes >= 3:
                break
            await asyncio.sleep(0.01)
        loop.stop()
        await asyncio.wait_for(task, 2)
        return loop

    loop = asyncio.run(scenario())
    assert loop.runs == 3 and loop.passes >= 3


def test_a_stopped_loop_is_not_restarted():
    """A loop stopped while it is failing ends instead of running again."""
    async def scenario():
        loop = Flaky()
        loop.stop()
        await asyncio.wait_for(_kept_running(loop, restart_s=0.05), 2)
        return loop

    assert asyncio.run(scenario()).runs == 0
