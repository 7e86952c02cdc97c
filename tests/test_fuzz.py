"""Fuzzing, bounded: the ticket parser, the request decoders and validators, the record decoders.

Hypothesis drives every input; a crash (the Cython decoders parse bytes in C) or an exception
of a kind the caller does not expect fails the test. ``HONGBAO_FUZZ_EXAMPLES`` raises the
number of examples per test (default 300 here; ``make chaos`` runs 20,000). Inputs found
once are kept below as explicit regression cases (``@example``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hotpath
from gateway import errors
from gateway.config import Settings
from gateway.domain import records
from gateway.domain.audit import audit
from gateway.ledger import MemoryLedger
from gateway.security import tickets
from gateway.transport.servicers._boundary import Undecodable, decoder
from gateway.usecases.cards import CardPayments
from gateway.usecases.sending import SendCommand, Sending
from hongbao.v1 import (
    admin_pb2,
    auth_pb2,
    envelope_pb2,
    moments_pb2,
    notification_pb2,
    wallet_pb2,
)

EXAMPLES = int(os.environ.get("HONGBAO_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return tickets.KeyRing.load_or_create(tmp_path_factory.mktemp("fuzz-keys"))


def _near_tickets(ring) -> st.SearchStrategy[str]:
    """Real tickets with one character changed, cut, or extended: the interesting inputs."""
    good = tickets.mint(ring, "fuzz-user", ["pay", "read"], 600)[0]
    return st.one_of(
        st.text(max_size=400),
        st.builds(lambda i, c: good[:i] + c + good[i + 1:], st.integers(0, len(good) - 1),
                  st.characters()),
        st.builds(lambda i: good[:i], st.integers(0, len(good))),
        st.builds(lambda t: good + t, st.text(max_size=20)),
    )


def test_the_ticket_parser_only_ever_says_unauthenticated(ring):
    @FUZZ
    @given(text=_near_tickets(ring))
    @example(text="v1." + "." * 3)
    @example(text="v1.k1.\x00.\x00")
    def check(text):
        try:
            claims = tickets.verify(ring, text)
        except errors.Unauthenticated as err:
            assert err.reason.startswith("TICKET_")
        else:
            assert claims.subject == "fuzz-user"
        assert isinstance(tickets.subject_hint(text), str)
        assert isinstance(tickets.subject_hint_of_header("Bearer " + text), str)
    check()


# Every request type of every service the gateway registers, from the descriptors.
REQUEST_TYPES = sorted({message_factory.GetMessageClass(m.input_type)
                        for pb2 in (admin_pb2, auth_pb2, envelope_pb2, moments_pb2,
                                    notification_pb2, wallet_pb2)
                        for service in pb2.DESCRIPTOR.services_by_name.values()
                        for m in service.methods}, key=lambda c: c.DESCRIPTOR.full_name)


@pytest.mark.parametrize("message", REQUEST_TYPES, ids=lambda m: m.DESCRIPTOR.name)
def test_request_decoders_never_raise(message):
    decode = decoder(message)
    valid = message().SerializeToString()

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=300),
                          st.builds(lambda a, b: a + b, st.just(valid), st.binary(max_size=40))))
    @example(data=b"\x0a\x02\xff\xfe")    # a string field that is not UTF-8
    @example(data=b"\x08\xff")            # a truncated varint
    def check(data):
        got = decode(data)
        assert isinstance(got, message | Undecodable)
        if isinstance(got, Undecodable):
            assert got.error().reason == "BAD_MESSAGE"
    check()


def _sending() -> tuple[Sending, MemoryLedger]:
    ledger = MemoryLedger()
    s = Settings()
    return Sending(ledger, s, CardPayments(ledger, s, None)), ledger


def test_send_validation_refuses_precisely_and_books_balance():
    """Any SendEnvelope a client can express: a result, or a GatewayError; nothing else."""
    sending, ledger = _sending()
    i64 = st.integers(-(2**63), 2**63 - 1)

    @FUZZ
    @given(rid=st.text(max_size=70), total=st.one_of(i64, st.integers(0, 30_000)),
           count=st.integers(-(2**31), 2**31 - 1), kind=st.integers(-5, 5),
           greeting=st.text(max_size=80), pay=st.integers(-2, 6),
           card=st.text(max_size=30), expires=i64)
    def check(rid, total, count, kind, greeting, pay, card, expires):
        cmd = SendCommand(rid, total, count, kind, greeting, pay, card, expires)
        try:
            asyncio.run(sending.send("fuzz-sender", cmd))
        except errors.GatewayError as err:
            assert err.reason and err.code is not None
    check()
    report = ledger.read(audit)
    assert report.balanced, report.discrepancies


DECODERS = [
    ("envelope", hotpath.unpack_envelope), ("grab", hotpath.unpack_grab),
    ("transfer", hotpath.unpack_transfer), ("i64", hotpath.unpack_i64),
    ("envelope header", hotpath.envelope_header),
    ("wallet entry", records.unpack_wallet_entry),
    ("notice", lambda b: records.unpack_notice(1, b)),
    ("env meta", records.unpack_env_meta), ("send result", records.unpack_send_result),
    ("unlock", records.unpack_unlock), ("payment", records.unpack_payment),
]
# What a decoder may raise on bytes that are not its record: ValueError and its kin
# (UnicodeDecodeError, json.JSONDecodeError), struct.error, TypeError; never anything else,
# and never a crash of the process.
DECODE_ERRORS = (ValueError, struct.error, TypeError, KeyError, IndexError)


@pytest.mark.parametrize("name, decode", DECODERS, ids=[d[0] for d in DECODERS])
def test_record_decoders_refuse_garbage_without_crashing(name, decode):
    @FUZZ
    @given(data=st.binary(max_size=600))
    @example(data=b"")
    @example(data=b"\xff" * 48)
    def check(data):
        with contextlib.suppress(DECODE_ERRORS):
            decode(data)
    check()
