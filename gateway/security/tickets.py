"""Signed tickets: minted at authentication, checked on every call.

A ticket says who the caller is (the subject, a user id), what it may do (scopes) and
until when. It is an HMAC-SHA256 token under a key from a :class:`KeyRing`; nothing
about it is stored server-side, so checking one costs a hash and no I/O. This module
knows nothing about gRPC: failures are :mod:`gateway.errors` exceptions.

Text format (ASCII, safe in an HTTP header; four dot-separated fields)::

    v1.<kid>.<payload>.<sig>

``kid``
    The id of the key that signed it: 1..16 characters of ``[A-Za-z0-9_-]``.
``payload``
    base64url without padding of this fixed binary layout (big-endian)::

        offset  size  field
             0     8  issued_at   unsigned, unix seconds
             8     8  expires_at  unsigned, unix seconds
            16     1  scopes      bit mask: pay=1 grab=2 read=4 batch=8 admin=16
            17    16  ticket_id   random (128 bits)
            33  1..64 subject     ASCII, [A-Za-z0-9._:-]
``sig``
    base64url without padding of HMAC-SHA256(key, ``v1.<kid>.<payload>``) (43 characters).

The signature covers the version and the key id as well as the payload, and it is
compared as canonical base64 text, so no two distinct strings verify as the same
ticket (base64 leaves slack in the last character; comparing decoded bytes would
accept several spellings of one signature).

Key file (``ticket_keys.json``, mode 0600)::

    {"format": "hongbao-ticket-keys", "version": 1,
     "issuer_key": "<base64url, 32 random bytes>",
     "keys": [{"kid": "...", "secret": "<base64url, 32 random bytes>",
               "created_at": <unix seconds>}, ...]}

``keys`` runs oldest first; the last one signs. Every listed key verifies. Retiring a
key deletes it from the file, secret and all. ``issuer_key`` is a separate secret that
trusted issuers present to ``AuthService.IssueTicket``.

Neither tickets nor keys are ever logged; ``repr`` of a :class:`KeyRing` shows key ids only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from gateway.errors import InvalidArgument, Unauthenticated

__all__ = [
    "DEFAULT_LEEWAY_S",
    "KEY_FILE_NAME",
    "MAX_KEYS",
    "MAX_TICKET_LEN",
    "MAX_TTL_S",
    "SCOPES",
    "Claims",
    "KeyFileError",
    "KeyRing",
    "mint",
    "subject_hint",
    "subject_hint_of_header",
    "verify",
]

SCOPES: frozenset[str] = frozenset({"pay", "grab", "read", "batch", "admin"})
# Bit positions are part of the wire format: never renumber, only append.
_SCOPE_BITS: dict[str, int] = {"pay": 1, "grab": 2, "read": 4, "batch": 8, "admin": 16}
_ALL_SCOPE_BITS = 31
# Every scope set a ticket can carry, indexed by its mask: verify does one list lookup.
_SCOPES_BY_MASK: tuple[frozenset[str], ...] = tuple(
    frozenset(s for s, bit in _SCOPE_BITS.items() if mask & bit)
    for mask in range(_ALL_SCOPE_BITS + 1)
)

VERSION = "v1"
KEY_FILE_NAME = "ticket_keys.json"
_KEY_FILE_FORMAT = "hongbao-ticket-keys"
MAX_KEYS = 16
MIN_TTL_S = 1
MAX_TTL_S = 86_400
DEFAULT_LEEWAY_S = 30
# The longest well-formed ticket is about 200 characters; anything longer is refused
# before any hashing so a hostile header costs nothing.
MAX_TICKET_LEN = 256
# Verified tickets remembered per ring. A client reuses its ticket for many calls, and
# a hit skips the HMAC and the decoding (about 0.4 us instead of 3 to 4). Only genuine
# tickets enter, so a flood of forgeries cannot fill it; expiry is re-checked on every hit.
VERIFIED_CACHE_SIZE = 4096

_SECRET_BYTES = 32
_TICKET_ID_BYTES = 16
_HEAD = struct.Struct(">QQB16s")
_MIN_PAYLOAD_BYTES = _HEAD.size + 1
_MAX_PAYLOAD_BYTES = _HEAD.size + 64
_SIG_CHARS = 43  # base64 of 32 bytes, unpadded

_SUBJECT_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,16}")
_B64URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_STD_TO_B64URL = bytes.maketrans(b"+/", b"-_")


class Claims(NamedTuple):
    """What a verified ticket asserts. A tuple: cheap to build on every call."""

    subject: str
    scopes: frozenset[str]
    expires_at: int
    issued_at: int
    ticket_id: str
    key_id: str


class KeyFileError(Exception):
    """The key file is missing, unreadable, too widely readable or malformed."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64url (the key file); verify() has its own, faster, decoder."""
    padded = (text + "=" * (-len(text) % 4)).encode("ascii")
    return binascii.a2b_base64(padded.translate(_B64URL_TO_STD), strict_mode=True)


