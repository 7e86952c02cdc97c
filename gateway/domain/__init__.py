"""The money rules, with no storage, gRPC or bank in them.

Owns: the vocabulary (``model``: kinds, states, results, notification
texts), every name the books use (``keys``: tables, accounts, transfer ids,
ids), the byte layout of records (``records``), the storage protocol and the
books kept over it (``store``), the rules that move money (``rules``), the
queries (``reads``) and the conservation checks (``audit``).

May import: ``hotpath``, ``gateway.errors`` and the standard library; never a
backend, a transport or the bank link.
"""
