"""The gateway's books: the :class:`Ledger` interface and its LMDB implementation."""

from gateway.ledger._base import (
    ENV_ACTIVE,
    ENV_EXPIRED,
    ENV_SOLD_OUT,
    KIND_LUCKY,
    KIND_NORMAL,
    EnvelopeView,
    GrabOutcome,
    GrabResult,
    GrabView,
    Ledger,
    Notice,
    Payment,
    PaymentStatus,
    SendResult,
    TxKind,
    WalletEntry,
)
from gateway.ledger._lmdb import LmdbLedger, payment_id_for, request_digest

__all__ = [
    "ENV_ACTIVE", "ENV_EXPIRED", "ENV_SOLD_OUT", "KIND_LUCKY", "KIND_NORMAL", "EnvelopeView",
    "GrabOutcome", "GrabResult", "GrabView", "Ledger", "LmdbLedger", "Notice", "Payment",
    "PaymentStatus", "SendResult", "TxKind", "WalletEntry", "payment_id_for", "request_digest",
]
