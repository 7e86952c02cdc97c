"""MomentsService/UnlockPhoto: paid unlocks against a real server, free unlocks under pressure.

The paid path runs end to end (bank simulator and gateway processes, gRPC over
loopback, reconcile at the end), and so does the free path once, with the
admission level pinned. The free share's steps are driven at the use-case
level over real ledgers (LMDB in tmp_path, and memory), with a Pressure whose
windows the test closes itself, since the share only moves when one does.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.client import Client
from gateway.config import Settings
from gateway.domain.keys import payment_id_for, unlock_id
from gateway.domain.model import Payment, PaymentKind, PaymentStatus, TxKind
from gateway.errors import reason_of
from gateway.ledger import BooksLedger, LmdbLedger, MemoryLedger
from gateway.qos.controller import MAX_LEVEL, USER_LEVELS, priority_of, salt_of
from gateway.qos.pressure import MOMENTS_FREE, Pressure
from gateway.usecases import Moments
from gateway.usecases.moments import free_point
from hongbao.v1 import admin_pb2, moments_pb2, notification_pb2, wallet_pb2
from tests.conftest import run
from tests.test_gateway import balance, top_up

PHOTO_UNLOCK = wallet_pb2.TRANSACTION_KIND_PHOTO_UNLOCK
PHOTO_INCOME = wallet_pb2.TRANSACTION_KIND_PHOTO_INCOME
P3_PARTLY_SHED = 3 * 128 + 126  # all of P0..P2 admitted, P3 but its lowest priority
CALM = MAX_LEVEL


async def unlock(c: Client, meta, owner: str, rid: str = "u1", photo: str = "ph1"):
    return await c.moments.UnlockPhoto(
        moments_pb2.UnlockPhotoRequest(request_id=rid, photo_id=photo, owner_id=owner),
        metadata=meta, timeout=10)


async def entries(c: Client, meta) -> list[tuple[int, int, str]]:
    page = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(page_size=100),
                                           metadata=meta, timeout=10)
    return [(t.kind, t.amount_fen, t.reference_id) for t in page.transactions]


async def qos(c: Client, admin_meta) -> admin_pb2.GetQosStatusResponse:
    return await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=admin_meta,
                                      timeout=10)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


# -- against a real server ------------------------------------------------------------------

def test_paid_unlock_moves_unlock_fen_from_viewer_to_owner(stack):
    """A paid unlock moves exactly unlock_fen between the two wallets, both list it, the
    owner is told, and reflection lists the service."""
    async def scenario():
        async with Client(stack.target) as c:
            alice, bob = stack.meta("alice"), stack.meta("bob")
            await top_up(c, alice, 1000)
            assert (await balance(c, bob)).balance_fen == 0
            r = await unlock(c, alice, "bob")
            assert (r.amount_fen, r.free) == (100, False)
            assert r.payment_id == unlock_id("alice", "u1", free=False)
            assert (await balance(c, alice)).balance_fen == 900
            assert (await balance(c, bob)).balance_fen == 100
            assert (await entries(c, alice))[0] == (PHOTO_UNLOCK, -100, r.payment_id)
            assert await entries(c, bob) == [(PHOTO_INCOME, 100, r.payment_id)]
            call = c.notifications.WatchNotifications(
                notification_pb2.WatchNotificationsRequest(), metadata=bob)
            async with asyncio.timeout(10):
                event = (await call.read()).notification
            call.cancel()
            assert (event.kind, event.amount_fen, event.payment_id) == (
                notification_pb2.NOTIFICATION_KIND_CREDITED, 100, r.payment_id)
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            refl = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]))
            async for resp in refl:
                names = {s.name for s in resp.list_services_response.service}
                break
            assert "hongbao.v1.MomentsService" in names
    run(scenario())


def test_retry_returns_the_first_unlock_and_another_payload_is_refused(stack):
    """A retried unlock pays once; the same request_id with another photo or owner is refused."""
    async def scenario():
        async with Client(stack.target) as c:
            cat = stack.meta("cat")
            await top_up(c, cat, 1000)
            first = await unlock(c, cat, "dan", rid="same")
            again = await unlock(c, cat, "dan", rid="same")
            assert again == first
            for owner, photo in (("dan", "ph2"), ("eve", "ph1")):
                err = await refused(unlock(c, cat, owner, rid="same", photo=photo))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert reason_of(err) == "REQUEST_ID_REUSED"
            assert (await balance(c, cat)).balance_fen == 900
            assert (await balance(c, stack.meta("dan"))).balance_fen == 100
            assert (await balance(c, stack.meta("eve"))).balance_fen == 0
            assert len(await entries(c, cat)) == 2  # the top-up and one unlock
    run(scenario())


def test_insufficient_balance_is_refused_and_changes_nothing(stack):
    """A wallet short of unlock_fen gets FAILED_PRECONDITION INSUFFICIENT_BALANCE, nothing
    moves or is recorded, and the same request_id pays once the wallet covers it."""
    async def scenario():
        async with Client(stack.target) as c:
            fay, gus = stack.meta("fay"), stack.meta("gus")
            await top_up(c, fay, 99)
            err = await refused(unlock(c, fay, "gus"))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(err) == "INSUFFICIENT_BALANCE"
            assert (await balance(c, fay)).balance_fen == 99
            assert (await balance(c, gus)).balance_fen == 0
            assert len(await entries(c, fay)) == 1 and await entries(c, gus) == []
            await top_up(c, fay, 1, rid="t2")
            r = await unlock(c, fay, "gus")
            assert (r.amount_fen, r.free) == (100, False)
            assert (await balance(c, fay)).balance_fen == 0
    run(scenario())


BAD_INPUTS = [
    ({"request_id": ""}, "BAD_REQUEST_ID"),
    ({"request_id": "r" * 65}, "BAD_REQUEST_ID"),
    ({"request_id": "has space"}, "BAD_REQUEST_ID"),
    ({"photo_id": ""}, "BAD_PHOTO_ID"),
    ({"photo_id": "p" * 65}, "BAD_PHOTO_ID"),
    ({"photo_id": "ph/1"}, "BAD_PHOTO_ID"),
    ({"owner_id": ""}, "BAD_USER_ID"),
    ({"owner_id": "o" * 65}, "BAD_USER_ID"),
    ({"owner_id": "bob!"}, "BAD_USER_ID"),
    ({"owner_id": "hal"}, "OWNER_IS_VIEWER"),
]


def test_bad_input_and_missing_scope_are_refused_precisely(stack):
    """Each malformed field, the caller as owner, a ticket without `pay` and no ticket get
    their own code and reason, and none of them changes anything."""
    async def scenario():
        async with Client(stack.target) as c:
            hal, ida = stack.meta("hal"), stack.meta("ida")
            await top_up(c, hal, 1000)
            before = await entries(c, hal)
            for fields, reason in BAD_INPUTS:
                req = {"request_id": "u1", "photo_id": "ph1", "owner_id": "ida", **fields}
                err = await refused(c.moments.UnlockPhoto(
                    moments_pb2.UnlockPhotoRequest(**req), metadata=hal, timeout=10))
                assert (err.code(), reason_of(err)) == (
                    grpc.StatusCode.INVALID_ARGUMENT, reason), fields
            err = await refused(unlock(c, stack.meta("hal", ("read", "grab")), "ida"))
            assert (err.code(), reason_of(err)) == (
                grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
            err = await refused(unlock(c, (), "ida"))
            assert (err.code(), reason_of(err)) == (
                grpc.StatusCode.UNAUTHENTICATED, "TICKET_MISSING")
            assert (await balance(c, hal)).balance_fen == 1000
            assert await entries(c, hal) == before and await entries(c, ida) == []
            # None of the refusals left a record: the request_id is still free to use.
            assert (await unlock(c, hal, "ida")).amount_fen == 100
    run(scenario())


def test_unlock_fen_comes_from_the_config(stack, tmp_path):
    """With unlock_fen = 250 an unlock costs 250; a retry of one paid at 100 still says 100."""
    async def first():
        async with Client(stack.target) as c:
            jo = stack.meta("jo")
            await top_up(c, jo, 1000)
            return await unlock(c, jo, "kim", rid="old")

    paid_at_100 = run(first())
    config = tmp_path / "moments.toml"
    config.write_text("unlock_fen = 250\n")
    assert stack.gateway is not None
    stack.gateway.stop()
    stack.start_gateway("--config", str(config))

    async def second():
        async with Client(stack.target) as c:
            jo = stack.meta("jo")
            assert await unlock(c, jo, "kim", rid="old") == paid_at_100
            r = await unlock(c, jo, "kim", rid="new")
            assert (r.amount_fen, r.free) == (250, False)
            assert (await balance(c, jo)).balance_fen == 1000 - 100 - 250
            assert (await balance(c, stack.meta("kim"))).balance_fen == 350
            assert (await entries(c, jo))[0] == (PHOTO_UNLOCK, -250, r.payment_id)
    run(second())


def _admitted_below_510(candidates: list[str]) -> str:
    """A user whose P3 calls level 510 admits in this salt hour and the next (the hourly
    salt of gateway.qos.controller, no secret: what the gateway computes)."""
    epoch = int(time.time() // 3600)
    for user in candidates:
        if all(priority_of(user, salt_of(e)) < USER_LEVELS - 1 for e in (epoch, epoch + 1)):
            return user
    raise AssertionError("no candidate user is admitted at level 510")


def test_pressure_on_a_real_server_frees_new_unlocks_and_a_paid_one_stays_paid(stack, tmp_path):
    """With the level pinned where P3 is under pressure the free share climbs to 1.0: new
    unlocks are free and move nothing, and a request_id paid before still answers paid."""
    viewer = _admitted_below_510([f"viewer{i}" for i in range(20)])

    async def calm():
        async with Client(stack.target) as c:
            await top_up(c, stack.meta(viewer), 1000)
            return await unlock(c, stack.meta(viewer), "lee", rid="paid")

    paid = run(calm())
    config = tmp_path / "pressure.toml"
    config.write_text(f"qos_pin_level = {P3_PARTLY_SHED}\nqos_window_s = 0.1\n")
    assert stack.gateway is not None
    stack.gateway.stop()
    stack.start_gateway("--config", str(config))

    async def pressured():
        async with Client(stack.target) as c:
            meta, admin = stack.meta(viewer), stack.meta("ops", ("admin",))
            async with asyncio.timeout(20):
                while (await qos(c, admin)).admission.moments_free_share < 1.0:
                    await asyncio.sleep(0.05)
            before = [await entries(c, u) for u in (meta, stack.meta("lee"))]
            for i in range(20):
                r = await unlock(c, meta, "lee", rid=f"new{i}")
                assert (r.free, r.amount_fen) == (True, 0)
                assert r.payment_id == unlock_id(viewer, f"new{i}", free=True)
            assert await unlock(c, meta, "lee", rid="paid") == paid
            assert (await balance(c, meta)).balance_fen == 900
            assert (await balance(c, stack.meta("lee"))).balance_fen == 100
            assert [await entries(c, u) for u in (meta, stack.meta("lee"))] == before
            served = {d.name: d.served for d in (await qos(c, admin)).degradations}
            assert served["moments_free"] == 20
    run(pressured())


# -- the free share, over real ledgers ------------------------------------------------------

@pytest.fixture(params=("lmdb", "memory"))
def ledger(request, tmp_path):
    led: BooksLedger = LmdbLedger(tmp_path) if request.param == "lmdb" else MemoryLedger()
    yield led
    led.close()


async def _fund(led: BooksLedger, user: str, amount: int) -> None:
    intent = Payment(payment_id_for(user, PaymentKind.TOP_UP, "t"), user, PaymentKind.TOP_UP,
                     "icbc-1", "icbc", amount, PaymentStatus.PENDING)
    p, _created = await led.begin_payment(intent, b"f" * 16, 60_000)
    await led.finish_payment(p.payment_id, PaymentStatus.SUCCEEDED)


async def _wallets(led: BooksLedger, *users: str) -> list[int]:
    return [(await led.balance(u)).balance_fen for u in users]


def test_free_share_steps_up_to_all_free_and_back_down_to_paid(ledger):
    """Share 0: every unlock paid; each pressured window frees a growing share, up to all
    with no ledger change; retries keep their answer; calm windows bring payment back."""
    async def scenario():
        pressure = Pressure(free_step=0.25)
        moments = Moments(ledger, Settings(), pressure)
        await _fund(ledger, "vee", 100_000)
        first = [await moments.unlock("vee", f"s0-{i}", "ph", "wyn") for i in range(20)]
        assert all(not r.free and r.amount_fen == 100 for r in first)
        paid, free = list(first), []
        for step in (1, 2, 3, 4):
            pressure.update(P3_PARTLY_SHED)
            share = 0.25 * step
            assert pressure.free_share == pytest.approx(share)
            before, audit0 = await _wallets(ledger, "vee", "wyn"), await ledger.audit()
            rids = [f"s{step}-{i}" for i in range(100)]
            got = {rid: await moments.unlock("vee", rid, "ph", "wyn") for rid in rids}
            assert {rid for rid, r in got.items() if r.free} == {
                rid for rid in rids if free_point("vee", rid) < share}
            for rid, r in got.items():
                (free if r.free else paid).append(r)
                assert r.amount_fen == (0 if r.free else 100)
                assert r.payment_id == unlock_id("vee", rid, free=r.free)
                assert await moments.unlock("vee", rid, "ph", "wyn") == r  # same share
            if step == 4:
                assert all(r.free for r in got.values())
                assert await _wallets(ledger, "vee", "wyn") == before
                assert (await ledger.audit()).totals == audit0.totals
        assert pressure.served[MOMENTS_FREE] == 2 * len(free)  # each answer and its retry
        # At share 1.0 a paid request_id is still answered with its payment.
        assert await moments.unlock("vee", "s0-0", "ph", "wyn") == first[0]
        for _ in range(4):
            pressure.update(CALM)
        assert pressure.free_share == 0.0
        again = await moments.unlock("vee", "s4-0", "ph", "wyn")  # free at share 1.0
        assert (again.free, again.amount_fen) == (False, 100)
        spent = 100 * (len(paid) + 1)
        assert await _wallets(ledger, "vee", "wyn") == [100_000 - spent, spent]
        report = await ledger.audit()
        assert report.balanced and report.totals["unlocks"] == len(paid) + 1
        assert report.totals["unlock_fen"] == spent

    run(scenario())


def test_free_decision_is_fixed_per_request_and_spread_evenly():
    """The free point is a pure function of (viewer, request_id) in [0, 1); about a quarter of
    request ids fall below 0.25."""
    points = [free_point("vee", f"r{i}") for i in range(4000)]
    assert points == [free_point("vee", f"r{i}") for i in range(4000)]
    assert all(0.0 <= p < 1.0 for p in points)
    assert 0.22 < sum(p < 0.25 for p in points) / len(points) < 0.28
    assert free_point("vee", "r1") != free_point("wyn", "r1")


def test_free_unlock_checks_input_first_and_needs_no_money():
    """Under full pressure bad input is still refused, and an empty wallet unlocks for free."""
    async def scenario():
        led = MemoryLedger()
        pressure = Pressure(free_step=1.0)
        pressure.update(P3_PARTLY_SHED)
        moments = Moments(led, Settings(), pressure)
        with pytest.raises(errors.InvalidArgument) as exc:
            await moments.unlock("zed", "r1", "ph", "zed")
        r = await moments.unlock("zed", "r1", "ph", "amy")
        audit = await led.audit()
        led.close()
        return exc.value, r, audit

    err, r, audit = run(scenario())
    assert err.reason == "OWNER_IS_VIEWER"
    assert r.free and r.amount_fen == 0
    assert audit.balanced and audit.totals["transfers"] == 0


_STEPS = st.lists(st.one_of(
    st.tuples(st.just("unlock"), st.sampled_from(("a", "b", "c")),
              st.sampled_from(("a", "b", "c")), st.integers(0, 5)),
    st.tuples(st.just("window"), st.booleans())), max_size=40)


@settings(deadline=None, max_examples=60)
@given(steps=_STEPS)
def test_any_run_of_unlocks_and_windows_keeps_the_money(steps):
    """Whatever the unlocks and pressure windows, the money is conserved, each viewer pays
    unlock_fen once per distinct paid request_id, and the books balance."""
    async def scenario():
        led = MemoryLedger()
        pressure = Pressure(free_step=0.5)
        moments = Moments(led, Settings(unlock_fen=30), pressure)
        for user in ("a", "b", "c"):
            await _fund(led, user, 100)
        paid: dict[str, set[str]] = {"a": set(), "b": set(), "c": set()}
        for step in steps:
            if step[0] == "window":
                pressure.update(P3_PARTLY_SHED if step[1] else CALM)
                continue
            _kind, viewer, owner, n = step
            try:
                r = await moments.unlock(viewer, f"r{n}", "ph", owner)
            except errors.GatewayError as err:
                assert err.reason in ("OWNER_IS_VIEWER", "INSUFFICIENT_BALANCE",
                                      "REQUEST_ID_REUSED"), err.reason
                continue
            if not r.free:
                paid[viewer].add(f"r{n}")
        report = await led.audit()
        balances = await _wallets(led, "a", "b", "c")
        pages = {u: (await led.list_transactions(u, 100, None)).entries for u in paid}
        led.close()
        return report, balances, paid, pages

    report, balances, paid, pages = run(scenario())
    assert report.balanced, report.discrepancies
    assert sum(balances) == 300 and all(b >= 0 for b in balances)
    assert report.totals["unlocks"] == sum(len(rids) for rids in paid.values())
    for user, rids in paid.items():
        spent = [e for e in pages[user] if e.kind == TxKind.PHOTO_UNLOCK]
        assert len(spent) == len(rids) and all(e.amount_fen == -30 for e in spent)
