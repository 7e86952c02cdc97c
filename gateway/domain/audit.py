"""The conservation checks: proves the books balance, on one consistent snapshot.

``audit(tx)`` runs over one read transaction of any backend, so it can run
beside a live gateway. Checks:

1. the sum over all accounts is zero; no wallet, escrow or pending account is
   negative;
2. replaying the transfer journal gives every account's balance;
3. every envelope's shares sum to its total; its grabs hold distinct shares
   0..claimed-1 with the right amounts; its escrow holds exactly the
   unclaimed shares; an expired one returned exactly its unclaimed rest;
4. every grab is credited exactly once or waits on the credit outbox, and each
   user's pending credit is the sum of their uncredited grabs;
5. every payment is final or a known in-flight one, each settled one has its
   transfer, every withdrawal holds, pays out or returns exactly its amount,
   and each bank's clearing account equals what its settled payments say;
   every paid photo unlock has exactly one transfer, of its amount, from the
   viewer's wallet to the owner's (or, when the owner's wallet lives on another
   SET, to ``x:<that SET>``), and every unlock transfer has its unlock, but for
   the photo incomes another SET's unlocks sent here (``x:<from>`` -> a wallet).

A slot handoff (``rules.export_slots`` / ``rules.import_slots``) keeps these checks
exact on both SETs: the old owner keeps its journal, the moved users' final payments and
paid unlock records (they are what its clearing accounts and unlock transfers are tied to)
and sends the money through ``x:<new owner>``; the new owner checks what it imported
(envelopes and grabs flagged imported, payment and unlock records marked imported)
against the escrow and shares it received, not against its own journal, which does not
hold their old transfers. An imported payment must be final. On the old owner a moved
user's wallet and a moved envelope's escrow stay at zero and the envelope stays gone.

In cluster mode each SET balances on its own: the ``x:<set>`` accounts carry
what crossed to or from each other SET (grab shares and photo incomes alike),
reported as ``totals["interset_fen"]``; summed over the SETs' reports they are
the credits still in flight, zero once all have landed.

The bank cross-check (check 6) needs the bank and lives with the bank link's
users (``gateway.ops.reconcile``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import hotpath
from gateway.domain import keys, records
from gateway.domain.model import EnvelopeStatus, Payment, PaymentKind, PaymentStatus, TxKind
from gateway.domain.store import Tx, scan_prefix


@dataclasses.dataclass
class Report:
    totals: dict = dataclasses.field(default_factory=dict)
    discrepancies: list[str] = dataclasses.field(default_factory=list)
    in_flight: list[dict] = dataclasses.field(default_factory=list)
    bank: dict | None = None

    @property
    def balanced(self) -> bool:
        return not self.discrepancies

    def bad(self, what: str) -> None:
        self.discrepancies.append(what)

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
            f"photo unlocks   {t.get('unlocks', 0):>12}   paid {t.get('unlock_fen', 0)} fen",
        ]
        if self.bank is not None:
            lines.append(f"bank merchant   {self.bank['merchant_balance_fen']:>12} fen   "
                         f"(expected {self.bank['expected_fen']})")
            lines.extend(f"  via {ch:<11} {row['merchant_balance_fen']:>12} fen   "
                         f"(expected {row['expected_fen']})"
                         for ch, row in self.bank.get("channels", {}).items())
        if self.balanced:
            lines.append("BALANCED: every fen is accounted for")
        else:
            lines.append(f"NOT BALANCED: {len(self.discrepancies)} discrepancies")
            lines.extend(f"  - {d}" for d in self.discrepancies[:50])
        return "\n".join(lines)


@dataclasses.dataclass
class _Snapshot:
    """Everything the checks read, taken from one transaction."""

    accounts: dict[bytes, int]
    replay: dict[bytes, int]  # account -> balance by replaying the transfers
    transfers: dict[bytes, int]  # transfer id -> amount
    grabs_by_env: dict[bytes, list[tuple[bytes, tuple]]]
    outbox: set[bytes]  # grab keys waiting on the credit outbox
    envelopes: list[tuple[bytes, bytes]]
    payments: list[Payment]
    imported_payments: list[Payment]  # carried here by a slot handoff; booked elsewhere
    # Paid photo unlocks (unlock tid -> amount, viewer's wallet, owner's wallet or x:<home>)
    # as the unlock records say, and the unlock transfers as the journal says (same shape).
    unlocks: dict[bytes, tuple[int, bytes, bytes]]
    unlock_moves: dict[bytes, tuple[int, bytes, bytes]]
    # Photo incomes other SETs' unlocks sent here: unlock tid -> (amount, x:<from>, wallet).
    photo_credits_in: dict[bytes, tuple[int, bytes, bytes]]
    flows: dict[str, int]


_SIDES = ((keys.WALLET, "wallet"), (keys.PENDING, "pending"), (keys.ESCROW, "escrow"),
          (keys.CLEARING, "clearing"), (keys.HOLD, "hold"), (keys.INTERSET, "interset"))


def _flow(kind: int, debit: bytes, credit: bytes) -> str:
    """A transfer's flow: ``<kind>:<from>-><to>``, the accounts by type (wallet, pending,
    escrow, clearing, hold, interset), e.g. ``envelope_sent:clearing->escrow`` for a
    card-paid send."""
    def side(acct: bytes) -> str:
        return next((name for prefix, name in _SIDES if acct.startswith(prefix)), "other")
    name = TxKind(kind).name.lower() if kind in TxKind._value2member_map_ else f"kind_{kind}"
    return f"{name}:{side(debit)}->{side(credit)}"


def _read(tx: Tx) -> _Snapshot:
    accounts = {k: hotpath.unpack_i64(v) for k, v in tx.scan(keys.ACCOUNTS)}
    replay: dict[bytes, int] = defaultdict(int)
    transfers: dict[bytes, int] = {}
    unlock_moves: dict[bytes, tuple[int, bytes, bytes]] = {}
    photo_credits_in: dict[bytes, tuple[int, bytes, bytes]] = {}
    flows: dict[str, int] = defaultdict(int)
    for tid, raw in tx.scan(keys.TRANSFERS):
        amount, _at, kind, debit, credit, _ref = hotpath.unpack_transfer(raw)
        flows[_flow(kind, debit, credit)] += amount
        replay[debit] -= amount
        replay[credit] += amount
        transfers[tid] = amount
        if tid.startswith(keys.UNLOCK_TID):
            # The receiving half of another SET's unlock starts from inter-SET clearing;
            # an unlock of this SET starts from the viewer's wallet.
            into = photo_credits_in if debit.startswith(keys.INTERSET) else unlock_moves
            into[tid] = (amount, debit, credit)
    grabs_by_env: dict[bytes, list[tuple[bytes, tuple]]] = defaultdict(list)
    for key, raw in tx.scan(keys.GRABS):
        env, user = keys.split_grab_key(key)
        grabs_by_env[env].append((user, hotpath.unpack_grab(raw)))
    payments: tuple[list[Payment], list[Payment]] = ([], [])
    for _k, raw in tx.scan(keys.PAYMENTS):
        payments[records.payment_imported(raw)].append(records.unpack_payment(raw)[0])
    return _Snapshot(
        accounts, replay, transfers, grabs_by_env,
        {gkey for _seq, gkey in tx.scan(keys.CREDIT_OUTBOX)},
        list(tx.scan(keys.ENVELOPES)), payments[0], payments[1],
        _read_unlocks(tx), unlock_moves, photo_credits_in, dict(sorted(flows.items())))


def _read_unlocks(tx: Tx) -> dict[bytes, tuple[int, bytes, bytes]]:
    out: dict[bytes, tuple[int, bytes, bytes]] = {}
    for key, raw in scan_prefix(tx, keys.IDEM, keys.UNLOCK_IDEM):
        if records.unlock_imported(raw):
            continue  # its transfer is in the old owner's journal
        viewer, _rid = keys.split_unlock_idem_key(key)
        _fp, result, owner_id, _photo = records.unpack_unlock(raw)
        home = records.unlock_home(raw)
        to = (keys.wallet_account(owner_id.encode()) if home is None
              else keys.interset_account(home.encode()))
        out[keys.unlock_tid(result.payment_id.encode())] = (
            result.amount_fen, keys.wallet_account(viewer), to)
    return out


def audit(tx: Tx) -> Report:
    """Checks 1-5 on one snapshot of the books."""
    r = Report()
    s = _read(tx)
    total = _check_accounts(r, s)
    pending_expected, totals = _check_envelopes(r, s)
    pending_fen = _check_pending(r, s, pending_expected)
    clearing_in, channel_in = _check_payments(r, s)
    unlock_fen = _check_unlocks(r, s)
    accounts = s.accounts
    r.totals = {
        "accounts": len(accounts), "account_sum_fen": total, "transfers": len(s.transfers),
        "envelopes": len(s.envelopes), **totals, "pending_fen": pending_fen,
        "wallet_fen": sum(v for k, v in accounts.items() if k.startswith(keys.WALLET)),
        "clearing_in_fen": sum(clearing_in.values()), "payments": len(s.payments),
        "channel_in_fen": dict(sorted(channel_in.items())),
        "payments_imported": len(s.imported_payments),
        "payments_by_status": _by_status(s.payments),
        "unlocks": len(s.unlocks), "unlock_fen": unlock_fen,
        "photo_credits_in": len(s.photo_credits_in),
        "photo_credits_in_fen": sum(m[0] for m in s.photo_credits_in.values()),
        "interset_fen": {k[len(keys.INTERSET):].decode(): v for k, v in accounts.items()
                         if k.startswith(keys.INTERSET)},
        "remote_credits_waiting": _check_remote_outbox(r, tx, s),
        # Money moved, by flow (see _flow): where every yuan went, from the journal.
        "flows_fen": s.flows,
        **_check_moved(r, tx, s),
    }
    return r


def _check_moved(r: Report, tx: Tx, s: _Snapshot) -> dict[str, int]:
    """A user or envelope this SET handed off (its MOVED marker) holds no money here and an
    envelope is gone: money reaching either afterwards must go on to the new owner."""
    counts = {"moved_users": 0, "moved_envelopes": 0}
    for key, raw in tx.scan(keys.MOVED):
        what, name = key[:1], key[2:]
        if what == b"m":
            continue
        move_id, to_set = (part.decode() for part in raw.split(b"\0", 1))
        is_user = what == b"u"
        counts["moved_users" if is_user else "moved_envelopes"] += 1
        acct = keys.wallet_account(name) if is_user else keys.escrow_account(name)
        if s.accounts.get(acct, 0):
            r.bad(f"{acct.decode()} holds {s.accounts[acct]} fen here, but move {move_id} "
                  f"took it to SET {to_set}")
        if not is_user and tx.get(keys.ENVELOPES, name) is not None:
            r.bad(f"envelope {name.decode()} is still here, but move {move_id} took it to "
                  f"SET {to_set}")
    return {**counts, "migration_chunks_waiting": tx.count(keys.MIGRATE_OUTBOX)}


def _check_remote_outbox(r: Report, tx: Tx, s: _Snapshot) -> int:
    """Each credit waiting for the relay was booked, with its amount, when it was queued."""
    waiting = 0
    for key, raw in tx.scan(keys.XCREDIT_OUTBOX):
        c = records.unpack_xcredit(keys.unbe64(key), raw)
        if s.transfers.get(c.transfer_id.encode()) != c.amount_fen:
            r.bad(f"credit {c.transfer_id} for {c.user_id} on SET {c.home} waits for the relay "
                  f"but was not booked for {c.amount_fen} fen")
        waiting += 1
    return waiting


def _by_status(payments: list[Payment]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for p in payments:
        counts[f"{p.kind}/{p.status.name}"] += 1
    return dict(counts)


def _check_accounts(r: Report, s: _Snapshot) -> int:
    """Checks 1 and 2."""
    total = sum(s.accounts.values())
    if total != 0:
        r.bad(f"accounts sum to {total} fen, not 0")
    for acct, bal in s.accounts.items():
        if bal < 0 and not keys.may_go_negative(acct):
            r.bad(f"account {acct.decode()} is negative: {bal}")
        if s.replay.get(acct, 0) != bal:
            r.bad(f"account {acct.decode()} holds {bal} but its transfers give "
                  f"{s.replay.get(acct)}")
    for acct in s.replay.keys() - s.accounts.keys():
        if s.replay[acct]:
            r.bad(f"transfers move money through unknown account {acct.decode()}")
    return total


def _check_envelopes(r: Report, s: _Snapshot) -> tuple[dict[bytes, int], dict[str, int]]:
    """Checks 3 and 4 (per grab); returns each user's expected pending credit."""
    pending_expected: dict[bytes, int] = defaultdict(int)
    totals = {"escrow_fen": 0, "grabs": 0, "uncredited": 0}
    for env, buf in s.envelopes:
        held = s.grabs_by_env.pop(env, [])
        try:
            _check_envelope(r, s, env, buf, totals)
        except ValueError as exc:  # the record's own checks refuse it: report, go on
            r.bad(f"envelope {env.decode()}: unreadable record ({exc})")
            continue
        claimed = hotpath.envelope_header(buf)[5]
        totals["grabs"] += len(held)
        if sorted(g[1][2] for g in held) != list(range(claimed)):
            r.bad(f"envelope {env.decode()}: {len(held)} grabs for {claimed} claimed shares")
        shares = hotpath.unpack_envelope(buf)[9]
        for user, grab in held:
            if _check_grab(r, s, env, user, grab, shares):
                totals["uncredited"] += 1
                pending_expected[user] += grab[0]
    for env in s.grabs_by_env:
        r.bad(f"grabs of unknown envelope {env.decode()}")
    return pending_expected, totals


