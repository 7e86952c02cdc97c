"""Tickets: format, every refusal reason, key rotation and the key file."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidArgument, Unauthenticated
from gateway.security import tickets
from gateway.security.tickets import Claims, KeyFileError, KeyRing, mint, verify

NOW = 1_760_000_000.0


@pytest.fixture
def ring(tmp_path):
    return KeyRing.load_or_create(tmp_path)


def reason(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.reason


def test_round_trip(ring):
    """A minted ticket verifies to exactly the claims it was minted with."""
    ticket, expires_at = mint(ring, "user:42", ["pay", "read"], 600, now=NOW)
    claims = verify(ring, ticket, now=NOW + 1)
    assert isinstance(claims, Claims)
    assert claims.subject == "user:42"
    assert claims.scopes == frozenset({"pay", "read"})
    assert claims.issued_at == int(NOW)
    assert claims.expires_at == expires_at == int(NOW) + 600
    assert claims.key_id == ring.signing_kid
    assert len(claims.ticket_id) == 32  # 128 random bits, hex


def test_ticket_text_format(ring):
    """Tickets read v1.<kid>.<payload>.<sig>, header-safe base64url with a 43-char signature."""
    ticket, _ = mint(ring, "u", ["grab"], 60, now=NOW)
    version, kid, _payload, sig = ticket.split(".")
    assert (version, kid) == ("v1", ring.signing_kid)
    assert len(sig) == 43
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert set(ticket) <= alphabet
    assert len(ticket) <= tickets.MAX_TICKET_LEN


def test_signature_is_standard_hmac_sha256(ring):
    """The signature is plain HMAC-SHA256 of 'v1.<kid>.<payload>' under the signing key."""
    ticket, _ = mint(ring, "u", ["grab"], 60, now=NOW)
    signed, _, sig = ticket.rpartition(".")
    key = ring._keys[-1].secret
    expected = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    assert sig == tickets._b64encode(expected)


def test_ticket_ids_are_unique(ring):
    """Two tickets minted with the same claims in the same second still differ."""
    a, _ = mint(ring, "u", ["pay"], 60, now=NOW)
    b, _ = mint(ring, "u", ["pay"], 60, now=NOW)
    assert a != b
    assert verify(ring, a, now=NOW).ticket_id != verify(ring, b, now=NOW).ticket_id


@pytest.mark.parametrize("subject", ["user 1", "a/b", "a\n", "a\x00b", "x" * 65])
def test_verify_refuses_a_signed_subject_mint_would_refuse(ring, subject, monkeypatch):
    """An issuer holding the key cannot widen the subject rule: verify applies mint's."""
    import re
    monkeypatch.setattr(tickets, "_SUBJECT_RE", re.compile(r"[\x00-\x7f]{1,200}"))
    ticket, _ = mint(ring, subject, ["pay"], 60, now=NOW)
    monkeypatch.undo()
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=NOW)
    assert reason(excinfo) == "TICKET_MALFORMED"


@pytest.mark.parametrize("subject", ["", "x" * 65, "user 1", "用户", "a/b", "a\n"])
def test_mint_refuses_bad_subject(ring, subject):
    """A subject outside 1..64 of [A-Za-z0-9._:-] is refused with BAD_TICKET_REQUEST."""
    with pytest.raises(InvalidArgument) as excinfo:
        mint(ring, subject, ["pay"], 60)
    assert reason(excinfo) == "BAD_TICKET_REQUEST"


@pytest.mark.parametrize("ttl_s", [0, -1, 86_401, True, 1.5])
def test_mint_refuses_bad_ttl(ring, ttl_s):
    """A ttl outside 1..86400 whole seconds is refused with BAD_TICKET_REQUEST."""
    with pytest.raises(InvalidArgument) as excinfo:
        mint(ring, "u", ["pay"], ttl_s)
    assert reason(excinfo) == "BAD_TICKET_REQUEST"


