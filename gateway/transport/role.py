"""The background role: exactly one worker of a data directory runs the background loops.

The credit consumer, the expiry sweeper and the payment resolver must run in one
process per ledger, and must keep running while any worker lives. Whoever holds an
exclusive ``flock`` on ``<data-dir>/run/background.lock`` runs them; every other worker
tries again every half second. The kernel drops the lock the moment its holder dies
(``kill -9`` included), so another worker takes the role within about half a second and
crediting and payment resolution go on; a restarted worker simply joins the queue. Two
separate ``hongbao serve`` on one data directory share the role the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

__all__ = ["BackgroundRole"]


class BackgroundRole:
    """An exclusive, non-blocking flock on ``path``, taken once and held until release."""

    def __init__(self, path: Path, retry_s: float = 0.5) -> None:
        self.path = path
        self.retry_s = retry_s
        self.held = False
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return True

    async def acquire(self) -> None:
        """Returns once this process holds the role (cancel it to give up waiting)."""
        while not self.try_acquire():
            await asyncio.sleep(self.retry_s)
        log.info("background_role_acquired", pid=os.getpid(), lock=str(self.path))

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)   # closing drops the flock
        self._fd = None
        self.held = False
