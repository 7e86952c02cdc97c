"""A background loop that stops promptly, shared by the use cases' and payments' workers."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """A loop of worker 0 that stops promptly: every wait ends early on :meth:`stop`."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """The loop itself; returns soon after :meth:`stop`."""
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def pause(self, seconds: float) -> None:
        """Sleeps up to ``seconds`` (just yields when <= 0), waking at once on stop."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
