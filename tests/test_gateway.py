"""The gateway end to end: real bank simulator and gateway processes over loopback gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.client import Client
from gateway.errors import reason_of
from hongbao.v1 import admin_pb2, auth_pb2, envelope_pb2, wallet_pb2
from tests.conftest import run

LUCKY = envelope_pb2.ENVELOPE_KIND_LUCKY
NORMAL = envelope_pb2.ENVELOPE_KIND_NORMAL
GRABBED = envelope_pb2.GRAB_OUTCOME_GRABBED


async def top_up(c: Client, meta, amount: int, rid: str = "t1", card: str = "icbc-6222001"):
    return await c.wallet.TopUp(
        wallet_pb2.TopUpRequest(request_id=rid, card_id=card, amount_fen=amount),
        metadata=meta, timeout=10)


async def send(c: Client, meta, total: int, count: int, rid: str = "s1", kind=LUCKY, **kw):
    return await c.envelopes.SendEnvelope(
        envelope_pb2.SendEnvelopeRequest(request_id=rid, total_fen=total, count=count,
                                         kind=kind, **kw), metadata=meta, timeout=10)


async def grab(c: Client, meta, envelope_id: str, rid: str = "g1"):
    return await c.envelopes.GrabEnvelope(
        envelope_pb2.GrabEnvelopeRequest(envelope_id=envelope_id, request_id=rid),
        metadata=meta, timeout=10)


async def balance(c: Client, meta):
    return await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta, timeout=10)


async def wait_credited(c: Client, meta, timeout_s: float = 10.0):
    """Waits until the user's pending credit has landed in the wallet."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        b = await balance(c, meta)
        if b.pending_credit_fen == 0:
            return b
        assert asyncio.get_running_loop().time() < deadline, "credit did not land"
        await asyncio.sleep(0.05)


def test_top_up_send_grab_and_credit(stack):
    """A user tops up, sends a lucky envelope, others grab it and the money lands in wallets."""
    async def scenario():
        async with Client(stack.target) as c:
            alice = stack.meta("alice")
            paid = await top_up(c, alice, 10_000)
            assert paid.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED
            sent = await send(c, alice, 1000, 5, greeting="新年快乐")
            assert sent.status == envelope_pb2.ENVELOPE_STATUS_ACTIVE
            assert sent.paid_via == envelope_pb2.PAY_METHOD_BALANCE
            got = {}
            for u in ("bob", "carol", "dan", "erin", "alice", "fay"):
                r = await grab(c, stack.meta(u), sent.envelope_id)
                got[u] = r
            grabbed = {u: r.amount_fen for u, r in got.items() if r.outcome == GRABBED}
            assert len(grabbed) == 5 and sum(grabbed.values()) == 1000
            assert got["fay"].outcome == envelope_pb2.GRAB_OUTCOME_SOLD_OUT
            assert got["bob"].credit_status == envelope_pb2.CREDIT_STATUS_PENDING
            for u in ("bob", "carol"):
                b = await wait_credited(c, stack.meta(u))
                assert b.balance_fen == grabbed[u]
            view = (await c.envelopes.GetEnvelope(
                envelope_pb2.GetEnvelopeRequest(envelope_id=sent.envelope_id),
                metadata=alice)).envelope
            assert view.sender_id == "alice" and view.greeting == "新年快乐"
            assert view.status == envelope_pb2.ENVELOPE_STATUS_SOLD_OUT
            assert [g.user_id for g in view.grabs] == list(grabbed)
            best = max(view.grabs, key=lambda g: g.amount_fen)
            assert view.best_luck_user_id == best.user_id
            b = await wait_credited(c, alice)
            assert b.balance_fen == 10_000 - 1000 + grabbed["alice"]
            txs = await c.wallet.ListTransactions(
                wallet_pb2.ListTransactionsRequest(page_size=10), metadata=alice)
            assert [t.amount_fen for t in txs.transactions] == [grabbed["alice"], -1000, 10_000]
    run(scenario())


