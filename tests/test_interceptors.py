"""Auth and logging interceptors on a real grpc.aio server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from concurrent import futures

import grpc
import pytest
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.errors import ResourceExhausted, reason_of
from gateway.security import tickets
from gateway.transport.interceptors import auth as auth_mod
from gateway.transport.interceptors._plumbing import Rejections, method_of, service_of
from gateway.transport.interceptors.auth import AuthInterceptor, claims, current_claims
from gateway.transport.interceptors.logging import (
    REQUEST_ID_HEADER,
    AccessLog,
    LoggingInterceptor,
    configure_logging,
    flush_access_log,
)
from hongbao.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    envelope_pb2,
    envelope_pb2_grpc,
    notification_pb2,
    notification_pb2_grpc,
    wallet_pb2,
    wallet_pb2_grpc,
)

SUBJECT_HEADER = "x-test-subject"
BOUND_HEADER = "x-test-bound-request-id"
UNLISTED = "test.v1.Unlisted"
FOREVER = 99  # after_event_id that makes the test stream never end


class Wallet(wallet_pb2_grpc.WalletServiceServicer):
    async def GetBalance(self, request, context):
        bound = structlog.contextvars.get_contextvars().get("request_id", "")
        context.set_trailing_metadata(((SUBJECT_HEADER, claims().subject), (BOUND_HEADER, bound)))
        return wallet_pb2.GetBalanceResponse(balance_fen=7)

    def ListTransactions(self, request, context):
        # Sync on purpose: grpc runs it in its thread pool, away from the interceptor.
        return wallet_pb2.ListTransactionsResponse(next_page_token=claims().subject)


class Notifications(notification_pb2_grpc.NotificationServiceServicer):
    async def WatchNotifications(self, request, context):
        if request.after_event_id == FOREVER:
            while True:
                yield notification_pb2.WatchNotificationsResponse()
                await asyncio.sleep(0.01)
        for event_id in (1, 2):
            await asyncio.sleep(0)
            yield notification_pb2.WatchNotificationsResponse(
                notification=notification_pb2.Notification(
                    event_id=event_id, message=claims().subject))


class Envelopes(envelope_pb2_grpc.EnvelopeServiceServicer):
    async def BatchGrab(self, request_iterator, context):
        async for batch in request_iterator:
            yield envelope_pb2.BatchGrabResponse(
                batch_id=batch.batch_id,
                results=[envelope_pb2.BatchGrabResult(user_id=claims().subject)])


class Auth(auth_pb2_grpc.AuthServiceServicer):
    async def IssueTicket(self, request, context):
        # Exempt: must run with no claims, even right after authenticated calls.
        leaked = current_claims.get()
        return auth_pb2.IssueTicketResponse(ticket="none" if leaked is None else leaked.subject)


class Admin(admin_pb2_grpc.AdminServiceServicer):
    async def GetQosStatus(self, request, context):
        return admin_pb2.GetQosStatusResponse(writer_queue_depth=len(claims().subject))


async def _echo(request, context):
    return request


async def _echo_stream(request_iterator, context):
    async for item in request_iterator:
        yield item


async def _echo_client_stream(request_iterator, context):
    async for item in request_iterator:
        return item
    return b""


async def _echo_server_stream(request, context):
    yield request


_UNLISTED_HANDLER = grpc.method_handlers_generic_handler(UNLISTED, {
    "UnaryUnary": grpc.unary_unary_rpc_method_handler(_echo),
    "UnaryStream": grpc.unary_stream_rpc_method_handler(_echo_server_stream),
    "StreamUnary": grpc.stream_unary_rpc_method_handler(_echo_client_stream),
    "StreamStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
})


class Recorder:
    """A logger stand-in keeping every access line, with the bound context merged in."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def info(self, event: str, **fields) -> None:
        self.lines.append({**structlog.contextvars.get_contextvars(), "event": event, **fields})


class Harness:
    def __init__(self, ring: tickets.KeyRing, channel: grpc.aio.Channel, log: Recorder):
        self.ring = ring
        self.channel = channel
        self.log = log
        self.wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        self.notifications = notification_pb2_grpc.NotificationServiceStub(channel)
        self.envelopes = envelope_pb2_grpc.EnvelopeServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def meta(self, subject: str = "user:1", scopes=("pay", "grab", "read"), **kw):
        ticket, _ = tickets.mint(self.ring, subject, list(scopes), 3600, **kw)
        return (("authorization", f"Bearer {ticket}"),)


