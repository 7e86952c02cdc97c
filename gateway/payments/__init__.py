"""Payments: how the gateway reaches the banks and closes the loop on unclear results.

Owns: the bank link (``bank``: the only module that speaks banksim.v1, in
domain terms), the payment butler (``butler``: per-bank admission within
capacity, circuit breakers), the resolver (``resolver``: unknown results
voided or refunded) and reconcile's bank cross-check (``crosscheck``).

May import: ``gateway.domain``, ``gateway.ledger`` (public names),
``gateway.errors``, ``gateway.loops``, the generated ``banksim.v1`` and
``banksim.cards``; never the transport or the use cases.
"""
