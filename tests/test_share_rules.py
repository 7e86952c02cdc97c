"""The product's split rules, written independently of the implementation, on real shares.

Envelopes are sent through a real gateway and every share is grabbed (BatchGrab), so the
shares checked are the ones users get. The rules, as the product states them:

- every share is at least 1 fen and at most ``max_share_fen`` (20,000 by default);
- the shares add up to the total, to the fen; there are exactly ``count`` of them;
- NORMAL envelopes give everyone the same amount;
- LUCKY envelopes are fair in expectation: whatever the order of grabbing, each position's
  share averages total / count (the point of the double-mean rule: no advantage in being
  first), within sampling error over 300 envelopes.
"""

from __future__ import annotations

import asyncio
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.client import Client
from hongbao.v1 import envelope_pb2, wallet_pb2
from tests.conftest import Stack
from tests.test_gateway import top_up

MAX_SHARE_FEN = 20_000
LUCKY, NORMAL = envelope_pb2.ENVELOPE_KIND_LUCKY, envelope_pb2.ENVELOPE_KIND_NORMAL


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("shares"))
    try:
        stack.bank.start()
        (stack.root / "s.toml").write_text("user_rate_per_s = 0\n")
        stack.start_gateway("--config", str(stack.root / "s.toml"))
        yield stack
        stack.assert_balanced()
    finally:
        stack.stop()


_cards = iter(range(1, 10**6))   # each simulated card opens with 1,000,000 fen
_sends = iter(range(1, 10**9))   # request ids, unique across the module's examples


class Sender:
    def __init__(self, stack: Stack, c: Client) -> None:
        self.stack, self.c = stack, c
        self.meta = stack.meta("share-sender")
        self.batch = stack.meta("share-upstream", scopes=("batch",))

    async def _cover(self, total: int) -> None:
        while (await self.c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(), metadata=self.meta,
                                              timeout=10)).balance_fen < total:
            k = next(_cards)
            await top_up(self.c, self.meta, 1_000_000, rid=f"fund-{k}", card=f"icbc-{k}")

    async def shares(self, total: int, count: int, kind: int) -> list[int]:
        """Sends one envelope from the wallet and grabs every share, in grab order."""
        await self._cover(total)
        n = next(_sends)
        sent = await self.c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
            request_id=f"share-{n}", total_fen=total, count=count, kind=kind,
            pay_method=envelope_pb2.PAY_METHOD_BALANCE), metadata=self.meta, timeout=10)
        items = [envelope_pb2.BatchGrabItem(user_id=f"sg{i}", envelope_id=sent.envelope_id,
                                            request_id="g") for i in range(count)]
        got = [r async for r in self.c.envelopes.BatchGrab(
            iter([envelope_pb2.BatchGrabRequest(batch_id=n, items=items)]),
            metadata=self.batch, timeout=10)]
        results = [x for r in got for x in r.results]
        assert [x.outcome for x in results] == [envelope_pb2.GRAB_OUTCOME_GRABBED] * count
        return [x.amount_fen for x in results]


def _with_sender(live: Stack, body):
    async def main():
        async with Client(live.target) as c:
            return await body(Sender(live, c))
    return asyncio.run(main())


@st.composite
def envelopes(draw):
    count = draw(st.integers(1, 100))
    kind = draw(st.sampled_from([LUCKY, NORMAL]))
    if kind == NORMAL:
        per = draw(st.integers(1, MAX_SHARE_FEN))
        return count * per, count, kind
    return draw(st.integers(count, MAX_SHARE_FEN * count)), count, kind


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=envelopes())
def test_every_real_share_follows_the_product_rules(live, spec):
    total, count, kind = spec
    shares = _with_sender(live, lambda s: s.shares(total, count, kind))
    assert len(shares) == count
    assert sum(shares) == total
    assert all(1 <= x <= MAX_SHARE_FEN for x in shares)
    if kind == NORMAL:
        assert set(shares) == {total // count}


def test_lucky_shares_average_the_same_in_every_position(live):
    """300 envelopes of 10.00 yuan in 10 shares: each grab position averages 100 fen,
    within 5 standard errors of its own sample (3-4.5 fen here: the later positions
    spread wider, a standard deviation of about 58 fen first and 76 last). A position
    biased by a quarter (25 fen) is caught; an unbiased one fails about once in a million."""
    async def body(s: Sender):
        return [await s.shares(1_000, 10, LUCKY) for _ in range(300)]
    runs = _with_sender(live, body)
    means = [statistics.fmean(r[i] for r in runs) for i in range(10)]
    errors = [statistics.stdev(r[i] for r in runs) / len(runs) ** 0.5 for i in range(10)]
    assert all(abs(m - 100) <= 5 * e for m, e in zip(means, errors, strict=True)), (
        means, errors)
    assert all(e < 6 for e in errors), errors   # a spread that wide is a defect too
    assert all(sum(r) == 1_000 for r in runs)
    # Random, not fixed: many different first shares.
    assert len({r[0] for r in runs}) > 50