def _check_envelope(r: Report, s: _Snapshot, env: bytes, buf: bytes, totals: dict) -> None:
    name = env.decode()
    (env_total, remaining_fen, _c, _e, count, claimed, _kind, status, flags,
     shares) = hotpath.unpack_envelope(buf)
    if sum(shares) != env_total or len(shares) != count:
        r.bad(f"envelope {name}: shares do not make up its total")
    live = status in (EnvelopeStatus.ACTIVE, EnvelopeStatus.SOLD_OUT)
    unclaimed = sum(shares[claimed:]) if live else 0
    escrow = s.accounts.get(keys.escrow_account(env), 0)
    totals["escrow_fen"] += escrow
    if escrow != unclaimed or (live and remaining_fen != unclaimed):
        r.bad(f"envelope {name}: escrow {escrow}, remaining {remaining_fen}, "
              f"unclaimed shares {unclaimed}")
    # An imported envelope that expired before its move returned its rest on the old owner.
    expired_here = not (flags & records.ENV_IMPORTED) or keys.expiry_tid(env) in s.transfers
    if status == EnvelopeStatus.EXPIRED and expired_here:
        returned = s.transfers.get(keys.expiry_tid(env), 0)
        if returned != sum(shares[claimed:]):
            r.bad(f"envelope {name}: expired with {sum(shares[claimed:])} unclaimed, "
                  f"{returned} returned to the sender")


