"""`hongbao reconcile` on a ledger directory, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import hotpath
from gateway.domain import keys
from gateway.domain.keys import payment_id_for
from gateway.domain.model import Payment, PaymentKind, PaymentStatus
from gateway.domain.store import Books
from gateway.ledger import LmdbLedger
from tests.conftest import run


def _reconcile(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=60)


def test_a_missing_ledger_is_a_one_line_error(tmp_path):
    """Reconcile on a folder without a ledger says so in one line and exits 2."""
    done = _reconcile(tmp_path / "nothing-here")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hongbao reconcile: no ledger in {tmp_path / 'nothing-here'}"]


def test_money_without_a_transfer_is_caught(tmp_path):
    """A wallet balance no transfer explains makes reconcile exit 1 with NOT BALANCED."""
    led = LmdbLedger(tmp_path)

    async def scenario():
        pid = payment_id_for("ann", PaymentKind.TOP_UP, "t")
        await led.begin_payment(Payment(pid, "ann", PaymentKind.TOP_UP, "icbc-1", "icbc", 500,
                                        PaymentStatus.PENDING), b"f" * 16, 60_000)
        await led.finish_payment(pid, PaymentStatus.SUCCEEDED)

        def plant(b: Books) -> None:
            b.tx.put(keys.ACCOUNTS, keys.wallet_account(b"ann"), hotpath.pack_i64(600))

        await led.write(plant)

    try:
        run(scenario())
    finally:
        led.close()
    done = _reconcile(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT BALANCED" in done.stdout
    assert "account w:ann holds 600 but its transfers give 500" in done.stdout


def test_a_ledger_from_before_the_newer_tables_still_reconciles(tmp_path):
    """A stopped ledger written before some tables existed (here: the cluster and handoff
    tables dropped from a real one) is read as having them empty, not refused."""
    from gateway.ledger import offline_write
    from tests.test_ledger import _fund

    led = LmdbLedger(tmp_path)
    run(_fund(led, "alice", 5_000))
    led.close()
    newer = keys.TABLES[keys.TABLES.index(keys.XCREDIT_OUTBOX):]
    with offline_write(tmp_path) as tx:
        for name in newer:
            tx.drop_table(name)
    done = _reconcile(tmp_path)
    assert done.returncode == 0 and "BALANCED" in done.stdout, done.stdout + done.stderr
