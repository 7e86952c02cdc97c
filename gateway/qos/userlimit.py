"""Per-user rate limits: one user's storm of grabs or sends cannot crowd out the others.

Admission (``gateway.qos.controller``) protects the worker as a whole and sheds by tier
and user priority; it does not stop one user who sends a thousand grabs a second from
taking a thousand of the worker's slots. This does: a token bucket per verified user
(the ticket's subject, after the auth interceptor, so a forged ticket cannot drain
someone else's bucket) over the calls that move money or grab: SendEnvelope,
GrabEnvelope, TopUp, Withdraw and UnlockPhoto. Past it a call is refused
RESOURCE_EXHAUSTED ``USER_RATE_LIMITED`` with ``grpc-retry-pushback-ms`` set to when the
next token is due, before anything is read or written.

Buckets are per worker process (a user spread over N workers gets up to N times the
rate) and the table is bounded: past ``max_users`` the least recently seen users are
forgotten, which only ever gives them a full bucket back.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway import errors

__all__ = ["UserRateLimiter"]


class UserRateLimiter:
    """Token buckets of ``burst`` tokens refilled at ``rate_per_s``; 0 turns it off."""

    def __init__(self, rate_per_s: float, burst: int, *, max_users: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or burst < 0 or max_users < 1:
            raise ValueError("rate_per_s and burst must be >= 0, max_users >= 1")
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1) if rate_per_s else 0
        self._max_users = max_users
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.refused = 0

    def check(self, user: str) -> None:
        """Takes one of ``user``'s tokens, or raises USER_RATE_LIMITED."""
        if not self.rate_per_s:
            return
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = [float(self.burst), now]
            self._buckets[user] = bucket
            if len(self._buckets) > self._max_users:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(user)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] >= 1 - 1e-9:  # a token due now, give or take float rounding
            bucket[0] -= 1
            return
        self.refused += 1
        wait_ms = math.ceil((1 - bucket[0]) / self.rate_per_s * 1000)
        raise errors.ResourceExhausted(
            "USER_RATE_LIMITED",
            f"more than {self.rate_per_s:g} calls/s (burst {self.burst}) from this user",
            retry_after_ms=wait_ms)

    def __len__(self) -> int:
        return len(self._buckets)