@pytest.mark.parametrize("scopes", [["pay", "superuser"], ["PAY"], []])
def test_mint_refuses_unknown_or_no_scope(ring, scopes):
    """Every scope must be one of SCOPES, and there must be at least one."""
    with pytest.raises(InvalidArgument) as excinfo:
        mint(ring, "u", scopes, 60)
    assert reason(excinfo) == "BAD_TICKET_REQUEST"


def test_mint_accepts_every_scope_and_ttl_bounds(ring):
    """All five scopes fit in one ticket, and both ttl bounds are accepted."""
    for ttl_s in (1, 86_400):
        ticket, _ = mint(ring, "u", sorted(tickets.SCOPES), ttl_s, now=NOW)
        assert verify(ring, ticket, now=NOW).scopes == tickets.SCOPES


def test_missing(ring):
    """An empty ticket is TICKET_MISSING."""
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, "")
    assert reason(excinfo) == "TICKET_MISSING"


@pytest.mark.parametrize(
    "ticket",
    ["garbage", "v1.a.b", "v2.k.p.s", "v1.k.p.s.x", "v1." + "a" * 300, "v1.ké.p.s"],
)
def test_malformed(ring, ticket):
    """Text that is not four dot-separated ASCII fields starting 'v1' is TICKET_MALFORMED."""
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket)
    assert reason(excinfo) == "TICKET_MALFORMED"


def test_unknown_key(ring, tmp_path):
    """A ticket signed by a key this ring never had is TICKET_UNKNOWN_KEY."""
    other = KeyRing.load_or_create(tmp_path / "other")
    ticket, _ = mint(other, "u", ["pay"], 60, now=NOW)
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=NOW)
    assert reason(excinfo) == "TICKET_UNKNOWN_KEY"


def test_forged_signature(ring):
    """A ticket whose signature does not match is TICKET_FORGED."""
    ticket, _ = mint(ring, "u", ["pay"], 60, now=NOW)
    signed, _, sig = ticket.rpartition(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, f"{signed}.{flipped}", now=NOW)
    assert reason(excinfo) == "TICKET_FORGED"


def test_forged_payload(ring):
    """Claims edited to grant more scopes, with the old signature kept, are TICKET_FORGED."""
    ticket, _ = mint(ring, "u", ["read"], 60, now=NOW)
    version, kid, payload, sig = ticket.split(".")
    raw = bytearray(tickets._b64decode(payload))
    raw[16] = 31  # every scope bit
    forged = f"{version}.{kid}.{tickets._b64encode(bytes(raw))}.{sig}"
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, forged, now=NOW)
    assert reason(excinfo) == "TICKET_FORGED"


def test_expired_with_leeway(ring):
    """A ticket fails with TICKET_EXPIRED once past expiry plus the leeway, not before."""
    ticket, expires_at = mint(ring, "u", ["pay"], 60, now=NOW)
    verify(ring, ticket, now=expires_at + 29)
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=expires_at + 30)
    assert reason(excinfo) == "TICKET_EXPIRED"
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=expires_at, leeway_s=0)
    assert reason(excinfo) == "TICKET_EXPIRED"


def test_expiry_holds_for_cached_tickets(ring):
    """A ticket verified once (and so cached) still expires on time."""
    ticket, expires_at = mint(ring, "u", ["pay"], 60, now=NOW)
    verify(ring, ticket, now=NOW)
    assert ticket in ring._verified
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=expires_at + 31)
    assert reason(excinfo) == "TICKET_EXPIRED"


def test_not_yet_valid(ring):
    """A ticket issued beyond the leeway in the future is TICKET_NOT_YET_VALID."""
    ticket, _ = mint(ring, "u", ["pay"], 600, now=NOW + 100)
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, ticket, now=NOW)
    assert reason(excinfo) == "TICKET_NOT_YET_VALID"
    assert verify(ring, ticket, now=NOW + 71).subject == "u"  # within the 30 s leeway


