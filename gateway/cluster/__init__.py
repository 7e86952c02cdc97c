"""Past one machine: SETs, the slot map, and the NATS JetStream bus between them.

Owns: the cluster file a SET (or one of its gateway groups) is started with (``config``);
the slot map that says which SET owns each of the 1,024 slots, which are frozen for a
handoff, and where each SET's groups are reached (``slotmap``); the map's home in the
JetStream key-value bucket ``hongbao-slots``, versioned and changed only by
compare-and-set (``mapstore``); a SET's view of the cluster: its NATS connection and the
map in force (``node``); the accounting queue between SETs: the stream
``HONGBAO_CREDITS`` with its relay and consumer (``bus``) and the slot handoff's chunk
shipper and importer (``handoff``); the project's routing client (``client``); the
cluster reconcile's checks (``reconcile``). A user's slot is
``gateway.domain.keys.slot_of``; an envelope id carries its sender's.

May import: ``gateway.domain``, ``gateway.ledger`` (public names), ``gateway.loops``,
``gateway.errors``, ``gateway.client`` (``client`` only), ``nats`` (nats-py). Nothing of
the embedded mode imports this package's NATS code: without ``--cluster`` nothing
changes (``gateway.transport`` reads only ``slotmap``, for the map service).
"""
