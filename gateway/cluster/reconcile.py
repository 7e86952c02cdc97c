"""The cluster reconcile (``hongbao reconcile --cluster FILE``): every SET's books and the
credit stream, checked together.

What it proves, each failure a line naming the SETs, the transfer id and the amounts:

1. each SET balances on its own (its AdminService/Reconcile, without the bank);
2. the accounts of all SETs together sum to zero;
3. on each SET, every ``x:<peer>`` balance is what the credits it lists add up to
   (sent to the peer minus applied from it), both read from one snapshot of that SET;
4. every credit a SET sent (by transfer id) is in its relay's outbox, or in the stream, or
   applied on its home SET with the same amount, and on no other SET; every credit a SET
   applied was sent by the SET it names, to it, with that amount; every message in the
   stream is a credit its sender sent, with that home and amount. With each SET's own
   audit (a grab's credit booked exactly once, or waiting on that SET's credit outbox)
   this is: every grab cluster-wide is credited exactly once or is in flight;
5. per direction A -> B: sent - applied = in flight (outbox + stream, not yet applied);
   per pair: A's ``x:B`` plus B's ``x:A`` = the credits in flight both ways;
6. with ``--bank`` (in ``gateway.ops.reconcile``), the bank cross-check over all SETs.

A SET that cannot be reached is a discrepancy, and nothing that needs its listing is
claimed either way.

**Reading order, under live traffic.** The SETs are reached over gRPC (they run on other
hosts) and the stream over NATS, so the reads cannot be one snapshot. What makes them
safe is that a credit only moves forward: booked on A into its outbox -> published to the
stream (PubAck) -> off A's outbox -> applied on B -> acknowledged, off the stream. So:

- phase 1: every SET's audit and listing (concurrently);
- phase 2: the stream (every message still in it: work-queue retention keeps exactly the
  unacknowledged ones), after every phase-1 listing has answered;
- phase 3: the listing again of the SETs phase 1 and 2 leave something unexplained for,
  after the stream: a credit A sent that is neither in A's outbox (phase 1), nor in the
  stream, nor applied on B in phase 1 was acknowledged between A's read and the stream's,
  so it was applied before the stream was read: B's phase-3 listing shows it. A credit
  B applied (phase 1), or a message in the stream, that A's phase-1 listing does not show
  was sent after A was read: A's phase-3 listing (after both) shows it, and only then is
  "never sent" said. Each SET is read at most twice.

The cut is phase 1: the per-direction figures count the credits each sender had sent by
its phase-1 read. Credits that moved between two SETs' phase-1 reads appear in the pair
check as the skew they are (applied later than the receiver's read: counted; applied
already but sent after the sender's read: taken off), and both are zero on a quiet cluster,
where the pair check is exactly x:B + x:A = in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.js import errors as js_errors

from gateway.cluster import bus
from gateway.domain.reads import Direction, InterSetCredits

STREAM_READ_LIMIT = 200_000  # messages; past it the stream is not proven (a backlog that
# large means a SET's consumer has been down for long: that is the finding anyway)

_Key = tuple[str, str]  # (sending SET, transfer id)


class SetUnreachable(Exception):
    """A SET did not answer, or answered something that is not a listing: the message says
    which SET, where, and what went wrong."""


@dataclasses.dataclass(frozen=True)
class SetAudit:
    """One SET's own reconcile, without the bank cross-check."""

    balanced: bool
    discrepancies: list[str]
    totals: dict
    in_flight: list[dict]  # its open card payments (the bank check over all SETs needs them)


class SetSource(Protocol):
    """How the gathering reaches one SET (gRPC in ``gateway.ops.reconcile``; in-process
    ledgers in the tests). Both calls raise :class:`SetUnreachable` when it cannot."""

    name: str
    address: str

    async def audit(self) -> SetAudit: ...

    async def listing(self) -> InterSetCredits: ...


@dataclasses.dataclass(frozen=True)
class StreamEntry:
    seq: int
    home: str  # the SET of its subject, credit.<home>
    sender: str  # "" when the message is not a credit
    transfer_id: str
    amount_fen: int
    error: str = ""  # why it is not a credit


@dataclasses.dataclass(frozen=True)
class StreamState:
    entries: list[StreamEntry]
    complete: bool  # False: it held more than the read limit
    messages: int  # as the stream's info said before the read


