"""Bound cards (WalletService/BindCard, UnbindCard, ListCards) over a real gateway, and the
ledger's part on both backends; nothing of it moves money, and the books stay balanced."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.config import Settings
from gateway.errors import GatewayError, reason_of
from gateway.usecases.bound import BoundCards
from hongbao.v1 import wallet_pb2
from tests.conftest import run
from tests.test_ledger import BACKENDS, make_ledger

A, B, C = "icbc-6222000000000001", "ccb-6217000000000002", "boc-6013000000000003"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ledger_keeps_cards_in_order_of_preference(tmp_path, backend):
    """Bound last, or first when preferred; binding again is a no-op, unbinding what is not
    bound too; past the limit TOO_MANY_CARDS and nothing changes."""
    led = make_ledger(backend, tmp_path)
    try:
        async def scenario():
            assert await led.bind_card("u", A, preferred=False, limit=3) == [A]
            assert await led.bind_card("u", B, preferred=False, limit=3) == [A, B]
            assert await led.bind_card("u", B, preferred=False, limit=3) == [A, B]
            assert await led.bind_card("u", B, preferred=True, limit=3) == [B, A]
            assert await led.bind_card("u", C, preferred=True, limit=3) == [C, B, A]
            with pytest.raises(GatewayError) as info:
                await led.bind_card("u", "abc-1", preferred=False, limit=3)
            assert info.value.reason == "TOO_MANY_CARDS"
            assert await led.bound_cards("u") == [C, B, A]
            assert await led.unbind_card("u", B) == ([C, A], True)
            assert await led.unbind_card("u", B) == ([C, A], False)
            assert await led.bound_cards("other") == []
        run(scenario())
        assert run(led.audit()).balanced
    finally:
        led.close()


def test_a_workers_cache_is_trusted_for_its_ttl_and_dropped_on_its_own_change(tmp_path):
    """A list read is cached for the TTL; this worker's bind drops it at once; a change
    behind the cache's back shows once the TTL has passed."""
    led = make_ledger("memory", tmp_path)
    now = [0.0]
    cards = BoundCards(led, Settings(cards_cache_ttl_s=1.0), clock=lambda: now[0])

    async def scenario():
        await cards.bind("u", "r1", A, False)
        assert await cards.list("u") == [A]
        await led.bind_card("u", B, preferred=False, limit=10)   # another worker's change
        assert await cards.list("u") == [A]
        now[0] = 1.5
        assert await cards.list("u") == [A, B]
        await cards.unbind("u", "r2", A)
        assert await cards.list("u") == [B]
    run(scenario())
    led.close()


def _call(stack, fn, user="carol", scopes=("pay", "grab", "read")):
    async def go():
        async with Client(stack.target) as c:
            return await fn(c, stack.meta(user, scopes))
    return asyncio.run(go())


def test_bind_list_unbind_through_the_gateway(stack):
    """The calls as a client makes them; bad card ids are refused with their reasons; a
    read-only ticket may list but not bind."""
    bind = lambda card, pref=False: lambda c, md: c.wallet.BindCard(  # noqa: E731
        wallet_pb2.BindCardRequest(request_id="r", card_id=card, preferred=pref), metadata=md)
    _call(stack, bind(A))
    got = _call(stack, bind(B, True))
    assert [(x.card_id, x.bank_id) for x in got.cards] == [(B, "ccb"), (A, "icbc")]
    listed = _call(stack, lambda c, md: c.wallet.ListCards(wallet_pb2.ListCardsRequest(),
                                                            metadata=md), scopes=("read",))
    assert [x.card_id for x in listed.cards] == [B, A]
    for card, reason in (("nonsense", "BAD_CARD_ID"), ("zzz-1234", "UNKNOWN_BANK")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _call(stack, bind(card))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(info.value) == reason
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _call(stack, bind(C), scopes=("read",))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    gone = _call(stack, lambda c, md: c.wallet.UnbindCard(
        wallet_pb2.UnbindCardRequest(request_id="u", card_id=B), metadata=md))
    assert gone.removed and [x.card_id for x in gone.cards] == [A]
    again = _call(stack, lambda c, md: c.wallet.UnbindCard(
        wallet_pb2.UnbindCardRequest(request_id="u", card_id=B), metadata=md))
    assert not again.removed