def _check_grab(r: Report, s: _Snapshot, env: bytes, user: bytes, grab: tuple,
                shares: list[int]) -> bool:
    """One grab against its share and its transfers; True if it is still uncredited."""
    amount, _at, index, flags, _digest = grab
    name = env.decode()
    if index < len(shares) and shares[index] != amount:
        r.bad(f"envelope {name}: {user.decode()} holds {amount}, share is {shares[index]}")
    if flags & records.GRAB_IMPORTED:
        # Booked and credited on the old owner (an export credits every grab first).
        if not flags & records.GRAB_CREDITED:
            r.bad(f"grab {keys.grab_key(env, user).decode()} was imported uncredited")
        return False
    if s.transfers.get(keys.grab_tid(env, index)) != amount:
        r.bad(f"envelope {name}: grab of share {index} has no matching transfer")
    credit_tid = keys.credit_tid(env, index)
    gkey = keys.grab_key(env, user)
    if flags & records.GRAB_CREDITED:
        if s.transfers.get(credit_tid) != amount:
            r.bad(f"grab {gkey.decode()} marked credited without its credit")
        return False
    if credit_tid in s.transfers:
        r.bad(f"grab {gkey.decode()} credited but not marked")
    if gkey not in s.outbox:
        r.bad(f"grab {gkey.decode()} is neither credited nor on the credit bus")
    return True