class Shed(grpc.aio.ServerInterceptor):
    """A third interceptor made of the shared plumbing alone: it sheds one whole service."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.rejections = Rejections(limit=8)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or service_of(method_of(handler_call_details)) != self.service:
            return handler
        err = ResourceExhausted("TEST_SHED", "shed by the test", retry_after_ms=50)
        return self.rejections.handler(handler, err)


@contextlib.asynccontextmanager
async def serving(tmp_path, *, access_log: bool = True, before_auth=()) -> AsyncIterator[Harness]:
    ring = tickets.KeyRing.load_or_create(tmp_path)
    log = Recorder()
    pool = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.aio.server(
        migration_thread_pool=pool,
        interceptors=[LoggingInterceptor(access_log=access_log, logger=log),
                      *before_auth, AuthInterceptor(ring)],
    )
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(Wallet(), server)
    notification_pb2_grpc.add_NotificationServiceServicer_to_server(Notifications(), server)
    envelope_pb2_grpc.add_EnvelopeServiceServicer_to_server(Envelopes(), server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Auth(), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_generic_rpc_handlers((_UNLISTED_HANDLER,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Harness(ring, channel, log)
    finally:
        await server.stop(None)
        pool.shutdown(wait=True)


def run(tmp_path, scenario, **kw):
    """Runs ``scenario(harness)`` against a fresh server on its own event loop."""
    async def main():
        async with serving(tmp_path, **kw) as h:
            return await asyncio.wait_for(scenario(h), timeout=30)
    return asyncio.run(main())


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call
    return excinfo.value


# -- authentication ------------------------------------------------------------------------


def test_no_ticket_is_unauthenticated(tmp_path):
    """A call with no authorization header fails UNAUTHENTICATED, reason TICKET_MISSING."""
    async def scenario(h):
        err = await refused(h.wallet.GetBalance(wallet_pb2.GetBalanceRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err) == "TICKET_MISSING"
    run(tmp_path, scenario)


def test_not_bearer_is_malformed(tmp_path):
    """An authorization header with another scheme is TICKET_MALFORMED."""
    async def scenario(h):
        err = await refused(h.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(), metadata=(("authorization", "Basic dTpw"),)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err) == "TICKET_MALFORMED"
    run(tmp_path, scenario)


def test_forged_ticket_is_unauthenticated(tmp_path):
    """A ticket with a tampered signature fails UNAUTHENTICATED, reason TICKET_FORGED."""
    async def scenario(h):
        (_, value), = h.meta()
        forged = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
        err = await refused(h.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(), metadata=(("authorization", forged),)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err) == "TICKET_FORGED"
    run(tmp_path, scenario)


def test_expired_ticket_is_unauthenticated(tmp_path):
    """A ticket past its expiry and the leeway fails UNAUTHENTICATED, reason TICKET_EXPIRED."""
    async def scenario(h):
        import time
        meta = h.meta(now=time.time() - 7200)
        err = await refused(h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err) == "TICKET_EXPIRED"
    run(tmp_path, scenario)


def test_unknown_key_is_unauthenticated(tmp_path):
    """A ticket from another key ring fails UNAUTHENTICATED, reason TICKET_UNKNOWN_KEY."""
    async def scenario(h):
        other = tickets.KeyRing.load_or_create(tmp_path / "other")
        ticket, _ = tickets.mint(other, "user:1", ["read"], 60)
        err = await refused(h.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(), metadata=(("authorization", f"Bearer {ticket}"),)))
        assert reason_of(err) == "TICKET_UNKNOWN_KEY"
    run(tmp_path, scenario)


def test_wrong_scope_is_permission_denied(tmp_path):
    """A genuine ticket without the method's scope fails PERMISSION_DENIED, SCOPE_MISSING."""
    async def scenario(h):
        err = await refused(h.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(), metadata=h.meta(scopes=("pay",))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "SCOPE_MISSING"
        assert "'read'" in err.details()
    run(tmp_path, scenario)


def test_scope_missing_names_the_scope_in_error_info(tmp_path):
    """The ErrorInfo of a SCOPE_MISSING refusal carries the needed scope as metadata."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async def scenario(h):
        err = await refused(h.admin.GetQosStatus(
            admin_pb2.GetQosStatusRequest(), metadata=h.meta(scopes=("read",))))
        info = error_details_pb2.ErrorInfo()
        rpc_status.from_call(err).details[0].Unpack(info)
        assert (info.reason, dict(info.metadata)) == ("SCOPE_MISSING", {"scope": "admin"})
    run(tmp_path, scenario)


def test_good_ticket_reaches_handler(tmp_path):
    """With a good ticket the handler runs and sees the ticket's subject."""
    async def scenario(h):
        call = h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=h.meta("user:42"))
        assert (await call).balance_fen == 7
        assert (SUBJECT_HEADER, "user:42") in tuple(await call.trailing_metadata())
    run(tmp_path, scenario)


