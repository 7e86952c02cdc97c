"""Bound cards: the bank cards a user keeps with the wallet, most preferred first.

The list is quasi-static data (the seed's "multi-level cache for quasi-static data"): read
far more often than changed, and read on the payment path when a payment picks a card. So
each worker keeps the lists it read in a bounded LRU (``cards_cache_size`` users), trusts an
entry for ``cards_cache_ttl_s`` (1 s) and drops it at once when this worker binds or
unbinds for the user. Decision: a change made through another worker shows here within the
TTL, not at once; the workers share no memory, and a change is rare and made by the user,
who reads it back from the same answer (Bind and Unbind return the new list).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import Settings
from gateway.ledger import Ledger
from gateway.usecases.checks import check_card, check_request_id
from gateway.usecases.wallet import LruCache


class BoundCards:
    def __init__(self, ledger: Ledger, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ledger = ledger
        self._banks = settings.banks
        self._limit = settings.max_bound_cards
        self._ttl_s = settings.cards_cache_ttl_s
        self._clock = clock
        self._cache: LruCache[str, tuple[float, list[str]]] = LruCache(
            settings.cards_cache_size)

    async def bind(self, user_id: str, request_id: str, card_id: str,
                   preferred: bool) -> list[str]:
        check_request_id(request_id)
        check_card(card_id, self._banks)
        self._cache.drop(user_id)
        return await self._ledger.bind_card(user_id, card_id, preferred=preferred,
                                            limit=self._limit)

    async def unbind(self, user_id: str, request_id: str, card_id: str
                     ) -> tuple[list[str], bool]:
        check_request_id(request_id)
        check_card(card_id, self._banks)
        self._cache.drop(user_id)
        return await self._ledger.unbind_card(user_id, card_id)

    async def list(self, user_id: str) -> list[str]:
        """The user's cards, from the cache while its entry is younger than the TTL."""
        now = self._clock()
        hit = self._cache.get(user_id)
        if hit is not None and now - hit[0] < self._ttl_s:
            return list(hit[1])
        cards = await self._ledger.bound_cards(user_id)
        self._cache.put(user_id, now, (now, cards))
        return list(cards)
