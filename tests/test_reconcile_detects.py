"""`hongbao reconcile` finds what it claims to check: one planted discrepancy per invariant.

Real books first: a bank simulator and a gateway take top-ups, balance-paid sends,
grabs and their credits, a withdrawal, a photo unlock and an envelope that expires.
The gateway is stopped, and each case copies its LMDB and changes the copy directly
(the way a bug or a bad restore would), keeping every account sum that the case is
not about intact, so that the check under test is the one that fires. The real CLI
must exit 1, print NOT BALANCED and name the discrepancy; the untouched copy passes.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hotpath
from gateway.client import Client
from gateway.domain import keys, records
from gateway.domain.store import Tx
from gateway.ledger import offline_write
from hongbao.v1 import envelope_pb2, moments_pb2, wallet_pb2
from tests.conftest import Stack

LUCKY = envelope_pb2.ENVELOPE_KIND_LUCKY
BALANCE = envelope_pb2.PAY_METHOD_BALANCE


async def _build(stack: Stack) -> dict:
    facts: dict = {}
    async with Client(stack.target) as c:
        alice, bob = stack.meta("alice"), stack.meta("bob")
        top = await c.wallet.TopUp(wallet_pb2.TopUpRequest(
            request_id="t1", card_id="icbc-1", amount_fen=100_000), metadata=alice, timeout=10)
        assert top.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED
        facts["topup"] = top.payment_id
        sent = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id="s1", total_fen=1_000, count=5, kind=LUCKY, pay_method=BALANCE),
            metadata=alice, timeout=10)
        facts["env"] = sent.envelope_id
        for u in ("g1", "g2", "g3"):
            r = await c.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=sent.envelope_id, request_id="g"), metadata=stack.meta(u), timeout=10)
            assert r.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED
        short = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id="s2", total_fen=300, count=3, kind=LUCKY, pay_method=BALANCE,
            expires_in_seconds=1), metadata=alice, timeout=10)
        facts["expired"] = short.envelope_id
        out = await c.wallet.Withdraw(wallet_pb2.WithdrawRequest(
            request_id="w1", card_id="icbc-1", amount_fen=2_000), metadata=alice, timeout=10)
        assert out.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED
        facts["withdrawal"] = out.payment_id
        unlock = await c.moments.UnlockPhoto(moments_pb2.UnlockPhotoRequest(
            request_id="u1", photo_id="p1", owner_id="alice"), metadata=bob, timeout=10)
        assert unlock.amount_fen > 0 and not unlock.free
        facts["unlock"] = unlock.payment_id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # the sweeper's refund and every credit
            env = await c.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
                envelope_id=short.envelope_id), metadata=alice, timeout=10)
            credited = [await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                  metadata=stack.meta(u), timeout=10)
                        for u in ("g1", "g2", "g3")]
            if (env.envelope.status == envelope_pb2.ENVELOPE_STATUS_EXPIRED
                    and all(b.pending_credit_fen == 0 and b.balance_fen for b in credited)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the short envelope did not expire, or credits did not land")
    return facts


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    root = tmp_path_factory.mktemp("books")
    stack = Stack(root)
    try:
        stack.bank.start()
        (root / "fast.toml").write_text("expiry_sweep_s = 0.2\n")
        stack.start_gateway("--config", str(root / "fast.toml"))
        # Bob pays for the photo unlock from his wallet.
        async def fund_bob():
            async with Client(stack.target) as c:
                await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                    request_id="tb", card_id="icbc-2", amount_fen=1_000),
                    metadata=stack.meta("bob"), timeout=10)
        asyncio.run(fund_bob())
        facts = asyncio.run(_build(stack))
        stack.gateway.stop()
        stack.gateway = None
        yield stack, facts
    finally:
        stack.stop()


def _reconcile(data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
                           str(data_dir), *extra], capture_output=True, text=True, timeout=120)


class Books:
    """Direct writes to a copy of the ledger: what a bug or a bad restore could leave."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx

    def balance(self, acct: bytes) -> int:
        raw = self.tx.get(keys.ACCOUNTS, acct)
        return 0 if raw is None else hotpath.unpack_i64(raw)

    def shift(self, acct: bytes, delta: int) -> None:
        self.tx.put(keys.ACCOUNTS, acct, hotpath.pack_i64(self.balance(acct) + delta))

    def transfer(self, tid: bytes) -> tuple:
        raw = self.tx.get(keys.TRANSFERS, tid)
        assert raw is not None, tid
        return hotpath.unpack_transfer(raw)

    def unmove(self, tid: bytes) -> None:
        """The transfer is gone and so is its effect: sums and replay stay consistent."""
        amount, _at, _kind, debit, credit, _ref = self.transfer(tid)
        self.tx.delete(keys.TRANSFERS, tid)
        self.shift(debit, amount)
        self.shift(credit, -amount)

    def move(self, tid: bytes, debit: bytes, credit: bytes, amount: int, like: bytes) -> None:
        """A new transfer with its effect (shaped like transfer ``like``)."""
        _a, at, kind, _d, _c, ref = self.transfer(like)
        self.tx.put(keys.TRANSFERS, tid, hotpath.pack_transfer(amount, at, kind, debit, credit,
                                                               ref))
        self.shift(debit, -amount)
        self.shift(credit, amount)

    def grab(self, env: bytes, user: bytes) -> tuple:
        return hotpath.unpack_grab(self.tx.get(keys.GRABS, keys.grab_key(env, user)))


