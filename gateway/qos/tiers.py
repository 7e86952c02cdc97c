"""The business tier of every RPC: P0 the money path first, P3 non-core last.

One table of data, not branches: ``hongbao serve --config`` may override an
entry (``[tiers]`` in TOML, method -> "P0".."P3" or "exempt").
"""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    """Lower is more important; shedding starts from the highest number."""

    P0 = 0
    P1 = 1
    P2 = 2
    P3 = 3


EXEMPT = None  # never shed: health, reflection, admin, ticket issuing

DEFAULT_TIERS: dict[str, Tier | None] = {
    "/hongbao.v1.EnvelopeService/SendEnvelope": Tier.P0,
    "/hongbao.v1.EnvelopeService/GrabEnvelope": Tier.P0,
    "/hongbao.v1.EnvelopeService/BatchGrab": Tier.P0,
    "/hongbao.v1.WalletService/TopUp": Tier.P0,
    "/hongbao.v1.WalletService/Withdraw": Tier.P0,
    "/hongbao.v1.EnvelopeService/GetEnvelope": Tier.P1,
    "/hongbao.v1.WalletService/GetBalance": Tier.P2,
    "/hongbao.v1.WalletService/ListTransactions": Tier.P2,
    "/hongbao.v1.WalletService/BindCard": Tier.P2,
    "/hongbao.v1.WalletService/UnbindCard": Tier.P2,
    "/hongbao.v1.WalletService/ListCards": Tier.P2,
    "/hongbao.v1.NotificationService/WatchNotifications": Tier.P3,
    "/hongbao.v1.MomentsService/UnlockPhoto": Tier.P3,
    "/hongbao.v1.AuthService/IssueTicket": EXEMPT,
}

# Methods that degrade rather than fail when their level is shed: the call goes on to
# the use case, which answers from its cache (``stale = true``) or refuses with SHED.
DEGRADABLE = frozenset({
    "/hongbao.v1.WalletService/GetBalance",
    "/hongbao.v1.WalletService/ListTransactions",
})

_NAMES = {"P0": Tier.P0, "P1": Tier.P1, "P2": Tier.P2, "P3": Tier.P3, "exempt": EXEMPT}


def tier_table(overrides: dict[str, str] | None = None) -> dict[str, Tier | None]:
    """The default table with ``overrides`` applied; ValueError names a bad entry."""
    table = dict(DEFAULT_TIERS)
    for method, name in (overrides or {}).items():
        if not method.startswith("/") or method.count("/") != 2:
            raise ValueError(f"tiers: {method!r} is not a /package.Service/Method name")
        if name not in _NAMES:
            raise ValueError(f"tiers: {method} -> {name!r}; use one of {', '.join(_NAMES)}")
        table[method] = _NAMES[name]
    return table


def tier_of(table: dict[str, Tier | None], method: str) -> Tier | None:
    """A method's tier; methods not in the table (health, reflection, admin) are exempt."""
    return table.get(method, EXEMPT)
