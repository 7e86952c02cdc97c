"""A SET's cluster series on its metrics page: the map version, the calls it forwarded, its
relay's outbox and published credits, the credits from other SETs it applied."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.client import Client
from gateway.ops.clusterproc import LocalCluster
from hongbao.v1 import envelope_pb2
from tests.test_cluster_serve import _fund_and_send, _until, assert_sets_balanced, md, user_on
from tests.test_metrics import scrape, value


def _metrics_port(log_text: str) -> int:
    ports = [json.loads(line)["port"] for line in log_text.splitlines()
             if '"metrics_serving"' in line]
    assert ports, "no metrics_serving line"
    return ports[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_nats):
    c = LocalCluster(tmp_path_factory.mktemp("metrics"), sets=2,
                     set_args=("--metrics-port", "0"), nats=shared_nats)
    with c:
        yield c
        assert_sets_balanced(c)


def test_a_cross_set_grab_shows_on_both_sets_metrics(cluster):
    """A grab asked of s2 for s1's envelope is forwarded (s2 counts it), its credit is
    published by s1's relay and applied on s2, and s1's outbox is empty again."""
    alice, bob = user_on(cluster, "s1", "m-alice"), user_on(cluster, "s2", "m-bob")

    async def scenario():
        async with Client(cluster.sets["s2"].address) as via2:
            env = await _fund_and_send(via2, md(cluster, alice), "m1", 500, 1)
            await via2.envelopes.GrabEnvelope(envelope_pb2.GrabEnvelopeRequest(
                envelope_id=env, request_id="g"), metadata=md(cluster, bob))

    asyncio.run(scenario())
    p1 = _metrics_port(cluster.sets["s1"].log.read_text())
    p2 = _metrics_port(cluster.sets["s2"].log.read_text())

    async def landed():
        page = scrape(p2)
        return page if page.get(("hongbao_cluster_credits_applied_total", ())) == 1 else None

    s2 = asyncio.run(_until(landed))
    s1 = scrape(p1)
    assert value(s1, "hongbao_cluster_map_version") == value(s2, "hongbao_cluster_map_version") == 1
    assert value(s2, "hongbao_cluster_forwarded_total") >= 3   # top-up, send, grab
    assert value(s1, "hongbao_cluster_relay_published_total") == 1
    assert value(s1, "hongbao_cluster_outbox") == 0
