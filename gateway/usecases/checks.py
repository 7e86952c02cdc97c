"""Input checks shared by the use cases: a refused request is refused before any write."""

from __future__ import annotations

import re

from gateway import errors
from gateway.payments.bank import bank_of_card

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# env_ + the slot (3 hex) + 20 hex; ids made before they carried a slot have no slot part.
_ENVELOPE_ID = re.compile(r"env_(?:[0-3][0-9a-f]{2})?[0-9a-f]{20}")
INT64_MAX = 2**63 - 1


def check_user_id(user_id: str, field: str = "user_id") -> str:
    if not _ID.fullmatch(user_id):
        raise errors.InvalidArgument("BAD_USER_ID", f"{field} must be 1..64 of [A-Za-z0-9._:-]")
    return user_id


def check_request_id(request_id: str) -> str:
    if not _ID.fullmatch(request_id):
        raise errors.InvalidArgument(
            "BAD_REQUEST_ID", "request_id must be 1..64 of [A-Za-z0-9._:-]")
    return request_id


def check_envelope_id(envelope_id: str) -> str:
    if not _ENVELOPE_ID.fullmatch(envelope_id):
        raise errors.InvalidArgument("BAD_ENVELOPE_ID", "envelope_id is malformed")
    return envelope_id


def check_card(card_id: str, banks: tuple[str, ...]) -> str:
    """The bank of a well-formed card id of a configured bank."""
    bank_id = bank_of_card(card_id)
    if bank_id is None:
        raise errors.InvalidArgument("BAD_CARD_ID", "card_id must be <bank>-<digits>")
    if bank_id not in banks:
        raise errors.InvalidArgument("UNKNOWN_BANK", f"no bank {bank_id!r}")
    return bank_id
