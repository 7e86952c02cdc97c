"""Automatic QoS (SPEC lesson 6): business tiers and DAGOR-style admission control.

Owns: the tier of every RPC (``tiers``: one table, overridable by settings)
and the admission controller (``controller``: the overload signal over a
window, the admission level (tier, user priority), tightening fast and
loosening slowly). Pure logic with an injected clock, so it is tested
deterministically; the interceptor that applies it lives with the other
interceptors.

It also owns the QoS state the degradations read (``pressure``: which
tiers are shed, the free share of Moments unlocks, the non-core consumers'
share of their rate).

It also owns the per-worker governor (``governor``) that feeds the
controller its signals (loop lag and busy share, writer queue, bank trouble)
and keeps the Pressure in step with each window.

May import: the standard library, ``structlog`` (the governor's level log
line) and ``gateway.errors`` (for the SHED error).
"""
