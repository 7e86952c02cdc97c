"""The ledger contract every backend satisfies, and the generic implementation.

:class:`Ledger` is what the use cases, the background workers, the admin
service and reconcile see. Every method is async, reads included: a read of
the embedded backends is one short local transaction that returns at once
(an ``await`` of it costs about half a microsecond more than the bare
query, measured in ``bench/bench_ledger.py``), and a backend that is not local (the cluster
work) can wait without changing a caller.

:class:`BooksLedger` implements the whole contract with the backend-neutral
money rules of ``gateway.domain``; a backend supplies only two things: a
write path that runs a rule in a (group-committed) write transaction, and a
read path that runs a query in a consistent read transaction.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway import errors
from gateway.domain import audit, reads, rules
from gateway.domain.audit import Report
from gateway.domain.keys import new_envelope_id, request_digest
from gateway.domain.model import (
    Balance,
    CardEnvelope,
    EnvelopeState,
    EnvelopeView,
    GrabFound,
    GrabResult,
    LedgerStats,
    MigrationChunk,
    Notice,
    Payment,
    PaymentBegun,
    PaymentStatus,
    RemoteCredit,
    SendResult,
    SlotExport,
    UnlockResult,
    WalletPage,
)
from gateway.domain.reads import InterSetCredits
from gateway.domain.store import Books, Tx

T = TypeVar("T")


class Ledger(abc.ABC):
    """The gateway's books. Implementations MUST:

    - make every method that moves money atomic and durable before it returns
      (unless configured as relaxed, which they must log);
    - refuse a request they cannot honour with a ``GatewayError`` and change
      nothing;
    - keep the sum over all accounts at zero and every transfer id unique;
    - answer every read from one consistent snapshot.
    """

    # -- envelopes and grabs -------------------------------------------------------

    @abc.abstractmethod
    async def send_from_balance(
        self, user_id: str, request_id: str, fingerprint: bytes, *, total_fen: int,
        count: int, kind: int, greeting: str, expires_in_s: int, shares: list[int],
    ) -> SendResult:
        """Moves ``total_fen`` from the wallet into a new envelope's escrow.

        Idempotent by (user, request_id): a retry returns the first result;
        another payload under the same id raises InvalidArgument.
        """

    @abc.abstractmethod
    async def grab(self, user_id: str, envelope_id: str, request_id: str) -> GrabResult:
        """Claims the next share for ``user_id``: escrow -> the user's pending credit.

        One share per user per envelope; a retry with the same request_id
        returns the first result.
        """

    @abc.abstractmethod
    async def grab_many(self, items: list[tuple[str, str, str]]
                        ) -> list[GrabResult | errors.GatewayError]:
        """(user, envelope, request id) grabs in one request; a GrabResult or GatewayError each."""

    @abc.abstractmethod
    async def find_grab(self, user_id: str, envelope_id: str) -> GrabFound | None:
        """The user's grab of an envelope, its request digest and the shares left (one read)."""

    @abc.abstractmethod
    async def envelope_state(self, envelope_id: str) -> EnvelopeState | None:
        """Count, claimed, status and expiry of an envelope, or None."""

    @abc.abstractmethod
    async def grabbers(self, envelope_id: str) -> list[bytes]:
        """The user ids (bytes) that hold a share of the envelope."""

    @abc.abstractmethod
    async def send_result(self, user_id: str, request_id: str, fingerprint: bytes
                          ) -> SendResult | None:
        """The first result of a SendEnvelope request id, with the envelope's live status;
        InvalidArgument if the id was used with another payload."""

    @abc.abstractmethod
    async def get_envelope(self, envelope_id: str) -> EnvelopeView:
        """The envelope with its grabs in grab order; NotFound if unknown."""

    # -- wallets -------------------------------------------------------------------

    @abc.abstractmethod
    async def balance(self, user_id: str) -> Balance:
        """The wallet balance and the pending credit, in fen."""

    @abc.abstractmethod
    async def list_transactions(self, user_id: str, page_size: int, before_seq: int | None
                                ) -> WalletPage:
        """Wallet entries newest first, and the cursor of the next page (None at the end)."""

    @abc.abstractmethod
    async def notifications(self, user_id: str, after_event_id: int, limit: int
                            ) -> list[Notice]:
        """The user's notification events after ``after_event_id``, oldest first."""

    # -- Moments photo unlocks -------------------------------------------------------

    @abc.abstractmethod
    async def unlock_photo(self, viewer_id: str, request_id: str, fingerprint: bytes, *,
                           owner_id: str, photo_id: str, amount_fen: int) -> UnlockResult:
        """Moves ``amount_fen`` from the viewer's wallet to the owner's: one transfer, an
        entry in each wallet, a CREDITED event in the owner's feed.

        Idempotent by (viewer, request_id): a retry returns the first result;
        another payload under the same id raises InvalidArgument
        ``REQUEST_ID_REUSED``. A wallet that does not cover the amount raises
        FailedPrecondition ``INSUFFICIENT_BALANCE`` and changes nothing.
        """

    @abc.abstractmethod
    async def unlock_result(self, viewer_id: str, request_id: str, fingerprint: bytes
                            ) -> UnlockResult | None:
        """The first result of a paid unlock by (viewer, request_id), or None; InvalidArgument
        ``REQUEST_ID_REUSED`` if the id was used with another payload."""

    # -- card payments -------------------------------------------------------------

    @abc.abstractmethod
    async def begin_payment(self, payment: Payment, fingerprint: bytes, due_in_ms: int,
                            envelope: CardEnvelope | None = None,
                            replaces: str = "") -> PaymentBegun:
        """Saves a payment intent (PENDING) before the bank is called.

        Returns it and whether this call created it; a retry gets the saved
        one (another payload under the same id raises InvalidArgument). A
        withdrawal holds its amount out of the wallet at once; a card-paid
        envelope is created PAYING, not grabbable. The intent is due for the
        resolver after ``due_in_ms`` unless it is finished first. ``replaces``:
        the payment of the same send this one takes over from (AUTO's next card);
        FailedPrecondition ``PAYMENT_NOT_REPLACEABLE`` unless that one FAILED
        without moving money.
        """

    @abc.abstractmethod
    async def switch_channel(self, payment_id: str, channel: str) -> Payment:
        """Names the bank channel a PENDING payment goes through next; a payment no longer
        PENDING comes back unchanged (and must not be sent)."""

    @abc.abstractmethod
    async def finish_payment(self, payment_id: str, outcome: PaymentStatus, reason: str = "",
                             from_states: tuple[PaymentStatus, ...] = (PaymentStatus.PENDING,)
                             ) -> Payment:
        """Takes a payment in one of ``from_states`` to SUCCEEDED, FAILED or REFUNDED, with
        its money, exactly once; otherwise returns it unchanged."""

    @abc.abstractmethod
    async def payment_unknown(self, payment_id: str, resolve_in_ms: int,
                              reason: str = "") -> Payment:
        """Marks an open payment UNKNOWN (notifying the user the first time) and due for
        the resolver in ``resolve_in_ms``."""

    @abc.abstractmethod
    async def get_payment(self, payment_id: str) -> Payment | None:
        """The payment, or None."""

    @abc.abstractmethod
    async def due_payments(self, limit: int, now_ms: int | None = None) -> list[str]:
        """Ids of open payments whose resolve time has come (by ``now_ms``), oldest first."""

    # -- background work -----------------------------------------------------------

    @abc.abstractmethod
    async def expire_due(self, limit: int) -> int:
        """Returns expired envelopes' unclaimed shares to their senders, exactly once each."""

    @abc.abstractmethod
    async def apply_credits(self, limit: int) -> int:
        """Applies up to ``limit`` pending grab credits to wallets, each exactly once."""

    # -- cluster mode: credits between SETs ------------------------------------------

    @abc.abstractmethod
    def set_placement(self, away: Callable[[bytes], bytes | None] | None) -> None:
        """Cluster mode: ``away(user)`` names the SET a user's wallet lives on when it is not
        this one (None: here). A grab's credit for such a user goes to x:<set> and the relay's
        outbox instead of the wallet. Called from the writer, so it must be fast and pure."""

    @abc.abstractmethod
    async def remote_credits_due(self, limit: int) -> list[RemoteCredit]:
        """The relay's next credits for other SETs, oldest first."""

    @abc.abstractmethod
    async def remote_credits_sent(self, seqs: list[int]) -> int:
        """Takes credits the stream acknowledged off the outbox."""

    @abc.abstractmethod
    async def apply_remote_credits(self, from_set: str, credits: list[RemoteCredit]) -> int:
        """Credits another SET's grabs owe users of this one, each exactly once by its
        transfer id; returns how many were new."""

    @abc.abstractmethod
    async def interset_credits(self) -> InterSetCredits:
        """Every credit this SET sent to or applied from another SET (transfer id, peer,
        amount, whether a sent one still waits in the relay's outbox) and the balance of
        each ``x:<peer>`` account, all from one consistent snapshot, so the balances are
        exactly what the listed credits add up to. For ``hongbao reconcile --cluster``;
        empty on a gateway that never had placement set."""

    # -- cluster mode: handing slots to another SET ----------------------------------

    @abc.abstractmethod
    async def export_slots(self, slots: set[int], to_set: str, move_id: str) -> SlotExport:
        """On the old owner, with the slots frozen: in one write transaction, credits every
        waiting grab of the slots (their users counting as living on ``to_set``), moves
        each wallet balance and escrow of the slots to x:<to_set> under
        ``m:<move_id>:w:<user>`` / ``m:<move_id>:e:<envelope>`` (queued for the relay as
        wallet_move / escrow_move credits) and takes their records off this SET into
        chunks of at most 256 KiB on the migration outbox (``<move_id>:<n>``).

        Refuses with FailedPrecondition ``SLOT_BUSY`` and changes nothing while a payment
        of the slots' users is open or a card-paid envelope of the slots is not final.
        Idempotent by ``move_id``: a second call returns the first result and changes
        nothing; the id with other slots or another SET raises ``MOVE_ID_REUSED``."""

    @abc.abstractmethod
    async def migration_chunks_due(self, limit: int) -> list[MigrationChunk]:
        """The shipper's next exported chunks, oldest first."""

    @abc.abstractmethod
    async def migration_chunks_sent(self, seqs: list[int]) -> int:
        """Takes chunks the new owner acknowledged off the migration outbox."""

    @abc.abstractmethod
    async def import_slots(self, from_set: str, chunk: bytes) -> int:
        """On the new owner: applies one chunk of ``from_set``'s export in one write
        transaction, once by its id (a redelivery returns 0 and changes nothing): its
        money from x:<from_set> under the old owner's transfer ids (one already applied
        by its remote credit is skipped) and its records. InvalidArgument ``BAD_CHUNK``
        for bytes that are not a chunk. See ``rules.import_slots`` for what it does to
        wallet-entry and notification sequence numbers."""

    @abc.abstractmethod
    async def import_complete(self, move_id: str) -> bool:
        """Whether every chunk of the move has been applied here."""

    # -- bound cards ---------------------------------------------------------------

    @abc.abstractmethod
    async def bind_card(self, user_id: str, card_id: str, *, preferred: bool,
                        limit: int) -> list[str]:
        """Adds a bound card (last, or first when ``preferred``); the cards, most preferred
        first. A card bound already is kept (moved first when ``preferred``).
        FailedPrecondition TOO_MANY_CARDS past ``limit``."""

    @abc.abstractmethod
    async def unbind_card(self, user_id: str, card_id: str) -> tuple[list[str], bool]:
        """Takes a bound card off; (the cards left, whether it was bound)."""

    @abc.abstractmethod
    async def bound_cards(self, user_id: str) -> list[str]:
        """The user's bound cards, most preferred first."""

    # -- operations ----------------------------------------------------------------

    @abc.abstractmethod
    async def audit(self) -> Report:
        """The conservation checks (``gateway.domain.audit``) on one consistent snapshot."""

    @abc.abstractmethod
    async def stats(self) -> LedgerStats:
        """The writer's and the credit outbox's counters."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commits what is queued and closes the store."""