def test_each_call_sees_its_own_subject(tmp_path):
    """Concurrent calls from different users each see their own subject."""
    async def scenario(h):
        calls = [h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=h.meta(f"u{i}"))
                 for i in range(20)]
        await asyncio.gather(*calls)
        for i, call in enumerate(calls):
            assert (SUBJECT_HEADER, f"u{i}") in tuple(await call.trailing_metadata())
    run(tmp_path, scenario)


def test_sync_handler_sees_claims(tmp_path):
    """A sync handler, run in grpc's thread pool, sees its caller's subject and is logged."""
    async def scenario(h):
        for subject in ("user:a", "user:b", "user:a"):
            call = h.wallet.ListTransactions(
                wallet_pb2.ListTransactionsRequest(),
                metadata=(*h.meta(subject), (REQUEST_ID_HEADER, f"sync-{subject}")))
            assert (await call).next_page_token == subject
            assert (REQUEST_ID_HEADER, f"sync-{subject}") in tuple(await call.initial_metadata())
        assert [line["code"] for line in h.log.lines] == ["OK"] * 3
        assert [line["request_id"] for line in h.log.lines] == [
            "sync-user:a", "sync-user:b", "sync-user:a"]
    run(tmp_path, scenario)


def test_server_stream_sees_claims(tmp_path):
    """A server-streaming handler sees the subject at every message it yields."""
    async def scenario(h):
        call = h.notifications.WatchNotifications(
            notification_pb2.WatchNotificationsRequest(), metadata=h.meta("user:s"))
        messages = [r.notification.message async for r in call]
        assert messages == ["user:s", "user:s"]
    run(tmp_path, scenario)


def test_bidi_stream_needs_batch_scope_and_sees_claims(tmp_path):
    """BatchGrab (stream-stream) is refused without 'batch' and sees the subject with it."""
    async def scenario(h):
        # The refused call sends nothing (see _unlisted_call): a request written after the
        # refusal races with the call's end and can surface as INTERNAL on a loaded machine.
        err = await refused(h.envelopes.BatchGrab(iter(()), metadata=h.meta()).read())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "SCOPE_MISSING"
        requests = [envelope_pb2.BatchGrabRequest(batch_id=i) for i in (1, 2)]
        call = h.envelopes.BatchGrab(iter(requests), metadata=h.meta("up", scopes=("batch",)))
        got = [(r.batch_id, r.results[0].user_id) async for r in call]
        assert got == [(1, "up"), (2, "up")]
    run(tmp_path, scenario)


def test_admin_service_needs_admin(tmp_path):
    """Every AdminService method needs 'admin'; with it the handler runs."""
    async def scenario(h):
        err = await refused(h.admin.GetQosStatus(
            admin_pb2.GetQosStatusRequest(), metadata=h.meta(scopes=("pay", "read"))))
        assert reason_of(err) == "SCOPE_MISSING"
        response = await h.admin.GetQosStatus(
            admin_pb2.GetQosStatusRequest(), metadata=h.meta("ops", scopes=("admin",)))
        assert response.writer_queue_depth == 3
    run(tmp_path, scenario)


def test_exempt_methods_need_no_ticket_and_see_no_claims(tmp_path):
    """Health and IssueTicket pass without a ticket; IssueTicket sees no leftover claims."""
    async def scenario(h):
        response = await h.health.Check(health_pb2.HealthCheckRequest())
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        await h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=h.meta("user:9"))
        issued = await h.auth.IssueTicket(auth_pb2.IssueTicketRequest(user_id="x"))
        assert issued.ticket == "none"
    run(tmp_path, scenario)


