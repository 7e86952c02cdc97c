"""``hongbao reconcile``: the conservation checks on a ledger directory, and the bank's view.

The checks themselves are ``gateway.domain.audit`` (on one consistent
snapshot, so this can run beside a live gateway) and
``gateway.payments.crosscheck`` (against the bank simulator's own ledger).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from gateway.domain.audit import Report, audit
from gateway.ledger import LmdbSnapshot
from gateway.payments.bank import BankClient
from gateway.payments.crosscheck import cross_check_bank


def reconcile_dir(data_dir: Path, bank_target: str | None = None,
                  bank_credentials: grpc.ChannelCredentials | None = None) -> Report:
    """Audits the ledger in ``data_dir`` (read-only) and, given a bank, cross-checks it."""
    snapshot = LmdbSnapshot(data_dir)
    try:
        report = snapshot.read(audit)
    finally:
        snapshot.close()
    if bank_target:
        async def check() -> None:
            bank = BankClient(bank_target, timeout_s=10, credentials=bank_credentials)
            try:
                await cross_check_bank(report, bank)
            finally:
                await bank.close()
        asyncio.run(check())
    return report
