"""Check 6 of reconcile: the bank's merchant balance against the gateway's books."""

from __future__ import annotations

from typing import Protocol

from gateway.domain.audit import Report
from gateway.domain.model import PaymentKind
from gateway.payments.bank import DIRECT, BankTotals, OrderStatus


class BankView(Protocol):
    """What the cross-check asks a bank: the bank link, or the simulation's bank."""

    async def totals(self) -> BankTotals: ...

    async def query(self, order_id: str, channel: str = DIRECT) -> OrderStatus: ...


async def cross_check_bank(report: Report, bank: BankView) -> None:
    """Adds the bank's view to ``report``: what it holds for the gateway must equal what the
    gateway's clearing accounts say came in, plus in-flight payments the bank has settled
    (withdrawals count negative)."""
    totals = await bank.totals()
    settled_in_flight = 0
    expected_by_channel = dict(report.totals.get("channel_in_fen", {}))
    for item in report.in_flight:
        channel = item.get("channel", DIRECT)
        status = await bank.query(item["payment_id"], channel)
        item["bank_status"] = f"ORDER_STATUS_{status.name}"
        if status == OrderStatus.SETTLED:
            sign = -1 if item["kind"] == PaymentKind.WITHDRAW else 1
            settled_in_flight += sign * item["amount_fen"]
            expected_by_channel[channel] = (expected_by_channel.get(channel, 0)
                                            + sign * item["amount_fen"])
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
    if totals.channels:
        _per_channel(report, totals.channels, expected_by_channel)


def _per_channel(report: Report, bank: dict[str, int], books: dict[str, int]) -> None:
    """The same check per channel: what the bank took through each channel against the
    payments the gateway sent through it. A payment booked on the wrong channel, or sent
    through one and recorded with another, shows here even when the sum is right."""
    rows = {ch: {"merchant_balance_fen": bank.get(ch, 0), "expected_fen": books.get(ch, 0)}
            for ch in sorted(set(bank) | set(books))}
    assert report.bank is not None
    report.bank["channels"] = rows
    for ch, row in rows.items():
        if row["merchant_balance_fen"] != row["expected_fen"]:
            report.bad(f"through the {ch} channel the bank holds "
                       f"{row['merchant_balance_fen']} fen for the gateway, the gateway's "
                       f"books say {row['expected_fen']}")