def _unlisted_call(h, method: str, meta):
    """A call of the given arity on the unlisted test service; client streams send nothing."""
    path = f"/{UNLISTED}/{method}"
    if method == "UnaryUnary":
        return h.channel.unary_unary(path)(b"x", metadata=meta)
    if method == "UnaryStream":
        return h.channel.unary_stream(path)(b"x", metadata=meta).read()
    # A message written after the server has already refused the call races with its
    # end and can surface as INTERNAL.
    if method == "StreamUnary":
        return h.channel.stream_unary(path)(iter(()), metadata=meta)
    return h.channel.stream_stream(path)(iter(()), metadata=meta).read()


@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"])
def test_unlisted_method_is_not_allowed(tmp_path, method):
    """A registered method missing from the scope map is refused (fail closed), any arity."""
    async def scenario(h):
        err = await refused(_unlisted_call(h, method, h.meta(scopes=sorted(tickets.SCOPES))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "METHOD_NOT_ALLOWED"
    run(tmp_path, scenario)


def test_plumbing_rejection_aborts_with_code_reason_and_pushback(tmp_path):
    """A rejection built by Rejections refuses every arity with its code, reason and trailers."""
    shed = Shed(f"/{UNLISTED}/")
    arities = ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"]

    async def scenario(h):
        for method in arities * 2:
            call = _unlisted_call(h, method, h.meta())
            err = await refused(call)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, method
            assert reason_of(err) == "TEST_SHED"
            assert ("grpc-retry-pushback-ms", "50") in tuple(err.trailing_metadata())
        assert [(line["code"], line["reason"]) for line in h.log.lines] == [
            ("RESOURCE_EXHAUSTED", "TEST_SHED")] * len(arities) * 2
        ok = await h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=h.meta())
        assert ok.balance_fen == 7  # other services pass through untouched
    run(tmp_path, scenario, before_auth=[shed])
    assert len(shed.rejections) == len(arities)  # built once per arity, then reused


def test_rejections_cache_is_bounded():
    """Past its limit Rejections still refuses, building the handler per call."""
    rejections = Rejections(limit=1)
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    first = rejections.handler(handler, ResourceExhausted("A"))
    assert rejections.handler(handler, ResourceExhausted("A")) is first
    other = rejections.handler(handler, ResourceExhausted("B"))
    assert other is not first and other.unary_unary is not None
    assert len(rejections) == 1


def test_service_of_is_the_method_prefix():
    """service_of keeps '/<package>.<Service>/' of a full method name."""
    assert service_of("/hongbao.v1.AdminService/GetQosStatus") == "/hongbao.v1.AdminService/"
    assert service_of("/grpc.health.v1.Health/Check") == "/grpc.health.v1.Health/"


def test_unregistered_method_is_unimplemented(tmp_path):
    """A method the server does not have at all is UNIMPLEMENTED, as without interceptors."""
    async def scenario(h):
        err = await refused(h.channel.unary_unary("/nope.v1.Nope/Nope")(b"", metadata=h.meta()))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert h.log.lines[-1]["code"] == "UNIMPLEMENTED"
    run(tmp_path, scenario)


def test_scope_map_covers_every_hongbao_method():
    """Every rpc in the hongbao.v1 protos has a scope or is exempt: none is refused by accident."""
    from hongbao.v1 import admin_pb2, auth_pb2, envelope_pb2, notification_pb2, wallet_pb2
    for module in (admin_pb2, auth_pb2, envelope_pb2, notification_pb2, wallet_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                assert auth_mod.scope_for(path) is not None, path


def test_claims_outside_a_call_asserts():
    """claims() outside an authenticated call is a programmer error and asserts."""
    with pytest.raises(AssertionError):
        claims()


# -- request ids and the access log --------------------------------------------------------


def test_request_id_is_echoed(tmp_path):
    """A well-formed x-request-id is echoed, bound for the servicer's own logs, and logged."""
    async def scenario(h):
        call = h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                   metadata=(*h.meta(), (REQUEST_ID_HEADER, "req-123")))
        await call
        assert (REQUEST_ID_HEADER, "req-123") in tuple(await call.initial_metadata())
        assert (BOUND_HEADER, "req-123") in tuple(await call.trailing_metadata())
        assert h.log.lines[-1]["request_id"] == "req-123"
    run(tmp_path, scenario)


def test_request_id_is_made_when_absent_or_malformed(tmp_path):
    """Without a usable x-request-id the server makes a fresh one per call and echoes it."""
    async def scenario(h):
        seen = []
        for extra in ((), ((REQUEST_ID_HEADER, "bad id!"),), ((REQUEST_ID_HEADER, "x" * 65),)):
            call = h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                       metadata=(*h.meta(), *extra))
            await call
            echoed = dict(tuple(await call.initial_metadata()))[REQUEST_ID_HEADER]
            assert echoed not in ("bad id!", "x" * 65)
            seen.append(echoed)
        assert len(set(seen)) == 3
    run(tmp_path, scenario)


