"""Card payments killed at each durable step, deterministically, then resolved correctly.

The gateway worker is started with ``HONGBAO_CRASH_AT`` naming one step
(``gateway/crashpoints.py``): it SIGKILLs itself exactly there, no sleeps involved. For
top-ups, withdrawals and card-paid sends: killed after the intent is saved (the bank
never called), after the bank answered but before the ledger saved it, and, on the
next start, in the resolver right after it had the bank void or refund the order. Then
a clean start, and the resolver must close the loop: one bank order per payment, at most
one refund, the card, the wallet and the bank agreeing (the fixture's reconcile runs the
bank cross-check).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from gateway.client import Client
from gateway.domain.keys import payment_id_for
from gateway.domain.model import PaymentKind
from gateway.ops.procs import gateway_proc
from gateway.payments.bank import BankClient, OrderStatus
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.test_gateway import top_up

AMOUNT = 3_000
CARD = "icbc-7001"
SETTINGS = "bank_timeout_s = 1.0\nresolve_delay_s = 0.2\nresolver_max_backoff_s = 1.0\n"
S = wallet_pb2


def _start(stack, tmp_path, crash: str | None):
    cfg = tmp_path / "crash.toml"
    cfg.write_text(SETTINGS)
    env = {k: v for k, v in os.environ.items() if k != "HONGBAO_CRASH_AT"}
    if crash:
        env["HONGBAO_CRASH_AT"] = crash
    if stack.gateway is not None:
        stack.gateway.stop()
    stack.gateway = gateway_proc(stack.data_dir, "--config", str(cfg), bank=stack.bank.target,
                                 log_path=tmp_path / "gw.log", env=env)
    stack.gateway.start()
    return stack.gateway


def _died_by_itself(proc, timeout_s: float = 30) -> None:
    assert proc.popen.wait(timeout_s) == -signal.SIGKILL


async def _call(c: Client, kind: str, meta, rid: str):
    if kind == "top-up":
        return await c.wallet.TopUp(S.TopUpRequest(request_id=rid, card_id=CARD,
                                                   amount_fen=AMOUNT), metadata=meta, timeout=5)
    if kind == "withdrawal":
        return await c.wallet.Withdraw(S.WithdrawRequest(request_id=rid, card_id=CARD,
                                                         amount_fen=AMOUNT), metadata=meta,
                                       timeout=5)
    return await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
        request_id=rid, total_fen=AMOUNT, count=3, kind=envelope_pb2.ENVELOPE_KIND_LUCKY,
        pay_method=envelope_pb2.PAY_METHOD_CARD, card_id=CARD), metadata=meta, timeout=5)


KIND_OF = {"top-up": PaymentKind.TOP_UP, "withdrawal": PaymentKind.WITHDRAW,
           "send by card": PaymentKind.ENVELOPE}

# (kind, crash in the call, crash in the resolver, final bank order, card change, wallet change)
CASES = [
    ("top-up", "after_intent", None, OrderStatus.VOIDED, 0, 0),
    ("top-up", "after_intent", "resolver_void", OrderStatus.VOIDED, 0, 0),
    ("top-up", "after_bank", None, OrderStatus.REFUNDED, 0, 0),
    ("top-up", "after_bank", "resolver_refund", OrderStatus.REFUNDED, 0, 0),
    ("withdrawal", "after_intent", None, OrderStatus.VOIDED, 0, 0),
    ("withdrawal", "after_intent", "resolver_void", OrderStatus.VOIDED, 0, 0),
    ("withdrawal", "after_bank", None, OrderStatus.SETTLED, AMOUNT, -AMOUNT),
    ("send by card", "after_intent", None, OrderStatus.VOIDED, 0, 0),
    ("send by card", "after_bank", "resolver_refund", OrderStatus.REFUNDED, 0, 0),
]


@pytest.mark.parametrize("kind, first, second, order, card_delta, wallet_delta", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2] or 'clean'}" for c in CASES])
def test_a_payment_killed_at_a_durable_step_is_closed_by_the_resolver(
        stack, tmp_path, kind, first, second, order, card_delta, wallet_delta):
    user = "crashy"
    rid = "the-one"
    pid = payment_id_for(user, KIND_OF[kind], rid)

    async def before():
        bank = BankClient(stack.bank.target)
        async with Client(stack.target) as c:
            if kind == "withdrawal":   # something to withdraw, from another card
                await top_up(c, stack.meta(user), 10_000, rid="fund", card="ccb-7002")
            b = await c.wallet.GetBalance(S.GetBalanceRequest(), metadata=stack.meta(user))
            card = await bank.card_balance(CARD)
        await bank.close()
        return b.balance_fen, card
    wallet0, card0 = asyncio.run(before())

    proc = _start(stack, tmp_path, first)

    async def doomed():
        async with Client(stack.target) as c:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _call(c, kind, stack.meta(user), rid)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE   # the worker died
    asyncio.run(doomed())
    _died_by_itself(proc)
    if second:
        _died_by_itself(_start(stack, tmp_path, second))   # the resolver reaches its step
    _start(stack, tmp_path, None)

    async def settled():
        deadline = time.monotonic() + 30
        bank = BankClient(stack.bank.target)
        async with Client(stack.target) as c:
            while True:
                status = await bank.query(pid)
                b = await c.wallet.GetBalance(S.GetBalanceRequest(), metadata=stack.meta(user))
                card = await bank.card_balance(CARD)
                done = (status == order and b.balance_fen == wallet0 + wallet_delta
                        and card == card0 + card_delta)
                if done or time.monotonic() > deadline:
                    totals = await bank.totals()
                    await bank.close()
                    return status, b.balance_fen, card, totals
                await asyncio.sleep(0.1)
    status, wallet, card, t = asyncio.run(settled())
    assert (status, wallet - wallet0, card - card0) == (order, wallet_delta, card_delta)

    # One order, at most one refund: the card's debits and refunds for it are one amount each.
    assert t.total_refunded_fen == (AMOUNT if order == OrderStatus.REFUNDED else 0)
