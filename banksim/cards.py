"""Card ids: the one definition of their format, for the simulator and the gateway.

A card id is ``<bank_id>-<card number>``: a bank id of 1..16 characters
``[a-z0-9_]`` starting with a letter, a hyphen, then 1..32 digits
(``icbc-6222020000000001``). The simulator checks every id it is sent against
this rule, and the gateway's bank link (``gateway.payments.bank``) parses ids
with it too, so the two can never disagree about which cards exist. This module
is public, imports nothing else from ``banksim`` and nothing from ``gateway``.
"""

from __future__ import annotations

import re

__all__ = ["BANK_ID", "CARD_ID", "bank_of", "parse_card_id"]

# The bank id alone (also the rule for ``--banks``).
BANK_ID = re.compile(r"[a-z][a-z0-9_]{0,15}")
# Bank id and card number; always used with ``fullmatch``.
CARD_ID = re.compile(rf"({BANK_ID.pattern})-([0-9]{{1,32}})")


def parse_card_id(card_id: str) -> tuple[str, str] | None:
    """The bank id and card number of ``card_id``, or None when it is malformed."""
    match = CARD_ID.fullmatch(card_id)
    if match is None:
        return None
    return match.group(1), match.group(2)


def bank_of(card_id: str) -> str:
    """The bank id of ``card_id``; ValueError when it is malformed."""
    parsed = parse_card_id(card_id)
    if parsed is None:
        raise ValueError(f"malformed card id {card_id!r}: want <bank_id>-<1..32 digits>")
    return parsed[0]