def test_retries_are_idempotent(stack):
    """Retried money calls return their first result; a reused id with new payload is refused."""
    async def scenario():
        async with Client(stack.target) as c:
            u = stack.meta("gus")
            first = await top_up(c, u, 5000, rid="same")
            again = await top_up(c, u, 5000, rid="same")
            assert first.payment_id == again.payment_id
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await top_up(c, u, 6000, rid="same")
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(exc.value) == "REQUEST_ID_REUSED"
            s1 = await send(c, u, 300, 3, rid="env")
            s2 = await send(c, u, 300, 3, rid="env")
            assert s1.envelope_id == s2.envelope_id
            g1 = await grab(c, stack.meta("hal"), s1.envelope_id, rid="x")
            g2 = await grab(c, stack.meta("hal"), s1.envelope_id, rid="x")
            g3 = await grab(c, stack.meta("hal"), s1.envelope_id, rid="y")
            assert (g1.outcome, g1.amount_fen) == (g2.outcome, g2.amount_fen)
            assert g3.outcome == envelope_pb2.GRAB_OUTCOME_ALREADY_GRABBED
            assert (await balance(c, u)).balance_fen == 4700
    run(scenario())


BAD_SENDS = [
    ({"total_fen": 0, "count": 1}, "BAD_AMOUNT"),
    ({"total_fen": -5, "count": 1}, "BAD_AMOUNT"),
    ({"total_fen": 5, "count": 10}, "BAD_AMOUNT"),
    ({"total_fen": 20_001, "count": 1}, "BAD_AMOUNT"),
    ({"total_fen": 2**63 - 1, "count": 100}, "BAD_AMOUNT"),
    ({"total_fen": 100, "count": 0}, "BAD_COUNT"),
    ({"total_fen": 10_000, "count": 101}, "BAD_COUNT"),
    ({"total_fen": 100, "count": 3, "kind": NORMAL}, "BAD_AMOUNT"),
    ({"total_fen": 100, "count": 2, "kind": 0}, "BAD_KIND"),
    ({"total_fen": 100, "count": 2, "greeting": "福" * 65}, "BAD_GREETING"),
    *(({"total_fen": 100, "count": 2, "greeting": f"恭喜{c}发财"}, "BAD_GREETING")
      for c in ("\x00", "\x1b[2J", "\n", "\t", "\x7f", "\x85", "\u202e", "\u2066", "\u200f")),
    ({"total_fen": 100, "count": 2, "expires_in_seconds": -1}, "BAD_EXPIRY"),
    ({"total_fen": 100, "count": 2, "request_id": ""}, "BAD_REQUEST_ID"),
    ({"total_fen": 100, "count": 2, "request_id": "x" * 65}, "BAD_REQUEST_ID"),
    ({"total_fen": 100, "count": 2, "request_id": "a b"}, "BAD_REQUEST_ID"),
    ({"total_fen": 100, "count": 2, "card_id": "nope"}, "BAD_CARD_ID"),
]


def test_greetings_keep_emoji_sequences(stack):
    """Joiners and variation selectors (emoji sequences) are not control characters."""
    async def scenario():
        async with Client(stack.target) as c:
            u = stack.meta("emoji")
            await top_up(c, u, 1_000)
            greeting = "新年快乐 👨\u200d👩\u200d👧 ❤\ufe0f"
            sent = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id="emoji-1", total_fen=100, count=1, kind=LUCKY, greeting=greeting,
                pay_method=envelope_pb2.PAY_METHOD_BALANCE), metadata=u, timeout=10)
            got = await c.envelopes.GetEnvelope(envelope_pb2.GetEnvelopeRequest(
                envelope_id=sent.envelope_id), metadata=u, timeout=10)
            assert got.envelope.greeting == greeting
    run(scenario())


