"""Past one machine: SETs, the slot map, and the NATS JetStream bus between them.

Owns: the cluster file a SET is started with (``config``), the slot map that says which
SET owns each of the 1,024 slots and where each SET is reached (``slotmap``), and the
map's home in the JetStream key-value bucket ``hongbao-slots``, versioned and changed
only by compare-and-set (``mapstore``), and the accounting queue between SETs: the
stream ``HONGBAO_CREDITS`` with its relay and consumer (``bus``). A user's slot is
``gateway.domain.keys.slot_of``; an envelope id carries its sender's.

May import: ``gateway.domain``, ``gateway.ledger`` (public names), ``gateway.loops``,
``gateway.errors``, ``nats`` (nats-py). Nothing of the
embedded mode imports this package: without ``--cluster`` nothing changes.
"""
