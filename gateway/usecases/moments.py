"""Moments photo unlocks: pay a friend a small fixed amount to see their photo (tier P3).

A paid unlock moves ``Settings.unlock_fen`` from the viewer's (the caller's)
wallet to the photo owner's in one ledger transaction
(:meth:`~gateway.ledger.Ledger.unlock_photo`), idempotent by (viewer,
request_id) and refused with FAILED_PRECONDITION ``INSUFFICIENT_BALANCE`` when
the wallet falls short. The photo itself is not this gateway's: any well-formed
``photo_id`` of any other user is accepted, and the owner's wallet opens on
its first credit.

Under payment pressure a share of unlocks is free instead
(:attr:`Pressure.free_share`, stepping by ``unlock_free_step`` per admission
window up to 1.0 and back down to 0): no money moves and nothing is written.
Which ones: each (viewer, request_id) has a fixed point in [0, 1)
(:func:`free_point`, a keyed hash), and an unlock is free when its point is
below the share in force. So the set of free unlocks only grows as the share
grows, every worker and every restart agree, and a retry at the same share
gets the same answer. The rules, in the order they apply:

1. a request_id already paid for returns that paid result, whatever the share
   (even 1.0); the same request_id with another photo or owner is refused with
   INVALID_ARGUMENT ``REQUEST_ID_REUSED``;
2. otherwise, a point below the share is free: ``payment_id`` is
   ``free_<hex>``, derived from (viewer, request_id) as the paid ``unl_<hex>``
   is, ``amount_fen`` 0, ``free`` true, whatever the wallet holds. Nothing is
   recorded, so a retry of a free unlock is decided afresh at the share then in
   force (free again at the same or a higher share, possibly paid once the
   share has come down), and a request_id reused with another payload is caught
   only against a paid unlock;
3. otherwise the unlock is paid.

Input is checked before anything is read or written: request_id and photo_id
1..64 of ``[A-Za-z0-9._:-]`` (``BAD_REQUEST_ID``, ``BAD_PHOTO_ID``), owner_id
a user id (``BAD_USER_ID``), and not the caller (``OWNER_IS_VIEWER``), all
INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import re

from gateway import errors
from gateway.config import Settings
from gateway.domain.keys import fingerprint, unlock_id
from gateway.domain.model import UnlockResult
from gateway.ledger import Ledger
from gateway.qos.pressure import MOMENTS_FREE, Pressure
from gateway.usecases.checks import check_request_id, check_user_id

_PHOTO_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# The free point's hash key: keeps it independent of the unlock id's hash and of the
# admission controller's user priority, which hash the same user id.
_FREE_KEY = b"hongbao.moments.free.v1"
_POINT_BITS = 53  # a double holds every 53-bit integer exactly, so points stay below 1.0


def check_photo_id(photo_id: str) -> str:
    if not _PHOTO_ID.fullmatch(photo_id):
        raise errors.InvalidArgument(
            "BAD_PHOTO_ID", "photo_id must be 1..64 of [A-Za-z0-9._:-]")
    return photo_id


def free_point(viewer_id: str, request_id: str) -> float:
    """Where (viewer, request_id) falls in [0, 1): the unlock is free below the free share."""
    digest = hashlib.blake2b(f"{viewer_id}\0{request_id}".encode(), digest_size=8,
                             key=_FREE_KEY).digest()
    return (int.from_bytes(digest, "big") >> (64 - _POINT_BITS)) / (1 << _POINT_BITS)


class Moments:
    """UnlockPhoto: paid from the viewer's wallet, or free by the pressure's free share."""

    def __init__(self, ledger: Ledger, settings: Settings, pressure: Pressure) -> None:
        self._ledger = ledger
        self._settings = settings
        self._pressure = pressure

    @staticmethod
    def _check(viewer_id: str, request_id: str, photo_id: str, owner_id: str) -> None:
        check_request_id(request_id)
        check_photo_id(photo_id)
        check_user_id(owner_id, "owner_id")
        if owner_id == viewer_id:
            raise errors.InvalidArgument(
                "OWNER_IS_VIEWER", "owner_id is the caller: your own photo needs no unlock")

    async def unlock(self, viewer_id: str, request_id: str, photo_id: str,
                     owner_id: str) -> UnlockResult:
        """Unlocks ``photo_id`` of ``owner_id`` for ``viewer_id`` (rules in the module doc)."""
        self._check(viewer_id, request_id, photo_id, owner_id)
        fp = fingerprint("unlock", photo_id, owner_id)
        share = self._pressure.free_share  # read once: a window may close meanwhile
        if share > 0:
            paid = await self._ledger.unlock_result(viewer_id, request_id, fp)
            if paid is not None:
                return paid
            if free_point(viewer_id, request_id) < share:
                self._pressure.note(MOMENTS_FREE)
                return UnlockResult(unlock_id(viewer_id, request_id, free=True), 0, True)
        # At share 0 there is nothing to decide: the ledger's own idempotency
        # record answers a retry, so the extra read is skipped.
        return await self._ledger.unlock_photo(
            viewer_id, request_id, fp, owner_id=owner_id, photo_id=photo_id,
            amount_fen=self._settings.unlock_fen)