async def read_stream(js: Any, limit: int = STREAM_READ_LIMIT) -> StreamState:
    """Every message still in ``HONGBAO_CREDITS``, oldest first, read one by one from the
    stream's leader (``get_msg`` with next-by-subject: no consumer, since a work-queue
    stream refuses a consumer overlapping the SETs' own). Messages stored after the read
    began are left out: a credit the phase-1 listings show as gone from its outbox was
    published before them. A stream that does not exist yet is empty."""
    try:
        info = await js.stream_info(bus.STREAM)
    except js_errors.NotFoundError:
        return StreamState([], True, 0)
    seq, last = max(info.state.first_seq, 1), info.state.last_seq
    entries: list[StreamEntry] = []
    while seq <= last:
        if len(entries) >= limit:
            return StreamState(entries, False, info.state.messages)
        try:
            msg = await js.get_msg(bus.STREAM, seq, subject="credit.>", next=True)
        except js_errors.NotFoundError:
            break
        if msg.seq > last:
            break
        entries.append(_entry(msg.seq, msg.subject, msg.data or b""))
        seq = msg.seq + 1
    return StreamState(entries, True, info.state.messages)


def _entry(seq: int, subject: str, data: bytes) -> StreamEntry:
    home = subject.removeprefix("credit.")
    try:
        sender, credit = bus.decode(data, home)
    except (ValueError, KeyError, TypeError) as exc:
        return StreamEntry(seq, home, "", "", 0, repr(exc)[:200])
    return StreamEntry(seq, home, sender, credit.transfer_id, credit.amount_fen)


# -- gathering ------------------------------------------------------------------------------

@dataclasses.dataclass
class Gathered:
    """Everything the checks look at, read in the order the module docstring explains."""

    addresses: dict[str, str]
    audits: dict[str, SetAudit]
    first: dict[str, InterSetCredits]  # phase 1
    stream: StreamState  # phase 2
    later: dict[str, InterSetCredits]  # phase 3 (only the SETs that needed it)
    failures: dict[str, str]  # SET -> why it could not be read


