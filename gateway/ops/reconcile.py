"""Proves the books balance, and that they agree with the bank.

Everything is read in one LMDB read transaction, a consistent snapshot, so
reconcile can run beside a live gateway. Checks:

1. the sum over all accounts is zero; no wallet, escrow or pending account is
   negative;
2. replaying the transfer journal gives every account's balance;
3. every envelope's shares sum to its total; its grabs hold distinct shares
   0..claimed-1 with the right amounts; its escrow holds exactly the
   unclaimed shares;
4. every grab is credited exactly once or waits on the credit bus, and each
   user's pending credit is the sum of their uncredited grabs;
5. every payment is final or a known in-flight one, and each settled top-up
   has its transfer;
6. with a bank: the money the bank says the gateway took in (its merchant
   balance) equals what the gateway's clearing accounts say came in, plus
   in-flight payments the bank has settled (withdrawals count negative);
7. every withdrawal holds, pays out or returns exactly its amount.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import hotpath
from gateway.ledger import ENV_ACTIVE, ENV_EXPIRED, ENV_SOLD_OUT, PaymentStatus
from gateway.ledger._lmdb import _CREDITED, LmdbLedger, _decode_payment


@dataclasses.dataclass
class Report:
    totals: dict = dataclasses.field(default_factory=dict)
    discrepancies: list[str] = dataclasses.field(default_factory=list)
    in_flight: list[dict] = dataclasses.field(default_factory=list)
    bank: dict | None = None

    @property
    def balanced(self) -> bool:
        return not self.discrepancies

    def to_json(self) -> str:
        return json.dumps({"balanced": self.balanced, "totals": self.totals,
                           "discrepancies": self.discrepancies, "in_flight": self.in_flight,
                           "bank": self.bank}, indent=2, sort_keys=True)

    def to_text(self) -> str:
        t = self.totals
        lines = [
            f"accounts        {t.get('accounts', 0):>12}   sum {t.get('account_sum_fen', 0)} fen",
            f"transfers       {t.get('transfers', 0):>12}",
            f"envelopes       {t.get('envelopes', 0):>12}   escrow {t.get('escrow_fen', 0)} fen",
            f"grabs           {t.get('grabs', 0):>12}   uncredited {t.get('uncredited', 0)}",
            f"wallets         {t.get('wallet_fen', 0):>12} fen   pending "
            f"{t.get('pending_fen', 0)} fen",
            f"bank money in   {t.get('clearing_in_fen', 0):>12} fen",
            f"payments        {t.get('payments', 0):>12}   in flight {len(self.in_flight)}",
        ]
        if self.bank is not None:
            lines.append(f"bank merchant   {self.bank['merchant_balance_fen']:>12} fen   "
                         f"(expected {self.bank['expected_fen']})")
        if self.balanced:
            lines.append("BALANCED: every fen is accounted for")
        else:
            lines.append(f"NOT BALANCED: {len(self.discrepancies)} discrepancies")
            lines.extend(f"  - {d}" for d in self.discrepancies[:50])
        return "\n".join(lines)


def audit(ledger: LmdbLedger) -> Report:
    """Checks 1-5 on one snapshot of the ledger."""
    r = Report()
    bad = r.discrepancies.append
    dbs = ledger.dbs
    with ledger.env.begin() as txn:
        accounts = {k: hotpath.unpack_i64(v) for k, v in txn.cursor(db=dbs["accounts"])}
        replay: dict[bytes, int] = defaultdict(int)
        transfers: dict[bytes, int] = {}
        for tid, raw in txn.cursor(db=dbs["transfers"]):
            amount, _at, _kind, debit, credit, _ref = hotpath.unpack_transfer(raw)
            replay[debit] -= amount
            replay[credit] += amount
            transfers[tid] = amount
        grabs_by_env: dict[bytes, list[tuple[bytes, tuple]]] = defaultdict(list)
        for key, raw in txn.cursor(db=dbs["grabs"]):
            env, user = key.split(b"/", 1)
            grabs_by_env[env].append((user, hotpath.unpack_grab(raw)))
        bus_credit = {gkey for _seq, gkey in txn.cursor(db=dbs["bus:credit"])}
        envelopes = list(txn.cursor(db=dbs["envelopes"]))
        payments = [_decode_payment(raw)[0] for _k, raw in txn.cursor(db=dbs["payments"])]

    total = sum(accounts.values())
    if total != 0:
        bad(f"accounts sum to {total} fen, not 0")
    for acct, bal in accounts.items():
        if bal < 0 and not acct.startswith(b"c:"):
            bad(f"account {acct.decode()} is negative: {bal}")
        if replay.get(acct, 0) != bal:
            bad(f"account {acct.decode()} holds {bal} but its transfers give {replay.get(acct)}")
    for acct in replay.keys() - accounts.keys():
        if replay[acct]:
            bad(f"transfers move money through unknown account {acct.decode()}")

    pending_expected: dict[bytes, int] = defaultdict(int)
    escrow_fen = uncredited = grabs = 0
    for env, buf in envelopes:
        name = env.decode()
        (env_total, remaining_fen, _c, _e, count, claimed, _kind, status, _f,
         shares) = hotpath.unpack_envelope(buf)
        if sum(shares) != env_total or len(shares) != count:
            bad(f"envelope {name}: shares do not make up its total")
        live = status in (ENV_ACTIVE, ENV_SOLD_OUT)
        unclaimed = sum(shares[claimed:]) if live else 0
        escrow = accounts.get(b"e:" + env, 0)
        escrow_fen += escrow
        if escrow != unclaimed or (live and remaining_fen != unclaimed):
            bad(f"envelope {name}: escrow {escrow}, remaining {remaining_fen}, "
                f"unclaimed shares {unclaimed}")
        if status == ENV_EXPIRED:
            returned = transfers.get(b"x:" + env, 0)
            if returned != sum(shares[claimed:]):
                bad(f"envelope {name}: expired with {sum(shares[claimed:])} unclaimed, "
                    f"{returned} returned to the sender")
        held = grabs_by_env.pop(env, [])
        grabs += len(held)
        if sorted(g[1][2] for g in held) != list(range(claimed)):
            bad(f"envelope {name}: {len(held)} grabs for {claimed} claimed shares")
        for user, (amount, _at, index, flags, _d) in held:
            if index < count and shares[index] != amount:
                bad(f"envelope {name}: {user.decode()} holds {amount}, share is "
                    f"{shares[index]}")
            if transfers.get(b"g:" + env + b":" + str(index).encode()) != amount:
                bad(f"envelope {name}: grab of share {index} has no matching transfer")
            credit_tid = b"c:" + env + b":" + str(index).encode()
            gkey = env + b"/" + user
            if flags & _CREDITED:
                if transfers.get(credit_tid) != amount:
                    bad(f"grab {gkey.decode()} marked credited without its credit")
            else:
                uncredited += 1
                pending_expected[user] += amount
                if credit_tid in transfers:
                    bad(f"grab {gkey.decode()} credited but not marked")
                if gkey not in bus_credit:
                    bad(f"grab {gkey.decode()} is neither credited nor on the credit bus")
    for env in grabs_by_env:
        bad(f"grabs of unknown envelope {env.decode()}")
    pending_fen = 0
    for acct, bal in accounts.items():
        if acct.startswith(b"p:"):
            pending_fen += bal
            if bal != pending_expected.get(acct[2:], 0):
                bad(f"pending credit of {acct[2:].decode()} is {bal}, uncredited grabs "
                    f"sum to {pending_expected.get(acct[2:], 0)}")

    clearing_in: dict[str, int] = defaultdict(int)
    in_flight_holds: set[bytes] = set()
    for p in payments:
        pid = p.payment_id.encode()
        amount = p.amount_fen

        def moved(prefix: bytes, pid=pid, amount=amount) -> bool:
            return transfers.get(prefix + pid) == amount

        open_ = p.status in (PaymentStatus.PENDING, PaymentStatus.UNKNOWN)
        if open_:
            r.in_flight.append({"payment_id": p.payment_id, "bank_id": p.bank_id,
                                "kind": p.kind, "amount_fen": amount,
                                "status": p.status.name})
        if p.kind == "withdraw":
            if not moved(b"w:"):
                bad(f"withdrawal {p.payment_id} has no hold transfer")
            if p.status == PaymentStatus.SUCCEEDED:
                clearing_in[p.bank_id] -= amount
                ok = moved(b"o:") and b"r:" + pid not in transfers
            elif open_:
                in_flight_holds.add(b"h:" + pid)
                ok = accounts.get(b"h:" + pid) == amount
            else:
                ok = moved(b"r:") and b"o:" + pid not in transfers
            if not ok:
                bad(f"withdrawal {p.payment_id} ({p.status.name}) moved the wrong money")
        elif p.status == PaymentStatus.SUCCEEDED:
            clearing_in[p.bank_id] += amount
            if not moved(b"t:"):
                bad(f"payment {p.payment_id} succeeded without its transfer")
        elif b"t:" + pid in transfers:
            bad(f"payment {p.payment_id} is {p.status.name} but moved money")
    for acct, bal in accounts.items():
        if acct.startswith(b"h:") and bal and acct not in in_flight_holds:
            bad(f"{acct.decode()} holds {bal} fen for a finished withdrawal")
    for acct, bal in accounts.items():
        if acct.startswith(b"c:") and -bal != clearing_in.get(acct[2:].decode(), 0):
            bad(f"bank clearing {acct.decode()} is {bal}, settled payments say "
                f"{-clearing_in.get(acct[2:].decode(), 0)}")

    r.totals = {
        "accounts": len(accounts), "account_sum_fen": total, "transfers": len(transfers),
        "envelopes": len(envelopes), "escrow_fen": escrow_fen, "grabs": grabs,
        "uncredited": uncredited, "pending_fen": pending_fen,
        "wallet_fen": sum(v for k, v in accounts.items() if k.startswith(b"w:")),
        "clearing_in_fen": sum(clearing_in.values()), "payments": len(payments),
        "payments_by_status": {
            f"{kind}/{status.name}": sum(1 for p in payments
                                         if p.kind == kind and p.status == status)
            for kind in ("top_up", "withdraw", "envelope") for status in PaymentStatus
            if any(p.kind == kind and p.status == status for p in payments)},
    }
    return r


async def cross_check_bank(report: Report, bank) -> None:
    """Check 6: the bank's merchant balance against the gateway's books."""
    from banksim.v1 import bank_pb2

    stats = await bank.stats()
    settled_in_flight = 0
    for item in report.in_flight:
        answer = await bank.query(item["payment_id"])
        item["bank_status"] = bank_pb2.OrderStatus.Name(answer.status)
        if answer.status == bank_pb2.ORDER_STATUS_SETTLED:
            sign = -1 if item["kind"] == "withdraw" else 1
            settled_in_flight += sign * item["amount_fen"]
    expected = report.totals["clearing_in_fen"] + settled_in_flight
    report.bank = {
        "merchant_balance_fen": stats.merchant_balance_fen, "expected_fen": expected,
        "total_debited_fen": stats.total_debited_fen,
        "total_credited_fen": stats.total_credited_fen,
        "total_refunded_fen": stats.total_refunded_fen,
        "settled_in_flight_fen": settled_in_flight,
    }
    if stats.merchant_balance_fen != expected:
        report.discrepancies.append(
            f"the bank holds {stats.merchant_balance_fen} fen for the gateway, the gateway's "
            f"books say {expected}")