class BooksLedger(Ledger):
    """The contract over the domain rules; a backend supplies :meth:`write` and :meth:`read`."""

    @abc.abstractmethod
    async def write(self, rule: Callable[..., T], *args: Any) -> T:
        """Runs ``rule(books, *args)`` in a write transaction; returns once it is durable."""

    @abc.abstractmethod
    def read(self, query: Callable[..., T], *args: Any) -> T:
        """Runs ``query(tx, *args)`` in one read transaction (synchronous and short)."""

    @abc.abstractmethod
    def _writer_stats(self) -> tuple[int, int, int, int, float, float, float, float]:
        """Queue depth, batches, requests, largest batch, apply, commit and queue-wait
        seconds, and the writer thread's CPU seconds."""

    # -- writes ------------------------------------------------------------------------

    async def send_from_balance(self, user_id, request_id, fingerprint, *, total_fen, count,
                                kind, greeting, expires_in_s, shares) -> SendResult:
        return await self.write(
            rules.send_from_balance, user_id.encode(), request_id.encode(), fingerprint,
            new_envelope_id(user_id).encode(), total_fen, count, kind, greeting, expires_in_s,
            shares)

    async def grab(self, user_id, envelope_id, request_id) -> GrabResult:
        return await self.write(rules.grab, envelope_id.encode(), user_id.encode(),
                                 request_digest(request_id))

    async def grab_many(self, items):
        packed = [(e.encode(), u.encode(), request_digest(r)) for u, e, r in items]
        return await self.write(rules.grab_many, packed)

    async def unlock_photo(self, viewer_id, request_id, fingerprint, *, owner_id, photo_id,
                           amount_fen) -> UnlockResult:
        return await self.write(rules.unlock_photo, viewer_id.encode(), request_id.encode(),
                                 fingerprint, owner_id.encode(), photo_id, amount_fen)

    async def begin_payment(self, payment, fingerprint, due_in_ms, envelope=None,
                            replaces=""):
        return await self.write(rules.begin_payment, payment, fingerprint, due_in_ms,
                                 envelope, replaces)

    async def switch_channel(self, payment_id, channel) -> Payment:
        return await self.write(rules.switch_channel, payment_id, channel)

    async def finish_payment(self, payment_id, outcome, reason="",
                             from_states=(PaymentStatus.PENDING,)) -> Payment:
        return await self.write(rules.finish_payment, payment_id, outcome, reason,
                                 from_states)

    async def payment_unknown(self, payment_id, resolve_in_ms, reason="") -> Payment:
        return await self.write(rules.payment_unknown, payment_id, resolve_in_ms, reason)

    def _now_ms(self) -> int:
        """The rules' notion of now (the memory backend's may be injected)."""
        return time.time_ns() // 1_000_000

    _away: Callable[[bytes], bytes | None] | None = None

    def set_placement(self, away):
        self._away = away

    async def remote_credits_due(self, limit):
        return self.read(reads.remote_credits_due, limit)

    async def remote_credits_sent(self, seqs):
        return await self.write(rules.remote_credits_sent, seqs) if seqs else 0

    async def apply_remote_credits(self, from_set, credits):
        if not credits:
            return 0
        return await self.write(rules.apply_remote_credits, from_set.encode(), credits)

    async def interset_credits(self):
        return self.read(reads.interset_credits)

    async def export_slots(self, slots, to_set, move_id) -> SlotExport:
        return await self.write(rules.export_slots, frozenset(slots), to_set.encode(),
                                move_id.encode())

    async def migration_chunks_due(self, limit):
        return self.read(reads.migration_chunks_due, limit)

    async def migration_chunks_sent(self, seqs):
        return await self.write(rules.migration_chunks_sent, seqs) if seqs else 0

    async def import_slots(self, from_set, chunk) -> int:
        return await self.write(rules.import_slots, from_set.encode(), chunk)

    async def import_complete(self, move_id):
        return self.read(reads.import_complete, move_id)

    async def bind_card(self, user_id, card_id, *, preferred, limit):
        return await self.write(rules.bind_card, user_id.encode(), card_id, preferred, limit)

    async def unbind_card(self, user_id, card_id):
        return await self.write(rules.unbind_card, user_id.encode(), card_id)

    async def bound_cards(self, user_id):
        return self.read(reads.bound_cards, user_id.encode())

    # The two sweeps look before they write: an idle gateway commits nothing (in strict
    # durability every write transaction is an fsync). The write checks again.

    async def expire_due(self, limit: int) -> int:
        if not self.read(reads.expiry_due, self._now_ms()):
            return 0
        return await self.write(rules.expire_due, limit)

    async def apply_credits(self, limit: int) -> int:
        if not self.read(reads.credit_backlog):
            return 0
        return await self.write(rules.apply_credits, limit)

    # -- reads -------------------------------------------------------------------------

    async def find_grab(self, user_id, envelope_id):
        return self.read(reads.find_grab, user_id, envelope_id)

    async def envelope_state(self, envelope_id):
        return self.read(reads.envelope_state, envelope_id)

    async def grabbers(self, envelope_id):
        return self.read(reads.grabbers, envelope_id)

    async def send_result(self, user_id, request_id, fingerprint):
        return self.read(reads.send_result, user_id, request_id, fingerprint)

    async def get_envelope(self, envelope_id):
        return self.read(reads.get_envelope, envelope_id)

    async def unlock_result(self, viewer_id, request_id, fingerprint):
        return self.read(reads.unlock_result, viewer_id, request_id, fingerprint)

    async def balance(self, user_id):
        return self.read(reads.balance, user_id)

    async def list_transactions(self, user_id, page_size, before_seq):
        return self.read(reads.list_transactions, user_id, page_size, before_seq)

    async def notifications(self, user_id, after_event_id, limit):
        return self.read(reads.notifications, user_id, after_event_id, limit)

    async def get_payment(self, payment_id):
        return self.read(reads.get_payment, payment_id)

    async def due_payments(self, limit, now_ms=None):
        when = self._now_ms() if now_ms is None else now_ms
        return self.read(reads.due_payments, when, limit)

    async def audit(self) -> Report:
        return self.read(audit.audit)

    async def stats(self) -> LedgerStats:
        depth, batches, requests, biggest, apply_s, commit_s, wait_s, cpu_s = self._writer_stats()
        return LedgerStats(depth, batches, requests, biggest, apply_s, commit_s,
                           self.read(reads.credit_backlog), wait_s, cpu_s,
                           self.read(reads.xcredit_outbox))


__all__ = ["Books", "BooksLedger", "Ledger", "Tx"]
