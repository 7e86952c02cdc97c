"""WalletService: thin translation between hongbao.v1 and the wallet and card use cases."""

from __future__ import annotations

from gateway.transport.servicers._boundary import limited_subject, maps_errors, subject
from gateway.transport.servicers._convert import timestamp_ms
from gateway.usecases import Gateway
from hongbao.v1 import wallet_pb2 as pb
from hongbao.v1 import wallet_pb2_grpc


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    @maps_errors
    async def GetBalance(self, request, context):
        b = await self._gw.wallet.balance(subject())
        return pb.GetBalanceResponse(balance_fen=b.balance_fen,
                                     pending_credit_fen=b.pending_credit_fen,
                                     stale=b.stale, as_of=timestamp_ms(b.as_of_ms))

    @maps_errors
    async def ListTransactions(self, request, context):
        page = await self._gw.wallet.list_transactions(subject(), request.page_size,
                                                       request.page_token)
        return pb.ListTransactionsResponse(
            transactions=[pb.Transaction(
                transaction_id=e.transaction_id, kind=int(e.kind), amount_fen=e.amount_fen,
                reference_id=e.reference_id, created_at=timestamp_ms(e.created_at_ms))
                for e in page.entries],
            next_page_token=page.next_page_token, stale=page.stale)

    @maps_errors
    async def TopUp(self, request, context):
        user = limited_subject(self._gw.limits)
        p = await self._gw.cards.top_up(user, request.request_id, request.card_id,
                                  request.amount_fen)
        return pb.TopUpResponse(payment_id=p.payment_id, status=int(p.status))

    @maps_errors
    async def BindCard(self, request, context):
        cards = await self._gw.bound.bind(subject(), request.request_id, request.card_id,
                                          request.preferred)
        return pb.BindCardResponse(cards=_cards(cards))

    @maps_errors
    async def UnbindCard(self, request, context):
        cards, removed = await self._gw.bound.unbind(subject(), request.request_id,
                                                     request.card_id)
        return pb.UnbindCardResponse(cards=_cards(cards), removed=removed)

    @maps_errors
    async def ListCards(self, request, context):
        return pb.ListCardsResponse(cards=_cards(await self._gw.bound.list(subject())))

    @maps_errors
    async def Withdraw(self, request, context):
        user = limited_subject(self._gw.limits)
        p = await self._gw.cards.withdraw(user, request.request_id, request.card_id,
                                    request.amount_fen)
        return pb.WithdrawResponse(payment_id=p.payment_id, status=int(p.status))


def _cards(cards: list[str]) -> list[pb.BoundCard]:
    # A bound card id was checked at binding: <bank>-<digits>.
    return [pb.BoundCard(card_id=c, bank_id=c.partition("-")[0]) for c in cards]