def test_bad_input_is_refused_precisely_and_changes_nothing(stack):
    """Every malformed request gets INVALID_ARGUMENT/NOT_FOUND with its reason and moves nothing."""
    async def scenario():
        async with Client(stack.target) as c:
            u = stack.meta("ivy")
            await top_up(c, u, 50_000)
            for fields, reason in BAD_SENDS:
                req = {"request_id": "bad", "kind": LUCKY, **fields}
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(**req),
                                                   metadata=u, timeout=10)
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert reason_of(exc.value) == reason, fields
            for env_id, code, reason in (
                ("env_0123456789abcdef0123", grpc.StatusCode.NOT_FOUND, "ENVELOPE_NOT_FOUND"),
                ("../etc", grpc.StatusCode.INVALID_ARGUMENT, "BAD_ENVELOPE_ID"),
                ("", grpc.StatusCode.INVALID_ARGUMENT, "BAD_ENVELOPE_ID"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await grab(c, u, env_id)
                assert (exc.value.code(), reason_of(exc.value)) == (code, reason)
            for amount, card, reason in ((0, "icbc-1", "BAD_AMOUNT"), (-1, "icbc-1", "BAD_AMOUNT"),
                                         (10**12, "icbc-1", "BAD_AMOUNT"),
                                         (100, "zzz-1", "UNKNOWN_BANK"),
                                         (100, "icbc-12a", "BAD_CARD_ID")):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await top_up(c, u, amount, rid="bad-topup", card=card)
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert reason_of(exc.value) == reason
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await send(c, u, 60_000, 10, rid="too-much")
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(exc.value) == "INSUFFICIENT_BALANCE"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.wallet.ListTransactions(
                    wallet_pb2.ListTransactionsRequest(page_size=101), metadata=u)
            assert reason_of(exc.value) == "BAD_PAGE_SIZE"
            b = await balance(c, u)
            assert (b.balance_fen, b.pending_credit_fen) == (50_000, 0)
            txs = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(),
                                                  metadata=u)
            assert len(txs.transactions) == 1
    run(scenario())


def test_tickets_and_scopes_are_enforced(stack):
    """No ticket, a forged one or the wrong scope is refused; the user comes from the ticket."""
    async def scenario():
        async with Client(stack.target) as c:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await balance(c, ())
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(exc.value) == "TICKET_MISSING"
            forged = stack.ticket("jim")[:-4] + "AAAA"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await balance(c, Client.bearer(forged))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            read_only = stack.meta("jim", scopes=("read",))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await top_up(c, read_only, 100)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(exc.value) == "SCOPE_MISSING"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=read_only)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await balance(c, read_only)).balance_fen == 0
    run(scenario())


def test_issue_ticket_needs_the_issuer_key(stack):
    """AuthService mints tickets only for callers presenting the issuer key."""
    from gateway.security import tickets

    async def scenario():
        async with Client(stack.target) as c:
            req = auth_pb2.IssueTicketRequest(user_id="kim", scopes=["read"], ttl_seconds=60)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.auth.IssueTicket(req, metadata=(("x-hongbao-issuer-key", "wrong"),))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            key = tickets.KeyRing.load_or_create(stack.data_dir).issuer_key
            r = await c.auth.IssueTicket(req, metadata=(("x-hongbao-issuer-key", key),))
            b = await balance(c, Client.bearer(r.ticket))
            assert b.balance_fen == 0
            bad = auth_pb2.IssueTicketRequest(user_id="kim", scopes=["root"], ttl_seconds=60)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.auth.IssueTicket(bad, metadata=(("x-hongbao-issuer-key", key),))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(scenario())


def test_health_and_reflection(stack):
    """Health says SERVING and reflection lists every service, for grpcurl and ghz."""
    async def scenario():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]))
            async for resp in call:
                names = {s.name for s in resp.list_services_response.service}
                break
        assert {"hongbao.v1.EnvelopeService", "hongbao.v1.WalletService",
                "hongbao.v1.AuthService", "hongbao.v1.AdminService",
                "hongbao.v1.NotificationService", "grpc.health.v1.Health"} <= names
    run(scenario())