def _check_pending(r: Report, s: _Snapshot, expected: dict[bytes, int]) -> int:
    pending_fen = 0
    for acct, bal in s.accounts.items():
        if acct.startswith(keys.PENDING):
            user = acct[len(keys.PENDING):]
            pending_fen += bal
            if bal != expected.get(user, 0):
                r.bad(f"pending credit of {user.decode()} is {bal}, uncredited grabs "
                      f"sum to {expected.get(user, 0)}")
    return pending_fen


def _check_payments(r: Report, s: _Snapshot) -> tuple[dict[str, int], dict[str, int]]:
    """Check 5; returns the money settled payments brought in, per bank and per channel."""
    clearing_in: dict[str, int] = defaultdict(int)
    channel_in: dict[str, int] = defaultdict(int)
    in_flight_holds: set[bytes] = set()
    for p in s.imported_payments:
        if p.open:
            r.bad(f"payment {p.payment_id} was imported {p.status.name}, not final")
    for p in s.payments:
        if p.open:
            r.in_flight.append({"payment_id": p.payment_id, "bank_id": p.bank_id,
                                "channel": p.channel, "kind": str(p.kind),
                                "amount_fen": p.amount_fen, "status": p.status.name})
        if p.kind == PaymentKind.WITHDRAW:
            paid_out = _check_withdrawal(r, s, p, in_flight_holds)
            clearing_in[p.bank_id] -= paid_out
            channel_in[p.channel] -= paid_out
        elif p.status == PaymentStatus.SUCCEEDED:
            clearing_in[p.bank_id] += p.amount_fen
            channel_in[p.channel] += p.amount_fen
            if s.transfers.get(keys.card_in_tid(p.payment_id.encode())) != p.amount_fen:
                r.bad(f"payment {p.payment_id} succeeded without its transfer")
        elif keys.card_in_tid(p.payment_id.encode()) in s.transfers:
            r.bad(f"payment {p.payment_id} is {p.status.name} but moved money")
    for acct, bal in s.accounts.items():
        if acct.startswith(keys.HOLD) and bal and acct not in in_flight_holds:
            r.bad(f"{acct.decode()} holds {bal} fen for a finished withdrawal")
        if acct.startswith(keys.CLEARING):
            bank = acct[len(keys.CLEARING):].decode()
            if -bal != clearing_in.get(bank, 0):
                r.bad(f"bank clearing {acct.decode()} is {bal}, settled payments say "
                      f"{-clearing_in.get(bank, 0)}")
    return clearing_in, channel_in


