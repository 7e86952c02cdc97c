"""The wallet home: balance, transaction pages and the notification feed (reads only)."""

from __future__ import annotations

from gateway import errors
from gateway.domain.model import Balance, Notice, WalletEntry
from gateway.ledger import Ledger

_DEFAULT_PAGE_SIZE = 20
_MAX_PAGE_SIZE = 100


class WalletReads:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def balance(self, user_id: str) -> Balance:
        return await self._ledger.balance(user_id)

    async def list_transactions(self, user_id: str, page_size: int, page_token: str
                                ) -> tuple[list[WalletEntry], str]:
        """A page of entries newest first and the token of the next ("" at the end)."""
        if page_size == 0:
            page_size = _DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= _MAX_PAGE_SIZE:
            raise errors.InvalidArgument("BAD_PAGE_SIZE",
                                         f"page_size must be in 0..{_MAX_PAGE_SIZE}")
        before = None
        if page_token:
            if not page_token.isdigit() or len(page_token) > 20 or int(page_token) >= 2**64:
                raise errors.InvalidArgument("BAD_PAGE_TOKEN", "page_token is malformed")
            before = int(page_token)
        page = await self._ledger.list_transactions(user_id, page_size, before)
        return page.entries, "" if page.next_cursor is None else str(page.next_cursor)

    async def notifications(self, user_id: str, after_event_id: int, limit: int
                            ) -> list[Notice]:
        return await self._ledger.notifications(user_id, after_event_id, limit)
