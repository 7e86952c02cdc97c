"""Check 6 of reconcile: the bank's merchant balance against the gateway's books."""

from __future__ import annotations

from typing import Protocol

from gateway.domain.audit import Report
from gateway.domain.model import PaymentKind
from gateway.payments.bank import BankTotals, OrderStatus


class BankView(Protocol):
    """What the cross-check asks a bank: the bank link, or the simulation's bank."""

    async def totals(self) -> BankTotals: ...

    async def query(self, order_id: str) -> OrderStatus: ...


async def cross_check_bank(report: Report, bank: BankView) -> None:
    """Adds the bank's view to ``report``: what it holds for the gateway must equal what the
    gateway's clearing accounts say came in, plus in-flight payments the bank has settled
    (withdrawals count negative)."""
    totals = await bank.totals()
    settled_in_flight = 0
    for item in report.in_flight:
        status = await bank.query(item["payment_id"])
        item["bank_status"] = f"ORDER_STATUS_{status.name}"
        if status == OrderStatus.SETTLED:
            sign = -1 if item["kind"] == PaymentKind.WITHDRAW else 1
            settled_in_flight += sign * item["amount_fen"]
    expected = report.totals["clearing_in_fen"] + settled_in_flight
    report.bank = {
        "merchant_balance_fen": totals.merchant_balance_fen, "expected_fen": expected,
        "total_debited_fen": totals.total_debited_fen,
        "total_credited_fen": totals.total_credited_fen,
        "total_refunded_fen": totals.total_refunded_fen,
        "settled_in_flight_fen": settled_in_flight,
    }
    if totals.merchant_balance_fen != expected:
        report.bad(f"the bank holds {totals.merchant_balance_fen} fen for the gateway, the "
                   f"gateway's books say {expected}")