def _check_withdrawal(r: Report, s: _Snapshot, p: Payment, in_flight_holds: set[bytes]
                      ) -> int:
    """A withdrawal's hold, payout or reversal; returns what it paid out (0 unless settled)."""
    pid = p.payment_id.encode()

    def moved(tid: bytes) -> bool:
        return s.transfers.get(tid) == p.amount_fen

    if not moved(keys.withdraw_hold_tid(pid)):
        r.bad(f"withdrawal {p.payment_id} has no hold transfer")
    paid_out = 0
    if p.status == PaymentStatus.SUCCEEDED:
        paid_out = p.amount_fen
        ok = moved(keys.payout_tid(pid)) and keys.reversal_tid(pid) not in s.transfers
    elif p.open:
        in_flight_holds.add(keys.hold_account(pid))
        ok = s.accounts.get(keys.hold_account(pid)) == p.amount_fen
    else:
        ok = moved(keys.reversal_tid(pid)) and keys.payout_tid(pid) not in s.transfers
    if not ok:
        r.bad(f"withdrawal {p.payment_id} ({p.status.name}) moved the wrong money")
    return paid_out


def _check_unlocks(r: Report, s: _Snapshot) -> int:
    """Check 5, photo unlocks: record and transfer agree; returns the fen they moved."""
    def text(move: tuple[int, bytes, bytes]) -> str:
        return f"{move[0]} fen from {move[1].decode()} to {move[2].decode()}"

    for tid, expected in s.unlocks.items():
        moved = s.unlock_moves.get(tid)
        if moved != expected:
            r.bad(f"photo unlock {tid.decode()} should move {text(expected)}; its transfer "
                  f"{'is missing' if moved is None else 'moves ' + text(moved)}")
    for tid in s.unlock_moves.keys() - s.unlocks.keys():
        r.bad(f"transfer {tid.decode()} belongs to no photo unlock")
    for tid, move in s.photo_credits_in.items():
        if not move[2].startswith(keys.WALLET):
            r.bad(f"photo income {tid.decode()} from another SET should reach a wallet; "
                  f"it moves {text(move)}")
    return sum(amount for amount, _debit, _credit in s.unlocks.values())
