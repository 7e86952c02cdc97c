"""An asyncio event loop on virtual time: a sleep costs nothing, and runs are repeatable.

The loop's clock starts at 0 and moves only when every ready callback has run: the
selector, instead of waiting ``timeout`` seconds for I/O that never comes (a simulation
does no I/O), moves the clock forward by ``timeout``. With no timer left and nothing
ready the simulated world can never move again, which is a bug of the scenario or of
the code under test: the selector raises :class:`Stuck` instead of blocking forever.

Order is deterministic: ready callbacks run first in, first out, and timers in order of
their due time (ties in the order the heap keeps them, itself a function of the run).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any


class Stuck(RuntimeError):
    """Nothing is ready and no timer is set: the simulation cannot go on."""


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise Stuck("every task waits for something no timer will bring")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    """``time()`` is virtual seconds since the loop was made."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self._now += seconds
