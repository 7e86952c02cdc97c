"""The seeded simulation: the money flows of one gateway in one process, replayable by seed.

Owns: a virtual-time event loop (``vloop``), an in-memory bank with the bank simulator's
channels and every fault type it has, and the payment butler's twin that routes payments
across those channels (``bank``), a simulated gateway process that crashes at seed-chosen
steps and restarts over the same books (``world``), the seeded scenarios, their
invariants and the shrinker (``plan``, ``check``, ``shrink``), and known defects
the simulation must find (``mutants``). ``hongbao sim`` runs it.

The code under test is the product's own: the money rules and the memory backend
(``gateway.ledger.MemoryLedger``), the use cases (sending, grabbing, card payments) and
the background workers (credit consumer, expiry sweeper, payment resolver). Only the
transport, the clock, the bank, the butler's routing and the process boundary are
simulated.

May import: ``gateway.domain``, ``gateway.ledger`` (its public names),
``gateway.usecases``, ``gateway.payments``, ``gateway.qos``, ``gateway.config``,
``gateway.errors``, ``gateway.crashpoints``, ``gateway.loops``, ``hotpath``.
"""
