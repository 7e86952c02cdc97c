"""Grabbing: the grab gate answers the flood, the ledger's writer decides the rest.

The gate (``hotpath.GrabGate``) only caches facts that never change back
(sold out; this user holds a share), so gates of several worker processes
never disagree with the ledger, which stays the source of truth. The gate's
SOLD_OUT and ALREADY answers are confirmed with one ledger read for the one
case they could hide: this user's own earlier grab, which a retry must get
back.
"""

from __future__ import annotations

from collections.abc import Callable

import hotpath
from gateway import errors
from gateway.domain.keys import request_digest
from gateway.domain.model import EnvelopeStatus, EnvelopeView, GrabOutcome, GrabResult
from gateway.ledger import Ledger
from gateway.usecases.checks import check_envelope_id, check_request_id, check_user_id


def _nothing() -> None:
    pass


class Grabbing:
    def __init__(self, ledger: Ledger, gate: hotpath.GrabGate) -> None:
        self._ledger = ledger
        self.gate = gate
        # Called after a write that may have published credits (the credit consumer's
        # wake-up, on the worker that runs it; other workers' grabs are found by its look).
        self.on_credit: Callable[[], None] = _nothing

    async def _track(self, envelope_id: str, env_key: bytes) -> None:
        state = await self._ledger.envelope_state(envelope_id)
        if state is None:
            raise errors.NotFound("ENVELOPE_NOT_FOUND", "no such envelope")
        sold_out = state.status == EnvelopeStatus.SOLD_OUT or state.claimed >= state.count
        self.gate.track(env_key, state.count, state.claimed, sold_out,
                        await self._ledger.grabbers(envelope_id))

    async def _replay(self, user_id: str, envelope_id: str, request_id: str
                      ) -> GrabResult | None:
        """The answer for a user who already holds a share; None if they hold none."""
        found = await self._ledger.find_grab(user_id, envelope_id)
        if found is None:
            return None
        if found.request_digest != request_digest(request_id):
            return GrabResult(GrabOutcome.ALREADY_GRABBED, 0, found.remaining_count)
        return GrabResult(GrabOutcome.GRABBED, found.grab.amount_fen, found.remaining_count,
                          found.grab.credited)

    def _gate(self, user_id: str, envelope_id: str, request_id: str) -> int:
        """Checks the ids and asks the gate: >= 0 admitted (a share reserved), < 0 see
        :meth:`_confirm`. No await: the common case costs one call into the gate."""
        check_envelope_id(envelope_id)
        check_request_id(request_id)
        return self.gate.admit(envelope_id.encode(), user_id.encode())

    async def _confirm(self, user_id: str, envelope_id: str, request_id: str, verdict: int
                       ) -> tuple[int, GrabResult | None]:
        """A verdict that needs the ledger: track an envelope the gate does not know yet,
        or confirm a refusal."""
        if verdict == hotpath.GATE_UNTRACKED:
            env_key = envelope_id.encode()
            await self._track(envelope_id, env_key)
            verdict = self.gate.admit(env_key, user_id.encode())
            if verdict >= 0:
                return verdict, None
        return verdict, await self._refused(user_id, envelope_id, request_id, verdict)

    async def _refused(self, user_id: str, envelope_id: str, request_id: str, verdict: int
                       ) -> GrabResult | None:
        """The answer to a gate refusal, or None when only the writer can tell."""
        replay = await self._replay(user_id, envelope_id, request_id)
        if replay is not None:
            return replay
        if verdict == hotpath.GATE_SOLD_OUT:
            return GrabResult(GrabOutcome.SOLD_OUT, 0, 0)
        # ALREADY without a grab in the ledger: the user's other request is in
        # flight, or a hash collision; the writer knows which.
        return None

    def _settle(self, user_id: str, envelope_id: str, verdict: int,
                result: GrabResult | errors.GatewayError) -> None:
        """Teaches the gate what the writer decided."""
        env_key = envelope_id.encode()
        if isinstance(result, errors.GatewayError):
            if verdict >= 0:
                self.gate.release(env_key, user_id.encode())
            return
        outcome = result.outcome
        if outcome == GrabOutcome.GRABBED:
            if result.remaining_count == 0:
                self.gate.mark_sold_out(env_key)
        elif outcome == GrabOutcome.SOLD_OUT:
            if verdict >= 0:
                self.gate.release(env_key, user_id.encode())
            self.gate.mark_sold_out(env_key)
        elif outcome == GrabOutcome.EXPIRED and verdict >= 0:
            self.gate.release(env_key, user_id.encode())

    async def grab(self, user_id: str, envelope_id: str, request_id: str) -> GrabResult:
        """Claims one share."""
        verdict = self._gate(user_id, envelope_id, request_id)
        if verdict < 0:
            verdict, answer = await self._confirm(user_id, envelope_id, request_id, verdict)
            if answer is not None:
                return answer
        try:
            result = await self._ledger.grab(user_id, envelope_id, request_id)
        except errors.GatewayError as err:
            self._settle(user_id, envelope_id, verdict, err)
            raise
        self._settle(user_id, envelope_id, verdict, result)
        self.on_credit()
        return result

    async def grab_batch(self, items: list[tuple[str, str, str]]
                         ) -> list[GrabResult | errors.GatewayError]:
        """(user, envelope, request id) grabs; those that need a write share one writer request.

        An item the gate admits costs no await; only the rare ones (an envelope
        not yet tracked, a refusal to confirm) go to the ledger (:meth:`_confirm`).
        """
        results: list = [None] * len(items)
        verdicts: list[int] = [0] * len(items)
        to_write: list[int] = []
        for i, (user_id, envelope_id, request_id) in enumerate(items):
            try:
                check_user_id(user_id)
                verdict = self._gate(user_id, envelope_id, request_id)
                if verdict < 0:
                    verdict, results[i] = await self._confirm(user_id, envelope_id,
                                                              request_id, verdict)
                verdicts[i] = verdict
            except errors.GatewayError as err:
                results[i] = err
                verdicts[i] = -1
                continue
            if results[i] is None:
                to_write.append(i)
        if to_write:
            written = await self._ledger.grab_many([items[i] for i in to_write])
            for i, result in zip(to_write, written, strict=True):
                self._settle(items[i][0], items[i][1], verdicts[i], result)
                results[i] = result
            self.on_credit()
        return results

    async def get_envelope(self, envelope_id: str) -> EnvelopeView:
        check_envelope_id(envelope_id)
        return await self._ledger.get_envelope(envelope_id)
