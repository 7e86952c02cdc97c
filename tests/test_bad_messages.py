"""A body that is not a valid message of its type: INVALID_ARGUMENT BAD_MESSAGE, nothing changes.

Raw bytes are sent on a real channel (no stub could build them): a string field that
is not UTF-8, a truncated varint, a length running past the end. grpc alone would
answer the unary ones UNKNOWN with an internal DecodeError text and leave a server
stream waiting for its deadline.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import Client
from gateway.errors import reason_of
from hongbao.v1 import envelope_pb2, wallet_pb2

BAD_UTF8_GREETING = envelope_pb2.SendEnvelopeRequest(
    request_id="bad-1", total_fen=100, count=1, kind=envelope_pb2.ENVELOPE_KIND_LUCKY,
    pay_method=envelope_pb2.PAY_METHOD_BALANCE).SerializeToString() + b"\x2a\x02\xff\xfe"
TRUNCATED_VARINT = b"\x08\xff"
PAST_THE_END = b"\x0a\x7fabc"


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def _stream_refused(call) -> tuple[list, grpc.aio.AioRpcError]:
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for response in call:
            got.append(response)
    return got, err.value


def _is_bad_message(err: grpc.aio.AioRpcError, type_name: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert reason_of(err) == "BAD_MESSAGE"
    assert f"not a valid hongbao.v1.{type_name}" in err.details()
    assert "Unexpected" not in err.details()


def test_undecodable_bodies_are_invalid_argument_and_change_nothing(stack):
    async def scenario():
        meta = stack.meta("bad-msg")
        batch_meta = stack.meta("bad-msg-batcher", scopes=("batch",))
        async with Client(stack.target) as c:
            ch = c.channel
            before = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta)
            send = ch.unary_unary("/hongbao.v1.EnvelopeService/SendEnvelope")
            err = await _refused(send(BAD_UTF8_GREETING, metadata=meta, timeout=5))
            _is_bad_message(err, "SendEnvelopeRequest")
            assert "UTF-8" in err.details()
            for body in (TRUNCATED_VARINT, PAST_THE_END):
                topup = ch.unary_unary("/hongbao.v1.WalletService/TopUp")
                _is_bad_message(await _refused(topup(body, metadata=meta, timeout=5)),
                                "TopUpRequest")
            watch = ch.unary_stream("/hongbao.v1.NotificationService/WatchNotifications")
            got, err = await _stream_refused(watch(TRUNCATED_VARINT, metadata=meta, timeout=5))
            assert got == []
            _is_bad_message(err, "WatchNotificationsRequest")
            # BatchGrab: a good batch is answered, then the undecodable one ends the stream.
            good = envelope_pb2.BatchGrabRequest(batch_id=7, items=[envelope_pb2.BatchGrabItem(
                user_id="u1", envelope_id="nope", request_id="r1")]).SerializeToString()
            bad_item = b"\x12\x04\x0a\x02\xff\xfe"  # items[0].user_id is not UTF-8
            batch = ch.stream_stream("/hongbao.v1.EnvelopeService/BatchGrab",
                                     response_deserializer=envelope_pb2.BatchGrabResponse.FromString)
            got, err = await _stream_refused(batch(iter([good, bad_item]), metadata=batch_meta,
                                                   timeout=5))
            assert [r.batch_id for r in got] == [7]
            _is_bad_message(err, "BatchGrabRequest")
            after = await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=meta)
            assert (after.balance_fen, after.pending_credit_fen) == (
                before.balance_fen, before.pending_credit_fen)
            listed = await c.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(),
                                                     metadata=meta)
            assert list(listed.transactions) == []
    asyncio.run(scenario())
