"""A hypothesis state machine: the ledger against a plain model of wallets, envelopes, grabs
and card payments.

Rules fund wallets, send envelopes from them, grab (new and retried), apply credits, advance
an injected clock and sweep expired envelopes; and card payments (top-ups, withdrawals,
card-paid envelopes): an intent saved, the bank's answer left unclear, finished by the
request handler (from PENDING) or by the resolver (from UNKNOWN) as succeeded, failed or
refunded, and finished again, which must change nothing. With the memory backend (fast, so
many steps) and the LMDB one (real files). After every step the ledger's balances must equal
the model's, to the fen, and the audit must balance.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hotpath
from gateway import errors
from gateway.domain.audit import audit
from gateway.domain.keys import payment_id_for
from gateway.domain.model import (
    CardEnvelope,
    EnvelopeKind,
    GrabOutcome,
    Payment,
    PaymentKind,
    PaymentStatus,
)
from gateway.ledger import LmdbLedger, MemoryLedger
from tests.test_ledger import _top_up

PENDING, UNKNOWN = PaymentStatus.PENDING, PaymentStatus.UNKNOWN

USERS = [f"m{i}" for i in range(5)]
_ids = itertools.count()


class LedgerModel(RuleBasedStateMachine):
    backend = "memory"

    @initialize()
    def start(self) -> None:
        self.now = [1_900_000_000_000]
        clock = lambda: self.now[0]  # noqa: E731
        if self.backend == "lmdb":
            self.tmp = tempfile.TemporaryDirectory()
            self.led = LmdbLedger(self.tmp.name, clock_ms=clock, durable=False)
        else:
            self.led = MemoryLedger(clock_ms=clock)
        self.loop = asyncio.new_event_loop()
        self.wallet = dict.fromkeys(USERS, 0)     # the model: balance
        self.pending = dict.fromkeys(USERS, 0)    # ... and credit on its way
        self.envelopes: dict[str, dict] = {}      # id -> sender, shares left, expiry, grabbed
        self.payments: dict[str, dict] = {}       # id -> user, kind, amount, status, envelope

    def teardown(self) -> None:
        self.led.close()
        self.loop.close()
        if self.backend == "lmdb":
            self.tmp.cleanup()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 50_000))
    def fund(self, user, amount):
        p, _ = self.run(self.led.begin_payment(_top_up(user, f"t{next(_ids)}", amount),
                                               b"f" * 16, 60_000))
        self.run(self.led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED))
        self.wallet[user] += amount

    @rule(user=st.sampled_from(USERS), count=st.integers(1, 8), total=st.integers(8, 5_000),
          expires_s=st.integers(1, 30), seed=st.binary(min_size=1, max_size=8))
    def send(self, user, count, total, expires_s, seed):
        # Seeded, so a replayed case splits the same way (hypothesis replays to shrink).
        shares = hotpath.split_lucky(total, count, seed=seed)
        try:
            r = self.run(self.led.send_from_balance(
                user, f"s{next(_ids)}", b"x" * 16, total_fen=total, count=count,
                kind=EnvelopeKind.LUCKY, greeting="", expires_in_s=expires_s, shares=shares))
        except errors.FailedPrecondition as err:
            assert err.reason == "INSUFFICIENT_BALANCE" and self.wallet[user] < total
            return
        self.wallet[user] -= total
        self.envelopes[r.envelope_id] = {"sender": user, "left": list(shares),
                                         "expires": self.now[0] + expires_s * 1000,
                                         "grabbed": {}, "expired": False}

    @precondition(lambda self: self.envelopes)
    @rule(data=st.data(), user=st.sampled_from(USERS))
    def grab(self, data, user):
        env_id = data.draw(st.sampled_from(list(self.envelopes)))  # in the order sent
        e = self.envelopes[env_id]
        if e.get("card") in ("paying", "failed"):   # a card-paid envelope not paid for
            try:
                self.run(self.led.grab(user, env_id, "g"))
            except errors.FailedPrecondition:
                return
            raise AssertionError(f"grabbed {env_id}, a card envelope that is {e['card']}")
        r = self.run(self.led.grab(user, env_id, "g"))
        if user in e["grabbed"]:
            assert (r.outcome, r.amount_fen) == (GrabOutcome.GRABBED, e["grabbed"][user])
        elif not e["left"] and not e["expired"]:   # sold out answers before expired
            assert r.outcome == GrabOutcome.SOLD_OUT
        elif e["expired"] or self.now[0] >= e["expires"]:
            assert r.outcome == GrabOutcome.EXPIRED
        else:
            assert r.outcome == GrabOutcome.GRABBED and r.amount_fen == e["left"].pop(0)
            e["grabbed"][user] = r.amount_fen
            self.pending[user] += r.amount_fen

    @rule()
    def credit(self):
        while self.run(self.led.apply_credits(1_000)):
            pass
        for u in USERS:
            self.wallet[u] += self.pending[u]
            self.pending[u] = 0

    @rule(ms=st.integers(1, 20_000))
    def tick_and_sweep(self, ms):
        self.now[0] += ms
        self.run(self.led.expire_due(1_000))
        for e in self.envelopes.values():
            if e.get("card") in ("paying", "failed"):
                continue
            if not e["expired"] and e["left"] and self.now[0] >= e["expires"]:
                e["expired"] = True
                self.wallet[e["sender"]] += sum(e["left"])
                e["left"] = []

    # -- card payments -------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS), kind=st.sampled_from(list(PaymentKind)),
          amount=st.integers(1, 20_000), count=st.integers(1, 5), expires_s=st.integers(1, 30))
    def begin_card_payment(self, user, kind, amount, count, expires_s):
        rid = f"c{next(_ids)}"
        pid = payment_id_for(user, kind, rid)
        env = None
        if kind == PaymentKind.ENVELOPE:
            amount = count * max(1, amount // count)
            env = CardEnvelope(f"env_card{next(_ids)}", count, EnvelopeKind.NORMAL, "",
                               expires_s, [amount // count] * count, rid, b"e" * 16)
        intent = Payment(pid, user, kind, "icbc-1", "icbc", amount, PENDING,
                         envelope_id=env.envelope_id if env else "")
        try:
            p, created = self.run(self.led.begin_payment(intent, b"c" * 16, 60_000, env))
        except errors.FailedPrecondition as err:
            assert kind == PaymentKind.WITHDRAW and err.reason == "INSUFFICIENT_BALANCE"
            assert self.wallet[user] < amount
            return
        assert created and p.status == PENDING
        if kind == PaymentKind.WITHDRAW:
            self.wallet[user] -= amount          # held while the bank works
        if env is not None:
            self.envelopes[env.envelope_id] = {
                "sender": user, "left": list(env.shares), "grabbed": {}, "expired": False,
                "expires": self.now[0] + expires_s * 1000, "card": "paying"}
        self.payments[pid] = {"user": user, "kind": kind, "amount": amount, "status": PENDING,
                              "envelope": env.envelope_id if env else ""}

    @precondition(lambda self: any(p["status"] == PENDING for p in self.payments.values()))
    @rule(data=st.data())
    def bank_unclear(self, data):
        pid = data.draw(st.sampled_from(
            [k for k, p in self.payments.items() if p["status"] == PENDING]))
        assert self.run(self.led.payment_unknown(pid, 1_000, "BANK_RESULT_UNKNOWN")).status \
            == UNKNOWN
        self.payments[pid]["status"] = UNKNOWN

    @precondition(lambda self: self.payments)
    @rule(data=st.data(), by=st.sampled_from(["handler", "resolver"]),
          outcome=st.sampled_from([PaymentStatus.SUCCEEDED, PaymentStatus.FAILED,
                                   PaymentStatus.REFUNDED]))
    def finish_payment(self, data, by, outcome):
        pid = data.draw(st.sampled_from(list(self.payments)))
        m = self.payments[pid]
        if outcome == PaymentStatus.REFUNDED and (by == "handler"
                                                  or m["kind"] == PaymentKind.WITHDRAW):
            outcome = PaymentStatus.FAILED     # only the resolver refunds, and only debits
        source = PENDING if by == "handler" else UNKNOWN
        done = self.run(self.led.finish_payment(pid, outcome, "" if outcome !=
                                                PaymentStatus.FAILED else "LOCKED",
                                                from_states=(source,)))
        if m["status"] != source:   # finished already, or not this finisher's: unchanged
            assert done.status == m["status"]
            return
        assert done.status == outcome
        m["status"] = outcome
        self._book(m, outcome)

    def _book(self, m: dict, outcome: PaymentStatus) -> None:
        if m["kind"] == PaymentKind.TOP_UP and outcome == PaymentStatus.SUCCEEDED:
            self.wallet[m["user"]] += m["amount"]
        elif m["kind"] == PaymentKind.WITHDRAW and outcome != PaymentStatus.SUCCEEDED:
            self.wallet[m["user"]] += m["amount"]    # the hold comes back
        elif m["kind"] == PaymentKind.ENVELOPE:
            self.envelopes[m["envelope"]]["card"] = (
                "paid" if outcome == PaymentStatus.SUCCEEDED else "failed")

    @invariant()
    def balances_match_the_model(self):
        if not hasattr(self, "led"):
            return
        for u in USERS:
            b = self.run(self.led.balance(u))
            assert (b.balance_fen, b.pending_credit_fen) == (self.wallet[u], self.pending[u]), u
        report = self.led.read(audit)
        assert report.balanced, report.discrepancies


class LmdbLedgerModel(LedgerModel):
    backend = "lmdb"


TestMemoryLedgerModel = LedgerModel.TestCase
TestMemoryLedgerModel.settings = settings(max_examples=40, stateful_step_count=40,
                                          deadline=None)
TestLmdbLedgerModel = LmdbLedgerModel.TestCase
TestLmdbLedgerModel.settings = settings(max_examples=12, stateful_step_count=30, deadline=None)