def _plant(books_dir: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(books_dir, copy, ignore=shutil.ignore_patterns("*.port", "run"))
    with offline_write(copy) as tx:
        change(Books(tx))
    return copy


def _a_grabber(b: Books, env: bytes) -> bytes:
    for key, _raw in b.tx.scan(keys.GRABS, env + b"/"):
        return keys.split_grab_key(key)[1]
    raise AssertionError("no grab")


def _cases(f: dict):
    env, expired = f["env"].encode(), f["expired"].encode()
    topup, withdrawal = f["topup"].encode(), f["withdrawal"].encode()
    alice = keys.wallet_account(b"alice")

    def sum_not_zero(b):
        b.shift(alice, 1)

    def negative_wallet(b):
        b.move(b"t:test-neg", alice, keys.wallet_account(b"bob"), b.balance(alice) + 5,
               keys.card_in_tid(topup))

    def missing_transfer(b):
        b.tx.delete(keys.TRANSFERS, keys.card_in_tid(topup))

    def doubled_credit(b):
        user = _a_grabber(b, env)
        amount, _at, index, _flags, _d = b.grab(env, user)
        b.move(keys.credit_tid(env, index) + b"-again", keys.pending_account(user),
               keys.wallet_account(user), amount, keys.credit_tid(env, index))

    def escrow_off_its_shares(b):
        b.move(b"t:test-escrow", keys.escrow_account(env), alice, 1, keys.card_in_tid(topup))

    def shares_off_their_total(b):
        raw = b.tx.get(keys.ENVELOPES, env)   # the last share, a little-endian int32
        last = struct.unpack_from("<i", raw, len(raw) - 4)[0]
        b.tx.put(keys.ENVELOPES, env, raw[:-4] + struct.pack("<i", last + 1))

    def grab_without_transfer(b):
        user = _a_grabber(b, env)
        b.unmove(keys.grab_tid(env, b.grab(env, user)[2]))

    def credited_not_marked(b):
        user = _a_grabber(b, env)
        amount, at, index, flags, digest = b.grab(env, user)
        b.tx.put(keys.GRABS, keys.grab_key(env, user), hotpath.pack_grab(
            amount, at, index, flags & ~records.GRAB_CREDITED, digest))

    def payment_without_transfer(b):
        b.unmove(keys.card_in_tid(topup))

    def withdrawal_without_payout(b):
        b.unmove(keys.payout_tid(withdrawal))

    def unlock_without_transfer(b):
        b.unmove(keys.unlock_tid(f["unlock"].encode()))

    def expired_refund_short(b):
        b.unmove(keys.expiry_tid(expired))

    return [
        ("the sum over all accounts is zero", sum_not_zero, "accounts sum to 1 fen, not 0"),
        ("no wallet is negative", negative_wallet, "account w:alice is negative"),
        ("replaying the journal gives every balance", missing_transfer,
         "but its transfers give"),
        ("no grab is credited twice", doubled_credit, "pending credit of"),
        ("escrow holds exactly the unclaimed shares", escrow_off_its_shares,
         f"envelope {f['env']}: escrow"),
        ("shares make up the total", shares_off_their_total,
         f"envelope {f['env']}: unreadable record (envelope record has shares that do not "
         "sum to total_fen)"),
        ("every grab has its transfer", grab_without_transfer, "has no matching transfer"),
        ("credit and flag agree", credited_not_marked, "credited but not marked"),
        ("a settled payment has its transfer", payment_without_transfer,
         f"payment {f['topup']} succeeded without its transfer"),
        ("a withdrawal pays out exactly its amount", withdrawal_without_payout,
         f"withdrawal {f['withdrawal']} (SUCCEEDED) moved the wrong money"),
        ("a paid unlock has its transfer", unlock_without_transfer, "its transfer is missing"),
        ("an expired envelope returns exactly its rest", expired_refund_short,
         f"envelope {f['expired']}: expired with"),
    ]


CASE_NAMES = [c[0] for c in _cases({"env": "e", "expired": "x", "topup": "t", "withdrawal": "w",
                                    "unlock": "u"})]


def test_the_untouched_books_balance(books, tmp_path):
    stack, _facts = books
    copy = _plant(stack.data_dir, tmp_path, lambda b: None)
    done = _reconcile(copy, "--bank", stack.bank.target)
    assert done.returncode == 0 and "BALANCED: every fen is accounted for" in done.stdout, (
        done.stdout + done.stderr)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reconcile_detects(books, tmp_path, name):
    stack, facts = books
    (_n, change, expected), = [c for c in _cases(facts) if c[0] == name]
    copy = _plant(stack.data_dir, tmp_path, change)
    done = _reconcile(copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT BALANCED" in done.stdout
    assert expected in done.stdout, done.stdout


def test_reconcile_detects_a_bank_that_disagrees(books, tmp_path):
    """A settled withdrawal erased from the books (consistently): only the bank can tell."""
    stack, facts = books
    withdrawal = facts["withdrawal"].encode()

    def erase(b: Books) -> None:
        b.unmove(keys.payout_tid(withdrawal))
        b.unmove(keys.withdraw_hold_tid(withdrawal))
        b.tx.delete(keys.PAYMENTS, withdrawal)

    copy = _plant(stack.data_dir, tmp_path, erase)
    assert _reconcile(copy).returncode == 0   # the books alone are consistent
    done = _reconcile(copy, "--bank", stack.bank.target)
    assert done.returncode == 1 and "NOT BALANCED" in done.stdout
    assert "the bank holds" in done.stdout and "the gateway's books say" in done.stdout
