"""Creating replicated things on a JetStream cluster that is still forming.

A 3-node cluster answers JetStream requests as soon as it has a meta leader, but for a
second or two after that it may not yet know all its peers: creating a stream or bucket
with 3 replicas then fails with "no suitable peers for placement" (err_code 10005), or
with 503 while the leader changes. Seen in the suite right after the cluster started, and
a SET started with its NATS nodes meets the same moment. A request can also time out
while the cluster elects a leader or the machine is loaded (seen with SETs starting
together on a busy machine). :func:`placed` retries such a call for a bounded time; any
other error, and the last one at the deadline, is raised. Every call given to it is
idempotent: creating a stream or bucket that exists with the same settings succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats import errors as nats_errors
from nats.js import errors as js_errors

T = TypeVar("T")

NO_SUITABLE_PEERS = 10005
FORMING_TIMEOUT_S = 20.0


def _forming(exc: Exception) -> bool:
    if isinstance(exc, js_errors.ServiceUnavailableError):
        return True
    return isinstance(exc, js_errors.BadRequestError) and exc.err_code == NO_SUITABLE_PEERS


async def placed(call: Callable[[], Awaitable[T]], timeout_s: float = FORMING_TIMEOUT_S) -> T:
    """``await call()``, again every 0.25 s while the cluster is still placing peers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except (js_errors.APIError, nats_errors.TimeoutError) as exc:
            timed_out = isinstance(exc, nats_errors.TimeoutError)
            if not (timed_out or _forming(exc)) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.25)