async def gather(sources: list[SetSource],
                 read_stream_state: Callable[[], Awaitable[StreamState]]) -> Gathered:
    """Phase 1 (audits and listings), phase 2 (the stream), phase 3 (re-reads)."""
    failures: dict[str, str] = {}

    async def ask(source: SetSource, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except SetUnreachable as exc:
            failures.setdefault(source.name, str(exc))
            return None

    audits = await asyncio.gather(*(ask(s, s.audit()) for s in sources))
    firsts = await asyncio.gather(*(ask(s, s.listing()) for s in sources))
    first = {s.name: got for s, got in zip(sources, firsts, strict=True) if got is not None}
    stream = await read_stream_state()
    again = [s for s in sources if s.name in rereads_needed(first, stream)]
    laters = await asyncio.gather(*(ask(s, s.listing()) for s in again))
    return Gathered({s.name: s.address for s in sources},
                    {s.name: a for s, a in zip(sources, audits, strict=True) if a is not None},
                    first, stream,
                    {s.name: got for s, got in zip(again, laters, strict=True)
                     if got is not None},
                    failures)


def rereads_needed(first: dict[str, InterSetCredits], stream: StreamState) -> set[str]:
    """The SETs to read again after the stream: receivers of a credit found nowhere yet,
    senders of an applied credit or a stream message their first listing does not show."""
    sent: dict[_Key, tuple[str, bool]] = {}
    applied: set[tuple[str, str, str]] = set()  # (sender, tid, receiver)
    for name, listing in first.items():
        for c in listing.credits:
            if c.direction == Direction.SENT:
                sent[(name, c.transfer_id)] = (c.peer, c.in_outbox)
            else:
                applied.add((c.peer, c.transfer_id, name))
    seen = applied | {(e.sender, e.transfer_id, e.home) for e in stream.entries if not e.error}
    need = set()
    for (sender, tid), (home, in_outbox) in sent.items():
        if not in_outbox and (sender, tid, home) not in seen:
            need.add(home)
    for sender, tid, _where in seen:
        if (sender, tid) not in sent:
            need.add(sender)
    return need & first.keys()


# -- the checks -----------------------------------------------------------------------------

@dataclasses.dataclass
class Flow:
    """Credits one way between two SETs, at the cut (each sender's phase-1 listing)."""

    sent: int = 0
    sent_fen: int = 0
    applied: int = 0
    applied_fen: int = 0
    in_outbox: int = 0
    in_outbox_fen: int = 0
    in_stream: int = 0  # in the stream, not yet applied
    in_stream_fen: int = 0
    late_fen: int = 0  # applied after the receiver's phase-1 read (found in phase 3)
    newer_fen: int = 0  # applied by the receiver's phase-1 read, sent after the sender's

    @property
    def in_flight_fen(self) -> int:
        return self.in_outbox_fen + self.in_stream_fen


@dataclasses.dataclass
class ClusterReport:
    sets: dict[str, dict] = dataclasses.field(default_factory=dict)
    flows: dict[tuple[str, str], Flow] = dataclasses.field(default_factory=dict)
    stream: dict = dataclasses.field(default_factory=dict)
    totals: dict = dataclasses.field(default_factory=dict)
    in_flight_payments: list[dict] = dataclasses.field(default_factory=list)
    bank: dict | None = None
    discrepancies: list[str] = dataclasses.field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return not self.discrepancies

    def bad(self, what: str) -> None:
        self.discrepancies.append(what)

    def flow(self, sender: str, home: str) -> Flow:
        return self.flows.setdefault((sender, home), Flow())

    def to_json(self) -> str:
        flows = [{"from": a, "to": b, **dataclasses.asdict(f), "in_flight_fen": f.in_flight_fen}
                 for (a, b), f in sorted(self.flows.items())]
        return json.dumps({"balanced": self.balanced, "sets": self.sets, "flows": flows,
                           "stream": self.stream, "totals": self.totals,
                           "in_flight_payments": self.in_flight_payments, "bank": self.bank,
                           "discrepancies": self.discrepancies}, indent=2, sort_keys=True)

    def to_text(self) -> str:
        lines = []
        for name, s in sorted(self.sets.items()):
            state = ("unreachable" if not s.get("reached") else
                     "balanced" if s.get("balanced") else "NOT balanced")
            x = " ".join(f"x:{p} {v:+}" for p, v in sorted(s.get("interset_fen", {}).items()))
            lines.append(f"SET {name:<10} {s['address']:<22} {state:<12} {x}".rstrip())
        for (a, b), f in sorted(self.flows.items()):
            lines.append(f"credits {a} -> {b}: sent {f.sent} ({f.sent_fen} fen), applied "
                         f"{f.applied} ({f.applied_fen} fen), in flight {f.in_flight_fen} fen "
                         f"(outbox {f.in_outbox}, stream {f.in_stream})")
        st = self.stream
        lines.append(f"stream {bus.STREAM}: {st.get('messages', 0)} messages "
                     f"({st.get('applied_not_acked', 0)} applied, not yet acknowledged)")
        if self.bank is not None:
            lines.append(f"bank merchant {self.bank['merchant_balance_fen']} fen "
                         f"(expected {self.bank['expected_fen']}, over {len(self.sets)} SETs)")
        if self.balanced:
            lines.append(f"BALANCED: every fen is accounted for, across {len(self.sets)} SETs")
        else:
            lines.append(f"NOT BALANCED: {len(self.discrepancies)} discrepancies")
            lines.extend(f"  - {d}" for d in self.discrepancies[:100])
        return "\n".join(lines)


@dataclasses.dataclass
class _Index:
    sent: dict[_Key, tuple[str, int, bool]]  # phase 1: -> (home, amount, in outbox)
    sent_later: dict[_Key, tuple[str, int, bool]]  # phase 3
    applied: dict[_Key, dict[str, tuple[int, bool]]]  # -> receiver -> (amount, in phase 1)
    stream: dict[_Key, list[StreamEntry]]


def _index(g: Gathered) -> _Index:
    def sent_of(listings: dict[str, InterSetCredits]) -> dict[_Key, tuple[str, int, bool]]:
        return {(name, c.transfer_id): (c.peer, c.amount_fen, c.in_outbox)
                for name, listing in listings.items() for c in listing.credits
                if c.direction == Direction.SENT}

    applied: dict[_Key, dict[str, tuple[int, bool]]] = defaultdict(dict)
    for phase1, listings in ((True, g.first), (False, g.later)):
        for name, listing in listings.items():
            for c in listing.credits:
                if c.direction == Direction.APPLIED:
                    applied[(c.peer, c.transfer_id)].setdefault(name, (c.amount_fen, phase1))
    stream: dict[_Key, list[StreamEntry]] = defaultdict(list)
    for e in g.stream.entries:
        if not e.error:
            stream[(e.sender, e.transfer_id)].append(e)
    return _Index(sent_of(g.first), sent_of(g.later), applied, stream)


def check(g: Gathered) -> ClusterReport:
    """Checks 1-5 over what :func:`gather` read (pure: no I/O)."""
    r = ClusterReport()
    _check_sets(r, g)
    ix = _index(g)
    _check_sent(r, g, ix)
    _check_applied(r, g, ix)
    _check_stream(r, g, ix)
    _check_flows(r, g)
    return r


def _check_sets(r: ClusterReport, g: Gathered) -> None:
    """Checks 1-3, and a line for each SET that could not be read."""
    total = 0
    for name, address in g.addresses.items():
        audit, listing = g.audits.get(name), g.first.get(name)
        r.sets[name] = {"address": address, "reached": name not in g.failures}
        if name in g.failures:
            r.bad(g.failures[name])
        if audit is not None:
            r.sets[name].update(balanced=audit.balanced,
                                account_sum_fen=audit.totals.get("account_sum_fen", 0))
            total += audit.totals.get("account_sum_fen", 0)
            r.discrepancies.extend(f"SET {name}: {d}" for d in audit.discrepancies)
            r.in_flight_payments.extend(dict(p, set=name) for p in audit.in_flight)
        if listing is not None:
            r.sets[name]["interset_fen"] = dict(listing.balances)
            _check_own_balances(r, name, listing, g.addresses)
    if total != 0:
        r.bad(f"the accounts of all SETs sum to {total} fen, not 0")
    by_channel: dict[str, int] = defaultdict(int)
    for a in g.audits.values():
        for ch, fen in a.totals.get("channel_in_fen", {}).items():
            by_channel[ch] += fen
    r.totals = {"sets": len(g.addresses), "account_sum_fen": total,
                "clearing_in_fen": sum(a.totals.get("clearing_in_fen", 0)
                                       for a in g.audits.values()),
                "channel_in_fen": dict(sorted(by_channel.items()))}


def _check_own_balances(r: ClusterReport, name: str, listing: InterSetCredits,
                        addresses: dict[str, str]) -> None:
    """Check 3: x:<peer> against the credits listed with it, in the same snapshot."""
    sent: dict[str, int] = defaultdict(int)
    applied: dict[str, int] = defaultdict(int)
    for c in listing.credits:
        (sent if c.direction == Direction.SENT else applied)[c.peer] += c.amount_fen
    for peer in sorted(set(sent) | set(applied) | set(listing.balances)):
        if peer not in addresses:
            r.bad(f"SET {name} has inter-SET credits with SET {peer}, which the slot map "
                  "does not have")
        held, journal = listing.balances.get(peer, 0), sent[peer] - applied[peer]
        if held != journal:
            r.bad(f"SET {name}: x:{peer} holds {held} fen, but its inter-SET credits give "
                  f"{journal} fen (sent {sent[peer]}, applied {applied[peer]})")


def _check_sent(r: ClusterReport, g: Gathered, ix: _Index) -> None:
    """Check 4 for every credit a SET sent by its phase-1 read."""
    for (sender, tid), (home, amount, in_outbox) in ix.sent.items():
        f = r.flow(sender, home)
        f.sent += 1
        f.sent_fen += amount
        where = ix.applied.get((sender, tid), {})
        if len(where) > 1:
            r.bad(f"credit {tid} from SET {sender} was applied on {len(where)} SETs: "
                  f"{', '.join(sorted(where))}")
        if home in where:
            got, phase1 = where[home]
            f.applied += 1
            f.applied_fen += got
            f.late_fen += 0 if phase1 else got
            if got != amount:
                r.bad(f"credit {tid} {sender} -> {home}: SET {sender} sent {amount} fen, "
                      f"SET {home} applied {got} fen")
        elif where:
            r.bad(f"credit {tid} ({amount} fen) was sent by SET {sender} to SET {home} but "
                  f"applied on SET {', '.join(sorted(where))}")
        elif in_outbox:
            f.in_outbox += 1
            f.in_outbox_fen += amount
        elif any(e.home == home for e in ix.stream.get((sender, tid), ())):
            f.in_stream += 1
            f.in_stream_fen += amount
        elif home not in g.failures:
            r.bad(f"credit {tid} {sender} -> {home} ({amount} fen) is lost: not in SET "
                  f"{sender}'s outbox, not in the stream, not applied on SET {home}")


def _check_applied(r: ClusterReport, g: Gathered, ix: _Index) -> None:
    """Check 4 for every credit a SET applied by its phase-1 read that no phase-1 listing
    of its sender shows (those it shows are checked with the sender's credits)."""
    for name, listing in g.first.items():
        for c in listing.credits:
            key = (c.peer, c.transfer_id)
            if c.direction != Direction.APPLIED or key in ix.sent:
                continue
            later = ix.sent_later.get(key)
            if later is None:
                if c.peer in g.addresses and c.peer not in g.failures:
                    r.bad(f"credit {c.transfer_id} applied on SET {name} ({c.amount_fen} fen "
                          f"from SET {c.peer}) was never sent by SET {c.peer}")
                continue
            home, amount, _outbox = later
            if home != name:
                r.bad(f"credit {c.transfer_id} was sent by SET {c.peer} to SET {home} but "
                      f"applied on SET {name}")
            elif amount != c.amount_fen:
                r.bad(f"credit {c.transfer_id} {c.peer} -> {name}: SET {c.peer} sent "
                      f"{amount} fen, SET {name} applied {c.amount_fen} fen")
            else:
                r.flow(c.peer, name).newer_fen += c.amount_fen


def _check_stream(r: ClusterReport, g: Gathered, ix: _Index) -> None:
    """Check 4 for every message in the stream."""
    st = g.stream
    applied_not_acked = 0
    for e in st.entries:
        if e.error:
            r.bad(f"stream message {e.seq} on credit.{e.home} is not a credit: {e.error}")
            continue
        key = (e.sender, e.transfer_id)
        sent = ix.sent.get(key) or ix.sent_later.get(key)
        if sent is None:
            if e.sender not in g.failures:
                r.bad(f"stream message {e.seq} carries credit {e.transfer_id} "
                      f"({e.amount_fen} fen {e.sender} -> {e.home}), which SET {e.sender} "
                      "never sent")
        elif (sent[0], sent[1]) != (e.home, e.amount_fen):
            r.bad(f"stream message {e.seq} carries credit {e.transfer_id} as {e.amount_fen} "
                  f"fen {e.sender} -> {e.home}; SET {e.sender} sent {sent[1]} fen to "
                  f"SET {sent[0]}")
        applied_not_acked += e.home in ix.applied.get(key, {})
    if not st.complete:
        r.bad(f"the stream holds {st.messages} messages, more than the {len(st.entries)} "
              "reconcile reads: the credits in flight are not proven")
    r.stream = {"messages": len(st.entries), "applied_not_acked": applied_not_acked,
                "complete": st.complete}


def _check_flows(r: ClusterReport, g: Gathered) -> None:
    """Check 5: per direction, and per pair of SETs both read."""
    for (a, b), f in sorted(r.flows.items()):
        if b in g.first and f.sent_fen - f.applied_fen != f.in_flight_fen:
            r.bad(f"credits {a} -> {b}: sent {f.sent_fen} fen, applied {f.applied_fen} fen, "
                  f"but {f.in_flight_fen} fen are in flight (outbox {f.in_outbox_fen}, "
                  f"stream {f.in_stream_fen})")
    names = sorted(g.first)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ab, ba = r.flows.get((a, b), Flow()), r.flows.get((b, a), Flow())
            x_ab = g.first[a].balances.get(b, 0)
            x_ba = g.first[b].balances.get(a, 0)
            in_flight = ab.in_flight_fen + ba.in_flight_fen
            skew = ab.late_fen + ba.late_fen - ab.newer_fen - ba.newer_fen
            if x_ab + x_ba != in_flight + skew:
                moved = f" (and {skew:+} fen moved during the reads)" if skew else ""
                r.bad(f"SETs {a} and {b}: x:{b} on {a} ({x_ab} fen) plus x:{a} on {b} "
                      f"({x_ba} fen) is {x_ab + x_ba} fen, but {in_flight} fen are in "
                      f"flight between them{moved}")