def test_one_user_from_many_connections_gets_one_share(stack):
    """The same user grabbing one envelope from many connections at once gets exactly one share."""
    async def scenario():
        clients = [Client(stack.target) for _ in range(8)]
        try:
            owner = stack.meta("owner")
            await top_up(clients[0], owner, 100_000)
            sent = await send(clients[0], owner, 10_000, 10)
            racer = stack.meta("racer")
            results = await asyncio.gather(*(
                grab(clients[i % 8], racer, sent.envelope_id, rid=f"r{i}") for i in range(64)))
        finally:
            for c in clients:
                await c.close()
        return results

    results = run(scenario())
    grabbed = [r for r in results if r.outcome == GRABBED]
    assert len(grabbed) == 1
    assert all(r.outcome == envelope_pb2.GRAB_OUTCOME_ALREADY_GRABBED
               for r in results if r.outcome != GRABBED)


def test_last_shares_raced_by_many_users_go_out_once(stack):
    """Many users racing for the last shares: each share goes to exactly one of them."""
    async def scenario():
        clients = [Client(stack.target) for _ in range(4)]
        try:
            owner = stack.meta("boss")
            await top_up(clients[0], owner, 100_000)
            sent = await send(clients[0], owner, 5_000, 20)
            early = await asyncio.gather(*(
                grab(clients[0], stack.meta(f"early{i}"), sent.envelope_id) for i in range(17)))
            late = await asyncio.gather(*(
                grab(clients[i % 4], stack.meta(f"late{i}"), sent.envelope_id)
                for i in range(200)))
            view = (await clients[0].envelopes.GetEnvelope(
                envelope_pb2.GetEnvelopeRequest(envelope_id=sent.envelope_id),
                metadata=owner)).envelope
        finally:
            for c in clients:
                await c.close()
        return early, late, view

    early, late, view = run(scenario())
    assert all(r.outcome == GRABBED for r in early)
    winners = [r for r in late if r.outcome == GRABBED]
    assert len(winners) == 3
    assert sum(r.outcome == envelope_pb2.GRAB_OUTCOME_SOLD_OUT for r in late) == 197
    assert len({g.user_id for g in view.grabs}) == 20
    assert sum(g.amount_fen for g in view.grabs) == 5_000


def test_batch_grab_on_behalf_of_users(stack):
    """BatchGrab grabs for named users in batches; a bad item is refused alone, the rest go on."""
    async def scenario():
        async with Client(stack.target) as c:
            owner = stack.meta("owner")
            await top_up(c, owner, 10_000)
            sent = await send(c, owner, 4_000, 4)
            upstream = stack.meta("upstream", scopes=("batch",))

            def batch(batch_id, users):
                return envelope_pb2.BatchGrabRequest(batch_id=batch_id, items=[
                    envelope_pb2.BatchGrabItem(user_id=u, envelope_id=sent.envelope_id,
                                               request_id="b") for u in users])

            call = c.envelopes.BatchGrab(iter([batch(1, ["u1", "u2", "bad user", "u1"]),
                                               batch(2, ["u3", "u4", "u5"])]),
                                         metadata=upstream, timeout=10)
            responses = [r async for r in call]
            assert [r.batch_id for r in responses] == [1, 2]
            first, second = responses[0].results, responses[1].results
            assert [r.outcome for r in first] == [GRABBED, GRABBED, 0, GRABBED]
            assert first[0].amount_fen == first[3].amount_fen  # u1 twice: one share, replayed
            assert (first[2].code, first[2].reason) == (
                grpc.StatusCode.INVALID_ARGUMENT.value[0], "BAD_USER_ID")
            assert [r.outcome for r in second] == [
                GRABBED, GRABBED, envelope_pb2.GRAB_OUTCOME_SOLD_OUT]
            taken = [r.amount_fen for r in (first[0], first[1], second[0], second[1])]
            assert sum(taken) == 4_000
            b = await wait_credited(c, stack.meta("u1"))
            assert b.balance_fen == first[0].amount_fen
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in c.envelopes.BatchGrab(iter([batch(3, ["u6"])]),
                                                     metadata=stack.meta("u6"), timeout=10):
                    pass
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in c.envelopes.BatchGrab(iter([batch(4, ["x"] * 1001)]),
                                                     metadata=upstream, timeout=10):
                    pass
            assert reason_of(exc.value) == "BATCH_TOO_LARGE"
    run(scenario())
