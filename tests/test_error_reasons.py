"""Refusals no other test asserts, through the real server: code, reason, and nothing moved.

Each row is one RPC call that must fail; the caller's balance, pending credit and wallet
entries are read before and after, and must not change.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.errors import reason_of
from gateway.ops.procs import gateway_proc
from gateway.security import tickets
from hongbao.v1 import auth_pb2, envelope_pb2, wallet_pb2
from tests.test_gateway import top_up

LUCKY = envelope_pb2.ENVELOPE_KIND_LUCKY
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _send(**kw) -> envelope_pb2.SendEnvelopeRequest:
    return envelope_pb2.SendEnvelopeRequest(**{"request_id": "e1", "total_fen": 500,
                                               "count": 5, "kind": LUCKY, **kw})


ROWS = [
    ("SendEnvelope, unknown pay method", "SendEnvelope", _send(pay_method=99), INVALID,
     "BAD_PAY_METHOD"),
    ("SendEnvelope by card without a card", "SendEnvelope",
     _send(pay_method=envelope_pb2.PAY_METHOD_CARD), INVALID, "CARD_REQUIRED"),
    ("SendEnvelope, total below the count", "SendEnvelope", _send(total_fen=4), INVALID,
     "BAD_AMOUNT"),
    ("TopUp of 0 fen", "TopUp", wallet_pb2.TopUpRequest(
        request_id="t0", card_id="icbc-1", amount_fen=0), INVALID, "BAD_AMOUNT"),
    ("TopUp of 2^63-1 fen", "TopUp", wallet_pb2.TopUpRequest(
        request_id="t1", card_id="icbc-1", amount_fen=2**63 - 1), INVALID, "BAD_AMOUNT"),
    ("TopUp to an unknown bank", "TopUp", wallet_pb2.TopUpRequest(
        request_id="t2", card_id="nobank-1", amount_fen=100), INVALID, "UNKNOWN_BANK"),
    ("Withdraw more than the wallet", "Withdraw", wallet_pb2.WithdrawRequest(
        request_id="w1", card_id="icbc-1", amount_fen=6_000), grpc.StatusCode.FAILED_PRECONDITION,
     "INSUFFICIENT_BALANCE"),
    ("ListTransactions with a forged page token", "ListTransactions",
     wallet_pb2.ListTransactionsRequest(page_token="not-a-token"), INVALID, "BAD_PAGE_TOKEN"),
    ("GrabEnvelope of a malformed id", "GrabEnvelope", envelope_pb2.GrabEnvelopeRequest(
        envelope_id="../x", request_id="g"), INVALID, "BAD_ENVELOPE_ID"),
]


def _stub_call(c: Client, rpc: str):
    for stub in (c.envelopes, c.wallet):
        if hasattr(stub, rpc):
            return getattr(stub, rpc)
    raise AssertionError(rpc)


async def _state(c: Client, meta) -> tuple:
    b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta, timeout=10)
    tx = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(page_size=100),
                                         metadata=meta, timeout=10)
    return b.balance_fen, b.pending_credit_fen, [t.transaction_id for t in tx.transactions]


def test_each_refusal_has_its_code_and_reason_and_moves_nothing(stack):
    async def scenario():
        async with Client(stack.target) as c:
            meta = stack.meta("reasons")
            await top_up(c, meta, 5_000)
            for name, rpc, request, code, reason in ROWS:
                before = await _state(c, meta)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await _stub_call(c, rpc)(request, metadata=meta, timeout=10)
                assert (exc.value.code(), reason_of(exc.value)) == (code, reason), name
                assert exc.value.details(), name
                assert await _state(c, meta) == before, name
    asyncio.run(scenario())


def test_issue_ticket_without_the_issuer_key(stack):
    async def scenario():
        async with Client(stack.target) as c:
            for key in ("", "not-the-key"):
                meta = (("x-hongbao-issuer-key", key),) if key else ()
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await c.auth.IssueTicket(auth_pb2.IssueTicketRequest(
                        user_id="u", scopes=["pay"]), metadata=meta, timeout=10)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert reason_of(exc.value) == "ISSUER_KEY_INVALID"
    asyncio.run(scenario())


def test_card_calls_without_a_bank_are_unavailable_bank_not_configured(tmp_path):
    gw = gateway_proc(tmp_path / "gw", log_path=tmp_path / "gw.log")   # no --bank
    gw.start()
    try:
        ring = tickets.KeyRing.load_or_create(tmp_path / "gw")
        meta = Client.bearer(tickets.mint(ring, "nobank", ["pay", "read"], 600)[0])

        async def scenario():
            async with Client(gw.target) as c:
                for call in (
                        c.wallet.TopUp(wallet_pb2.TopUpRequest(
                            request_id="t", card_id="icbc-1", amount_fen=100), metadata=meta,
                            timeout=10),
                        c.envelopes.SendEnvelope(_send(pay_method=envelope_pb2.PAY_METHOD_CARD,
                                                       card_id="icbc-1"), metadata=meta,
                                                 timeout=10)):
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await call
                    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert reason_of(exc.value) == "BANK_NOT_CONFIGURED"
                b = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta)
                assert (b.balance_fen, b.pending_credit_fen) == (0, 0)
        asyncio.run(scenario())
    finally:
        gw.stop()