def test_verify_uses_the_clock_by_default(ring):
    """Without 'now', a fresh ticket verifies and a long-expired one does not."""
    fresh, _ = mint(ring, "u", ["pay"], 60)
    assert verify(ring, fresh).subject == "u"
    old, _ = mint(ring, "u", ["pay"], 60, now=time.time() - 3600)
    with pytest.raises(Unauthenticated):
        verify(ring, old)


def test_rotation_keeps_old_key_until_retired(ring):
    """After rotate() the new key signs, the old one verifies until retired, then UNKNOWN_KEY."""
    old_kid = ring.signing_kid
    old_ticket, _ = mint(ring, "u", ["pay"], 60, now=NOW)
    new_kid = ring.rotate()
    assert new_kid != old_kid and ring.signing_kid == new_kid
    assert ring.key_ids == (old_kid, new_kid)
    new_ticket, _ = mint(ring, "u", ["pay"], 60, now=NOW)
    assert verify(ring, new_ticket, now=NOW).key_id == new_kid
    assert verify(ring, old_ticket, now=NOW).key_id == old_kid
    ring.retire(old_kid)
    with pytest.raises(Unauthenticated) as excinfo:
        verify(ring, old_ticket, now=NOW)
    assert reason(excinfo) == "TICKET_UNKNOWN_KEY"
    assert verify(ring, new_ticket, now=NOW).key_id == new_kid


def test_rotation_is_saved(ring):
    """Rotations and retirements reach the file: a fresh load sees the same keys."""
    first = ring.signing_kid
    ring.rotate()
    ring.retire(first)
    again = KeyRing.load_or_create(ring.path.parent)
    assert again.key_ids == ring.key_ids
    assert again.issuer_key == ring.issuer_key


def test_reload_picks_up_another_process_rotation(ring):
    """reload() installs keys rotated through another KeyRing on the same file."""
    other = KeyRing.from_file(ring.path)
    new_kid = other.rotate()
    ticket, _ = mint(other, "u", ["pay"], 60, now=NOW)
    with pytest.raises(Unauthenticated):
        verify(ring, ticket, now=NOW)
    ring.reload()
    assert verify(ring, ticket, now=NOW).key_id == new_kid


def test_retire_refuses_newest_and_unknown(ring):
    """The newest (signing) key cannot be retired, nor can an unknown id."""
    with pytest.raises(ValueError):
        ring.retire(ring.signing_kid)
    with pytest.raises(KeyError):
        ring.retire("nope")


def test_key_count_is_bounded(ring):
    """At most MAX_KEYS keys are kept; the oldest go first."""
    first = ring.signing_kid
    for _ in range(tickets.MAX_KEYS + 3):
        ring.rotate()
    assert len(ring.key_ids) == tickets.MAX_KEYS
    assert first not in ring.key_ids


def test_key_file_is_private_from_creation(tmp_path):
    """The key file is created 0600 even under a permissive umask."""
    old_umask = os.umask(0)
    try:
        ring = KeyRing.load_or_create(tmp_path / "data")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(ring.path.stat().st_mode) == 0o600
    ring.rotate()
    assert stat.S_IMODE(ring.path.stat().st_mode) == 0o600
    assert ring.path.name == "ticket_keys.json"
    assert [p.name for p in ring.path.parent.iterdir()] == ["ticket_keys.json"]


def test_load_or_create_reuses_existing_file(tmp_path):
    """A second load_or_create reads the keys the first one created."""
    a = KeyRing.load_or_create(tmp_path)
    b = KeyRing.load_or_create(tmp_path)
    ticket, _ = mint(a, "u", ["pay"], 60, now=NOW)
    assert verify(b, ticket, now=NOW).subject == "u"


