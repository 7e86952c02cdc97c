"""The invariants at the end of a run, after the world settled.

- ``books``: the conservation audit passes (after every call too, see ``run``);
- ``channel``: the bank never refused a call WRONG_CHANNEL (an order id goes through one
  channel, and the gateway asks about it there only: a refusal fails the run the moment
  it happens, see ``run``), and every bank order is on the channel its payment names;
- ``bank-agrees``: what the bank holds for the gateway equals the books (reconcile's
  check 6), and every payment agrees with its bank order: succeeded <-> settled,
  refunded <-> refunded, failed <-> never settled; the bank has no order the books do
  not know;
- ``acknowledged``: every call answered ok is in the books (the payment, the envelope
  with its total, the grab with its amount);
- ``one-share``: nobody holds two shares of one envelope;
- ``retry``: every call is sent once more with its request id: an ok call answers the
  same (a payment that was still unclear may now be finished), a recorded refusal
  refuses again for the same reason, and an unknown call answers what the books hold
  (a grab that landed replays its share; one that did not is not granted now).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.domain import keys, records
from gateway.domain.model import GrabOutcome, Payment, PaymentStatus
from gateway.payments.bank import OrderStatus
from gateway.payments.crosscheck import cross_check_bank

if TYPE_CHECKING:
    from gateway.sim.run import Call, Sim

# Refusals a card payment records: a retry must meet them again.
_RECORDED = frozenset({"CARD_DECLINED", "CARD_INSUFFICIENT_FUNDS", "BANK_ORDER_VOIDED",
                       "BANK_ORDER_ID_REUSED", "BANK_BUSY", "BANK_CHANNEL_DOWN"})
_AGREES = {PaymentStatus.SUCCEEDED: (OrderStatus.SETTLED,),
           PaymentStatus.REFUNDED: (OrderStatus.REFUNDED,),
           PaymentStatus.FAILED: (OrderStatus.NOT_FOUND, OrderStatus.DECLINED,
                                  OrderStatus.VOIDED)}


def _payments(tx) -> list[Payment]:
    return [records.unpack_payment(raw)[0] for _k, raw in tx.scan(keys.PAYMENTS)]


async def final(sim: Sim) -> None:
    """The checks in order; the first that fails ends the run (what it says is the cause,
    what later checks would say is mostly its echo)."""
    steps = [lambda: books_and_bank(sim, "at the end"), lambda: acknowledged(sim),
             lambda: one_share(sim), lambda: retries(sim),
             lambda: books_and_bank(sim, "after the retries")]
    for step in steps:
        await step()
        if sim.world.failures:
            return


async def books_and_bank(sim: Sim, when: str) -> None:
    w = sim.world
    sim.checks += 1
    if sim.bank.wrong_channel:
        w.fail("channel", f"{when}: the bank refused {len(sim.bank.wrong_channel)} calls "
               f"WRONG_CHANNEL, the first: {sim.bank.wrong_channel[0]}")
        return
    report = await w.store.audit()
    await cross_check_bank(report, sim.bank)
    if not report.balanced:
        w.fail("bank-agrees" if "bank holds" in report.discrepancies[0] else "books",
               f"{when}: {report.discrepancies[0]}")
        return
    payments = w.store.read(_payments)
    ids = {p.payment_id for p in payments}
    for p in payments:
        sim.checks += 1
        status = sim.bank.status(p.payment_id)
        if p.open or status not in _AGREES[p.status]:
            w.fail("bank-agrees", f"{when}: payment {p.payment_id} ({p.kind}) is "
                   f"{p.status.name}, the bank's order is {status.name}")
            return
        owner = sim.bank.owner(p.payment_id)
        if owner not in (None, p.channel):
            w.fail("channel", f"{when}: payment {p.payment_id} ({p.kind}) names the "
                   f"{p.channel} channel, the bank holds its order on {owner}")
            return
    stray = [o for o, order in sim.bank.orders.items()
             if o not in ids and order.status == OrderStatus.SETTLED]
    if stray:
        w.fail("bank-agrees", f"{when}: the bank settled orders the books do not know: {stray}")


async def acknowledged(sim: Sim) -> None:
    store = sim.world.store
    for call in sim.calls.values():
        if call.outcome != "ok":
            continue
        sim.checks += 1
        v, op = call.value, call.op
        missing = ""
        if op.kind in ("topup", "withdraw"):
            if await store.get_payment(v.payment_id) is None:
                missing = f"payment {v.payment_id}"
        elif op.kind == "send":
            env = await store.get_envelope(v.envelope_id)
            if env.total_fen != op.amount or env.sender_id != f"u{op.user}":
                missing = f"envelope {v.envelope_id} of {op.amount} fen"
        elif v.outcome == GrabOutcome.GRABBED:
            found = await store.find_grab(f"u{op.user}", call.args[0])
            if found is None or found.grab.amount_fen != v.amount_fen:
                missing = f"grab of {v.amount_fen} fen from {call.args[0]}"
        if missing:
            sim.world.fail("acknowledged", f"op {op.id} answered ok but the books lack {missing}")
            return


async def one_share(sim: Sim) -> None:
    from gateway.sim.run import envelope_of
    for call in sim.calls.values():
        env_id = envelope_of(call)
        if env_id is None:
            continue
        sim.checks += 1
        grabbers = [g.user_id for g in (await sim.world.store.get_envelope(env_id)).grabs]
        if len(grabbers) != len(set(grabbers)):
            sim.world.fail("one-share", f"envelope {env_id} grabbed twice by one user: "
                           f"{sorted(grabbers)}")
            return


async def retries(sim: Sim) -> None:
    from gateway.sim.run import Call
    sim.world.crashes = set()   # the retries run on a process that stays up
    firsts = [c for key, c in sim.calls.items()
              if key == c.op.id and c.outcome in ("ok", "fail", "unknown")]
    for first in firsts:
        again = Call(first.op, first.args)
        await sim.send(again, 30.0)
        sim.checks += 1
        problem = await _compare(sim, first, again)
        if problem:
            sim.world.fail("retry", f"op {first.op.id} ({first.op.kind}), first {first.outcome}"
                           f" {_show(first)}, retried {again.outcome} {_show(again)}: {problem}")
            return


def _show(call: Call) -> str:
    from gateway.sim.run import summary
    return str(summary(call.value)[1:]) if call.outcome == "ok" else str(call.value)


async def _compare(sim: Sim, first: Call, again: Call) -> str:
    from gateway.sim.run import summary
    if again.outcome == "unknown":
        return "a retry on a settled world must get an answer"
    if first.op.kind == "grab":
        return await _compare_grab(sim, first, again)
    if first.outcome == "ok":
        if again.outcome != "ok":
            return "an acknowledged call must answer the same"
        a, b = summary(first.value), summary(again.value)
        if a[:2] != b[:2]:
            return "a different payment or envelope"
        if isinstance(first.value, Payment) and not first.value.open and a != b:
            return "a finished payment changed"
        if isinstance(again.value, Payment) and again.value.open:
            return "still unclear after the world settled"
        return ""
    recorded = first.outcome == "fail" and first.value in _RECORDED and first.op.kind != "send"
    if recorded and (again.outcome != "fail" or again.value != first.value):
        return "a recorded refusal must refuse again, for the same reason"
    return ""


async def _compare_grab(sim: Sim, first: Call, again: Call) -> str:
    op = first.op
    found = await sim.world.store.find_grab(f"u{op.user}", first.args[0])
    got = again.value if again.outcome == "ok" else None
    granted = got is not None and got.outcome == GrabOutcome.GRABBED
    ours = found is not None and found.request_digest == keys.request_digest(op.request_id)
    if ours:
        assert found is not None
        if got is None or not granted or got.amount_fen != found.grab.amount_fen:
            return f"the books hold this grab's share of {found.grab.amount_fen} fen"
    elif granted:
        return "a grab the books do not hold was granted on retry, after every envelope expired"
    if first.outcome == "ok" and first.value.outcome == GrabOutcome.GRABBED and not ours:
        return "an acknowledged grab is missing"
    return ""