class _Key(NamedTuple):
    kid: str
    secret: bytes
    created_at: int

    def __repr__(self) -> str:
        return f"_Key(kid={self.kid!r}, created_at={self.created_at})"


class KeyRing:
    """The ticket keys: the newest signs, every key still listed verifies.

    Held in memory by each process; the file is only read at load and written on
    :meth:`rotate` and :meth:`retire`. Changes made by another process are picked
    up by :meth:`reload`. Rotation is an operator action: two processes rotating
    the same file at the same moment can lose one of the two new keys.
    """

    def __init__(self, path: Path, keys: list[_Key], issuer_key: str) -> None:
        assert keys, "a key ring holds at least one key"
        self._path = path
        self._keys: list[_Key] = []
        self._macs: dict[str, _HmacTemplate] = {}
        # ticket -> (claims, the HMAC template that verified it); see VERIFIED_CACHE_SIZE.
        self._verified: dict[str, tuple[Claims, _HmacTemplate]] = {}
        self._issuer_key = issuer_key.encode("ascii")
        self._install(keys)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, data_dir: str | Path) -> KeyRing:
        """The ring in ``<data_dir>/ticket_keys.json``, created with fresh keys if absent."""
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / KEY_FILE_NAME
        if path.exists():
            return cls._read(path)
        ring = cls(path, [_new_key(set())], _b64encode(secrets.token_bytes(_SECRET_BYTES)))
        try:
            # Publish with link(), which never replaces: when several workers start at
            # once, exactly one file wins and every worker ends up with its keys.
            _write_file(path, ring._document(), replace=False)
        except FileExistsError:
            return cls._read(path)
        return ring

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """The ring in a configured key file, which must exist and be private (0600)."""
        path = Path(path)
        if not path.exists():
            raise KeyFileError(f"ticket key file {path} does not exist")
        return cls._read(path)

    @classmethod
    def _read(cls, path: Path) -> KeyRing:
        keys, issuer_key = _read_file(path)
        return cls(path, keys, issuer_key)

    def reload(self) -> None:
        """Re-reads the file, picking up keys rotated or retired by another process."""
        keys, issuer_key = _read_file(self._path)
        self._issuer_key = issuer_key.encode("ascii")
        self._install(keys)

    # -- rotation -----------------------------------------------------------------------

    def rotate(self) -> str:
        """Adds a newest key (which signs from now on), saves, and returns its id.

        At most :data:`MAX_KEYS` are kept: the oldest beyond that is dropped, and
        tickets it signed stop verifying.
        """
        keys = [*self._keys, _new_key({k.kid for k in self._keys})]
        keys = keys[-MAX_KEYS:]
        self._save(keys)
        return keys[-1].kid

    def retire(self, kid: str) -> None:
        """Deletes a key: tickets it signed fail with ``TICKET_UNKNOWN_KEY`` from now on."""
        if kid not in self._macs:
            raise KeyError(f"no ticket key with id {kid!r}")
        if kid == self.signing_kid:
            raise ValueError("the newest key signs and cannot be retired; rotate first")
        self._save([k for k in self._keys if k.kid != kid])

    def _save(self, keys: list[_Key]) -> None:
        document = _document(keys, self._issuer_key.decode("ascii"))
        _write_file(self._path, document, replace=True)
        self._install(keys)

    def _install(self, keys: list[_Key]) -> None:
        # Build the new tables completely, then swap them in, so a verify running
        # alongside sees either the old ring or the new one.
        macs = {k.kid: _hmac_template(k.secret) for k in keys}
        self._keys = list(keys)
        self._macs = macs
        self._verified = {}

    def _document(self) -> dict[str, object]:
        return _document(self._keys, self._issuer_key.decode("ascii"))

    # -- accessors ----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of the keys that verify, oldest first; the last one signs."""
        return tuple(k.kid for k in self._keys)

    @property
    def signing_kid(self) -> str:
        return self._keys[-1].kid

    @property
    def issuer_key(self) -> str:
        """The secret trusted issuers present to ``AuthService.IssueTicket``."""
        return self._issuer_key.decode("ascii")

    def check_issuer_key(self, presented: str) -> bool:
        """Whether ``presented`` is the issuer key, compared in constant time."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self._issuer_key)

    def __repr__(self) -> str:
        return f"KeyRing(path={str(self._path)!r}, key_ids={self.key_ids!r})"


# HMAC-SHA256 (RFC 2104) with the two keyed hash states computed once per key:
# H((K ^ opad) || H((K ^ ipad) || m)). Copying two sha256 states is about 40% cheaper
# than hmac.HMAC.copy(), which adds Python-level indirection on every call; the tests
# check it against hmac.new byte for byte.
_HmacTemplate = tuple["hashlib._Hash", "hashlib._Hash"]
_SHA256_BLOCK = 64


def _hmac_template(secret: bytes) -> _HmacTemplate:
    key = hashlib.sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
    key = key.ljust(_SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def _hmac_sha256(template: _HmacTemplate, message: str) -> bytes:
    inner = template[0].copy()
    inner.update(message.encode("ascii"))
    outer = template[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def _new_key(taken: set[str]) -> _Key:
    while True:
        kid = _b64encode(secrets.token_bytes(6))
        if kid not in taken:
            return _Key(kid, secrets.token_bytes(_SECRET_BYTES), int(time.time()))


def _document(keys: list[_Key], issuer_key: str) -> dict[str, object]:
    return {
        "format": _KEY_FILE_FORMAT,
        "version": 1,
        "issuer_key": issuer_key,
        "keys": [
            {"kid": k.kid, "secret": _b64encode(k.secret), "created_at": k.created_at}
            for k in keys
        ],
    }


def _read_file(path: Path) -> tuple[list[_Key], str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"cannot open ticket key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise KeyFileError(
                f"ticket key file {path} is accessible by group or others "
                f"(mode {mode & 0o777:04o}); it holds secrets: chmod 600 it"
            )
        raw = f.read(1 << 20)
    try:
        return _parse_document(json.loads(raw))
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise KeyFileError(f"ticket key file {path} is malformed: {exc}") from None


def _parse_document(doc: dict[str, object]) -> tuple[list[_Key], str]:
    if doc.get("format") != _KEY_FILE_FORMAT or doc.get("version") != 1:
        raise ValueError("not a version 1 hongbao ticket key file")
    issuer_key = doc["issuer_key"]
    if not isinstance(issuer_key, str) or not issuer_key.isascii() or len(issuer_key) < 32:
        raise ValueError("issuer_key must be at least 32 ASCII characters")
    entries = doc["keys"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_KEYS:
        raise ValueError(f"keys must list 1..{MAX_KEYS} keys")
    keys: list[_Key] = []
    for entry in entries:
        kid, secret, created_at = entry["kid"], entry["secret"], entry["created_at"]
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise ValueError("a key id must be 1..16 characters of [A-Za-z0-9_-]")
        if not isinstance(created_at, int):
            raise ValueError(f"key {kid}: created_at must be an integer")
        secret_bytes = _b64decode(secret)
        if len(secret_bytes) < _SECRET_BYTES:
            raise ValueError(f"key {kid}: a secret must be at least {_SECRET_BYTES} bytes")
        keys.append(_Key(kid, secret_bytes, created_at))
    if len({k.kid for k in keys}) != len(keys):
        raise ValueError("key ids must be unique")
    return keys, issuer_key


def _write_file(path: Path, document: dict[str, object], *, replace: bool) -> None:
    """Writes ``path`` atomically and durably, private from the first byte."""
    data = json.dumps(document, indent=1).encode("utf-8") + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        # After link() the temporary name is a second name for the file; after
        # replace() it is already gone.
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- minting and verifying ------------------------------------------------------------------


def mint(
    keyring: KeyRing,
    subject: str,
    scopes: Iterable[str],
    ttl_s: int,
    now: float | None = None,
) -> tuple[str, int]:
    """A ticket for ``subject`` with ``scopes``, valid for ``ttl_s``; and its expiry.

    Returns ``(ticket, expires_at_unix_s)``. Bad input raises
    :class:`~gateway.errors.InvalidArgument` with reason ``BAD_TICKET_REQUEST``.
    """
    if isinstance(scopes, str):
        raise TypeError("scopes must be an iterable of scope names, not one string")
    if not isinstance(subject, str) or not _SUBJECT_RE.fullmatch(subject):
        raise _bad_request("subject must be 1..64 characters of [A-Za-z0-9._:-]")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise _bad_request(f"ttl must be {MIN_TTL_S}..{MAX_TTL_S} seconds")
    mask = 0
    for scope in scopes:
        bit = _SCOPE_BITS.get(scope)
        if bit is None:
            raise _bad_request(f"unknown scope {str(scope)[:32]!r}", scope=str(scope)[:32])
        mask |= bit
    if not mask:
        raise _bad_request("a ticket needs at least one scope")
    issued_at = int(time.time() if now is None else now)
    expires_at = issued_at + ttl_s
    payload = _HEAD.pack(issued_at, expires_at, mask, secrets.token_bytes(_TICKET_ID_BYTES))
    payload += subject.encode("ascii")
    kid = keyring.signing_kid
    signed = f"{VERSION}.{kid}.{_b64encode(payload)}"
    return f"{signed}.{_b64encode(_hmac_sha256(keyring._macs[kid], signed))}", expires_at


def _bad_request(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("BAD_TICKET_REQUEST", message, **metadata)


def verify(
    keyring: KeyRing,
    ticket: str,
    now: float | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
) -> Claims:
    """The claims of a genuine, current ticket; else :class:`~gateway.errors.Unauthenticated`.

    Reasons: ``TICKET_MISSING``, ``TICKET_MALFORMED``, ``TICKET_UNKNOWN_KEY`` (unknown
    or retired key), ``TICKET_FORGED``, ``TICKET_EXPIRED``, ``TICKET_NOT_YET_VALID``.
    ``leeway_s`` tolerates clock skew between the minter and this host, both ways.
    The checks run cheapest first, and the payload is only decoded once its signature
    holds, so a forged ticket costs at most one HMAC. Genuine tickets are remembered
    (see :data:`VERIFIED_CACHE_SIZE`); the times are checked against ``now`` on every call.
    """
    if now is None:
        now = time.time()
    hit = keyring._verified.get(ticket)
    # A hit counts only while the key that verified it is still installed (not retired).
    if hit is not None and keyring._macs.get(hit[0].key_id) is hit[1]:
        claims = hit[0]
        issued_at, expires_at = claims.issued_at, claims.expires_at
    else:
        claims = _verify_signed(keyring, ticket)
        issued_at, expires_at = claims.issued_at, claims.expires_at
    if now >= expires_at + leeway_s:
        raise Unauthenticated("TICKET_EXPIRED", "ticket expired")
    if issued_at > now + leeway_s:
        raise Unauthenticated("TICKET_NOT_YET_VALID", "ticket issued in the future")
    return claims


def _verify_signed(keyring: KeyRing, ticket: str) -> Claims:
    """The claims of a genuine ticket, whatever its times; remembered for next time."""
    if not ticket:
        raise Unauthenticated("TICKET_MISSING", "no ticket")
    if len(ticket) > MAX_TICKET_LEN or not ticket.isascii():
        raise _malformed()
    parts = ticket.split(".")
    if len(parts) != 4 or parts[0] != VERSION:
        raise _malformed()
    kid, payload_b64, sig = parts[1], parts[2], parts[3]
    base = keyring._macs.get(kid)
    if base is None:
        raise Unauthenticated("TICKET_UNKNOWN_KEY", "ticket key unknown or retired")
    inner = base[0].copy()
    inner.update(ticket[: -len(sig) - 1].encode("ascii"))
    outer = base[1].copy()
    outer.update(inner.digest())
    # base64.urlsafe_b64encode is these two C calls behind two Python ones.
    expected = binascii.b2a_base64(outer.digest(), newline=False).translate(_STD_TO_B64URL)
    if not hmac.compare_digest(expected[:_SIG_CHARS], sig.encode("ascii")):
        raise Unauthenticated("TICKET_FORGED", "ticket signature does not match")
    # Genuine from here on: the payload was built by mint() under one of our keys. It is
    # still checked, as data read back is checked before use. Lenient base64 is fine
    # here (the text is authenticated) and a third faster than the strict decoder.
    try:
        padded = (payload_b64 + "==").encode("ascii")
        payload = binascii.a2b_base64(padded.translate(_B64URL_TO_STD))
    except binascii.Error:
        raise _malformed() from None
    if not _MIN_PAYLOAD_BYTES <= len(payload) <= _MAX_PAYLOAD_BYTES:
        raise _malformed()
    issued_at, expires_at, mask, ticket_id = _HEAD.unpack_from(payload)
    if mask > _ALL_SCOPE_BITS or not mask or not 0 < expires_at - issued_at <= MAX_TTL_S:
        raise _malformed()
    try:
        subject = payload[_HEAD.size :].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed() from None
    # Only what mint() would sign: a holder of the key (an issuer) cannot widen what a
    # subject may look like (spaces, '/', control bytes reach keys and logs otherwise).
    if not _SUBJECT_RE.fullmatch(subject):
        raise _malformed()
    # tuple.__new__ skips NamedTuple's generated __new__: half the cost, same object.
    claims: Claims = _tuple_new(
        Claims, (subject, _SCOPES_BY_MASK[mask], expires_at, issued_at, ticket_id.hex(), kid)
    )
    cache = keyring._verified
    if len(cache) >= VERIFIED_CACHE_SIZE:
        # Start afresh rather than evict one by one: deleting a dict's oldest entries
        # leaves holes that every later next(iter()) must skip (1.5 us a call, measured),
        # and tickets still in use come back on their next call.
        cache.clear()
    cache[ticket] = (claims, base)
    return claims


_tuple_new = tuple.__new__


def subject_hint(ticket: str) -> str:
    """The subject a ticket *claims*, unverified; '' when it is not a well-formed v1 ticket.

    For the admission controller only, which needs the user's priority before the auth
    interceptor has checked anything (a shed call must cost as little as possible). A
    forged ticket gains nothing by it: it only picks the priority under which it is
    then refused by the auth interceptor.
    """
    if len(ticket) > MAX_TICKET_LEN or not ticket.isascii():
        return ""
    parts = ticket.split(".")
    if len(parts) != 4 or parts[0] != VERSION:
        return ""
    try:
        payload = binascii.a2b_base64((parts[2] + "==").encode("ascii").translate(_B64URL_TO_STD))
    except binascii.Error:
        return ""
    if not _MIN_PAYLOAD_BYTES <= len(payload) <= _MAX_PAYLOAD_BYTES:
        return ""
    return payload[_HEAD.size :].decode("ascii", "replace")


def subject_hint_of_header(authorization: str) -> str:
    """:func:`subject_hint` of an ``authorization: Bearer <ticket>`` header's value."""
    return subject_hint(authorization.partition(" ")[2].strip())


def _malformed() -> Unauthenticated:
    return Unauthenticated("TICKET_MALFORMED", "ticket is not a well-formed v1 ticket")