def test_refused_calls_echo_the_request_id(tmp_path):
    """A call refused by the auth interceptor still gets its request id back."""
    async def scenario(h):
        call = h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                   metadata=((REQUEST_ID_HEADER, "r-1"),))
        await refused(call)
        assert (REQUEST_ID_HEADER, "r-1") in tuple(await call.initial_metadata())
    run(tmp_path, scenario)


def test_access_log_line_per_call(tmp_path):
    """Each call, accepted or refused, logs one line with method, code, duration and user."""
    async def scenario(h):
        meta = h.meta("user:7")
        await h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta)
        await refused(h.wallet.GetBalance(wallet_pb2.GetBalanceRequest()))
        call = h.notifications.WatchNotifications(
            notification_pb2.WatchNotificationsRequest(), metadata=meta)
        assert len([r async for r in call]) == 2
        ok, denied, stream = h.log.lines
        assert ok["method"] == "/hongbao.v1.WalletService/GetBalance"
        assert (ok["code"], ok["user"]) == ("OK", "user:7")
        assert isinstance(ok["duration_ms"], float) and ok["duration_ms"] >= 0
        assert denied["code"] == "UNAUTHENTICATED" and "user" not in denied
        assert denied["reason"] == "TICKET_MISSING" and "reason" not in ok
        assert (stream["code"], stream["user"]) == ("OK", "user:7")
        ticket = meta[0][1].split()[1]
        assert all(ticket not in repr(line) for line in h.log.lines)
    run(tmp_path, scenario)


def test_cancelled_stream_is_logged_as_cancelled(tmp_path):
    """A server stream the caller cancels still gets its line, with code CANCELLED."""
    async def scenario(h):
        call = h.notifications.WatchNotifications(
            notification_pb2.WatchNotificationsRequest(after_event_id=FOREVER),
            metadata=h.meta("user:c"))
        await call.read()
        call.cancel()
        for _ in range(200):
            if h.log.lines:
                break
            await asyncio.sleep(0.01)
        (line,) = h.log.lines
        assert (line["code"], line["user"]) == ("CANCELLED", "user:c")
    run(tmp_path, scenario)


def test_access_log_off_keeps_request_id(tmp_path):
    """access_log=False logs nothing per call but still echoes the request id."""
    async def scenario(h):
        call = h.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                   metadata=(*h.meta(), (REQUEST_ID_HEADER, "quiet-1")))
        await call
        assert (REQUEST_ID_HEADER, "quiet-1") in tuple(await call.initial_metadata())
        assert h.log.lines == []
    run(tmp_path, scenario, access_log=False)


def test_configure_logging_writes_json_lines_with_request_id_and_user():
    """configure_logging renders one JSON object per line with bound request id and user."""
    saved = structlog.get_config()
    out = io.StringIO()
    try:
        configure_logging("info", json=True, stream=out)
        log = structlog.get_logger("t")
        token = current_claims.set(tickets.Claims("user:3", frozenset(), 0, 0, "id", "k"))
        structlog.contextvars.bind_contextvars(request_id="rid-1")
        try:
            log.info("hello", ticket="v1.secret", n=1)
            log.debug("hidden")
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            current_claims.reset(token)
    finally:
        structlog.configure(**saved)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert (line["event"], line["request_id"], line["user"], line["level"]) == (
        "hello", "rid-1", "user:3", "info")
    assert line["ticket"] == "[redacted]" and "v1.secret" not in lines[0]


def test_configure_logging_refuses_unknown_level():
    """An unknown level name is an error, not a silent default."""
    with pytest.raises(ValueError):
        configure_logging("loud")