def test_from_file_refuses_world_readable(ring):
    """from_file refuses a key file that group or others can read, naming the fix."""
    os.chmod(ring.path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyRing.from_file(ring.path)
    os.chmod(ring.path, 0o640)
    with pytest.raises(KeyFileError):
        KeyRing.from_file(ring.path)
    os.chmod(ring.path, 0o600)
    assert KeyRing.from_file(ring.path).key_ids == ring.key_ids


def test_from_file_requires_the_file(tmp_path):
    """from_file on a missing path fails clearly rather than creating keys."""
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyRing.from_file(tmp_path / "missing.json")
    assert not (tmp_path / "missing.json").exists()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(keys=[]),
        lambda d: d["keys"][0].update(secret="c2hvcnQ"),
        lambda d: d["keys"][0].update(kid="bad kid"),
        lambda d: d.pop("issuer_key"),
    ],
)
def test_from_file_refuses_malformed(ring, mutate):
    """A key file with a wrong version, no keys, a short secret, a bad id or no issuer key fails."""
    doc = json.loads(ring.path.read_text())
    mutate(doc)
    ring.path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="malformed"):
        KeyRing.from_file(ring.path)


def test_issuer_key(ring):
    """check_issuer_key accepts exactly the stored issuer key."""
    assert len(ring.issuer_key) >= 43
    assert ring.check_issuer_key(ring.issuer_key)
    assert not ring.check_issuer_key("")
    assert not ring.check_issuer_key(ring.issuer_key[:-1])
    assert not ring.check_issuer_key(ring.issuer_key + "x")
    assert not ring.check_issuer_key("é" * 43)


def test_repr_shows_no_secret(ring):
    """Neither the ring's repr nor a key's repr contains a secret."""
    secret_b64 = json.loads(ring.path.read_text())["keys"][0]["secret"]
    text = repr(ring) + repr(ring._keys)
    assert secret_b64 not in text and ring.issuer_key not in text
    assert str(ring._keys[0].secret) not in text


_RING_FOR_PROPERTY: list[KeyRing] = []


def _property_ring(tmp_path_factory) -> KeyRing:
    if not _RING_FOR_PROPERTY:
        _RING_FOR_PROPERTY.append(KeyRing.load_or_create(tmp_path_factory.mktemp("prop")))
    return _RING_FOR_PROPERTY[0]


@pytest.fixture(scope="module")
def prop_ticket(tmp_path_factory):
    ring = _property_ring(tmp_path_factory)
    ticket, _ = mint(ring, "user:prop", ["pay", "grab"], 3600, now=NOW)
    return ring, ticket


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_fails(prop_ticket, data):
    """Replacing any one byte of a genuine ticket with any other byte never verifies."""
    ring, ticket = prop_ticket
    raw = ticket.encode("ascii")
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="byte")
    changed = (raw[:index] + bytes([byte]) + raw[index + 1 :]).decode("latin-1")
    with pytest.raises(Unauthenticated):
        verify(ring, changed, now=NOW)
    # The genuine ticket still verifies: the failure was the change, not the ring.
    assert verify(ring, ticket, now=NOW).subject == "user:prop"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_is_refused_cleanly(prop_ticket, text):
    """Any text at all is either refused with Unauthenticated or is a genuine ticket."""
    ring, ticket = prop_ticket
    if text == ticket:
        return
    with pytest.raises(Unauthenticated):
        verify(ring, text, now=NOW)


@settings(max_examples=100, deadline=None)
@given(
    subject=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    scopes=st.sets(st.sampled_from(sorted(tickets.SCOPES)), min_size=1),
    ttl_s=st.integers(1, 86_400),
)
def test_round_trip_property(tmp_path_factory, subject, scopes, ttl_s):
    """Every valid subject, scope set and ttl survives mint and verify unchanged."""
    ring = _property_ring(tmp_path_factory)
    ticket, expires_at = mint(ring, subject, scopes, ttl_s, now=NOW)
    claims = verify(ring, ticket, now=NOW)
    assert (claims.subject, claims.scopes, claims.expires_at) == (subject, scopes, expires_at)
