"""What the gateway does, by use case, with no gRPC in it.

Owns: input checks (``checks``), sending envelopes balance first
(``sending``), grabbing behind the grab gate (``grabbing``), card payments
with a closed loop (``cards``), wallet reads (``wallet``), Moments photo
unlocks, free under payment pressure (``moments``), operator requests
(``operations``) and the time-driven workers (``background``). Servicers call
these and never reach the ledger, the butler or the bank themselves.

May import: ``gateway.domain``, ``gateway.ledger`` (its public names), ``gateway.qos``,
``gateway.payments``, ``gateway.config``, ``gateway.errors``, ``hotpath``.
"""

from __future__ import annotations

import dataclasses

from gateway.config import Settings
from gateway.qos.pressure import Pressure
from gateway.qos.userlimit import UserRateLimiter
from gateway.usecases.bound import BoundCards
from gateway.usecases.cards import CardPayments
from gateway.usecases.grabbing import Grabbing
from gateway.usecases.moments import Moments
from gateway.usecases.operations import Operations
from gateway.usecases.sending import SendCommand, Sending
from gateway.usecases.wallet import WalletReads


@dataclasses.dataclass(frozen=True, slots=True)
class Gateway:
    """The use cases of one worker process, as the servicers see them."""

    settings: Settings
    sending: Sending
    grabbing: Grabbing
    cards: CardPayments
    wallet: WalletReads
    moments: Moments
    # The worker's QoS state, for the transport's own step-downs (the notification
    # streams poll less often while the level is raised).
    pressure: Pressure
    operations: Operations
    # Per-user token buckets over the calls that move money or grab.
    limits: UserRateLimiter
    bound: BoundCards


__all__ = ["BoundCards", "CardPayments", "Gateway", "Grabbing", "Moments", "Operations",
           "SendCommand", "Sending", "WalletReads"]
