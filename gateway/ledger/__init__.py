"""The gateway's books: the :class:`Ledger` contract and its backends.

Owns: the contract (``_contract``: every read and write as an async method
with typed results, plus the audit and the writer statistics), the generic
implementation over the domain rules (:class:`BooksLedger`), and two
backends: LMDB, embedded and durable with group commit (``_lmdb``,
``_writer``), and memory (``_memory``), for tests and simulations.

May import: ``gateway.domain``, ``gateway.errors``, ``lmdb``. Nothing outside
this package imports a private name of it or touches LMDB.
"""

from gateway.domain.audit import Report
from gateway.ledger._contract import BooksLedger, Ledger
from gateway.ledger._lmdb import (
    LedgerCorrupt,
    LmdbLedger,
    LmdbSnapshot,
    check_ledger,
    offline_write,
)
from gateway.ledger._memory import MemoryLedger

__all__ = ["BooksLedger", "Ledger", "LedgerCorrupt", "LmdbLedger", "LmdbSnapshot",
           "MemoryLedger", "Report", "check_ledger", "offline_write"]
