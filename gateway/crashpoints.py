"""Deterministic crash points for the kill tests: SIGKILL this process at a named step.

``HONGBAO_CRASH_AT=name[,name...]`` in a worker's environment makes :func:`crash_point`
kill the process with SIGKILL (the same as ``kill -9``: no cleanup, no flush) the first
time the named step is reached. Unset, as in every normal run, a crash point costs one
truth test of an empty frozenset. The steps are where a card payment's state is durable
on one side and not yet on the other:

- ``after_intent``: the payment intent is committed, the bank not yet called;
- ``after_bank``: the bank has answered (settled or declined), the outcome not yet saved;
- ``resolver_void``: the resolver had the bank void an order, the outcome not yet saved;
- ``resolver_refund``: the resolver had the bank refund a debit, not yet saved.

A seeded simulation (``gateway.sim``) crashes its simulated process at the same steps
in-process: :func:`set_hook` installs a callable that is handed every step reached.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

__all__ = ["POINTS", "crash_point", "set_hook"]

POINTS = frozenset({"after_intent", "after_bank", "resolver_void", "resolver_refund"})
_ARMED = frozenset(p for p in os.environ.get("HONGBAO_CRASH_AT", "").split(",") if p)
if _ARMED - POINTS:
    raise RuntimeError(f"HONGBAO_CRASH_AT names unknown crash points: {sorted(_ARMED - POINTS)}")


_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> None:
    """Hands every crash point reached to ``hook`` (None: no hook). Simulations only."""
    global _hook
    _hook = hook


def crash_point(name: str) -> None:
    """SIGKILLs this process when ``name`` is armed (see the module docstring)."""
    if _ARMED and name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
    if _hook is not None:
        _hook(name)