def test_access_log_fast_line_has_structlog_fields_and_is_buffered():
    """AccessLog renders what structlog would (reason included), written within 100 ms."""
    saved = structlog.get_config()
    out = io.StringIO()

    async def scenario():
        fast = AccessLog()
        fields = dict(method="/hongbao.v1.WalletService/GetBalance", code="UNAUTHENTICATED",
                      duration_ms=0.25, request_id="r-9")
        token = structlog.contextvars.bind_contextvars(reason="TICKET_MISSING")
        try:
            fast.info("rpc", **fields)
            structlog.get_logger("gateway.access").info("rpc", **fields)
        finally:
            structlog.contextvars.reset_contextvars(**token)
        fast.info("rpc", **{**fields, "code": "OK"}, user="user:5")
        # The structlog line is written at once; the fast ones wait for the timer.
        assert len(out.getvalue().splitlines()) == 1
        for _ in range(100):
            if len(out.getvalue().splitlines()) == 3:
                break
            await asyncio.sleep(0.01)

    try:
        configure_logging("info", json=True, stream=out)
        asyncio.run(scenario())
    finally:
        flush_access_log()
        structlog.configure(**saved)
        configure_logging("info", json=True)
    slow, refused_line, ok = _three(out.getvalue())
    for line in (slow, refused_line):
        assert line["reason"] == "TICKET_MISSING" and line["code"] == "UNAUTHENTICATED"
    assert {k: v for k, v in refused_line.items() if k != "timestamp"} == {
        k: v for k, v in slow.items() if k != "timestamp"}
    assert refused_line["timestamp"].endswith("Z") and len(refused_line["timestamp"]) == 27
    assert (ok["code"], ok["user"], ok["event"], ok["level"]) == ("OK", "user:5", "rpc", "info")
    assert "reason" not in ok


def _three(text: str):
    """The structlog line (written first), then the two buffered ones in order."""
    slow, fast_refused, fast_ok = (json.loads(x) for x in text.splitlines())
    return slow, fast_refused, fast_ok


def test_access_log_falls_back_to_structlog_for_console_or_quiet_levels():
    """Console text or a level above info: access lines go through structlog as before."""
    saved = structlog.get_config()
    out = io.StringIO()
    try:
        configure_logging("warning", json=True, stream=out)
        AccessLog().info("rpc", method="/x/Y", code="OK", duration_ms=0.1, request_id="q")
        flush_access_log()
        assert out.getvalue() == ""
        configure_logging("info", json=False, stream=out)
        AccessLog().info("rpc", method="/x/Y", code="OK", duration_ms=0.1, request_id="q")
        flush_access_log()
        assert "rpc" in out.getvalue() and not out.getvalue().startswith("{")
    finally:
        structlog.configure(**saved)
        configure_logging("info", json=True)


def test_a_stopping_server_writes_its_buffered_access_lines(stack):
    """SIGTERM: the last calls' access lines reach the log before the worker exits."""
    from gateway.client import Client

    async def calls():
        async with Client(stack.target) as c:
            for i in range(3):
                await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                          metadata=(*stack.meta("user:log"),
                                                    (REQUEST_ID_HEADER, f"last-{i}")))
    asyncio.run(calls())
    stack.gateway.stop()
    stack.gateway = None
    lines = [json.loads(x) for x in (stack.root / "gateway.log").read_text().splitlines()
             if x.startswith("{")]
    mine = [x for x in lines if x.get("event") == "rpc" and
            str(x.get("request_id", "")).startswith("last-")]
    assert [x["request_id"] for x in mine] == ["last-0", "last-1", "last-2"]
    assert all(x["code"] == "OK" and x["user"] == "user:log" for x in mine)
    stop_at = next(i for i, x in enumerate(lines) if x.get("event") == "stopped")
    assert lines.index(mine[-1]) < stop_at


@pytest.mark.parametrize("name", ["ticket", "Authorization", "issuer_key", "x-hongbao-issuer-key",
                                  "api_token", "client_secret", "password", "bearer",
                                  "tls_key", "credentials"])
def test_configure_logging_redacts_every_secret_like_field(name):
    """Redaction goes by pattern: any field named like a secret is blanked, others kept."""
    saved = structlog.get_config()
    out = io.StringIO()
    try:
        configure_logging("info", json=True, stream=out)
        structlog.get_logger("t").info("x", **{name: "v1.SECRET", "kid": "k1", "amount": 5})
    finally:
        structlog.configure(**saved)
        configure_logging("info", json=True)
    line = json.loads(out.getvalue())
    assert line[name] == "[redacted]" and "SECRET" not in out.getvalue()
    assert (line["kid"], line["amount"]) == ("k1", 5)
