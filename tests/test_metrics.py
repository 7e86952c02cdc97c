"""The Prometheus metrics: per-call series, state series read at scrape time, the dashboard."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.client import Client
from gateway.config import Settings
from gateway.domain.model import LedgerStats
from gateway.ops.procs import free_port
from gateway.qos.pressure import DEGRADATIONS
from gateway.security import tickets
from gateway.transport.app import build_app, open_ledger
from gateway.transport.metrics import MAX_SERIES, OTHER_METHOD, Metrics, Snapshot, serve_metrics
from gateway.usecases.operations import AdmissionState, QosStatus, TierCount, TopicLag
from hongbao.v1 import envelope_pb2
from tests.conftest import run
from tests.test_gateway import grab, send, top_up, wait_credited

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "hongbao.json"
GRAB = "/hongbao.v1.EnvelopeService/GrabEnvelope"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (sample name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(page: dict, metric: str, /, **labels: str) -> float:
    return page[(metric, tuple(sorted(labels.items())))]


def names(page: dict) -> set[str]:
    return {name for name, _ in page}


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(r.read().decode())


# -- per-call series, on a Metrics object's own registry -----------------------------------

def test_observe_rpc_counts_calls_and_fills_the_latency_histogram():
    """observe_rpc adds one call per (method, tier, code) and its duration to (method, tier)."""
    m = Metrics()
    m.observe_rpc(GRAB, "P0", "OK", 0.0004)
    m.observe_rpc(GRAB, "P0", "OK", 0.003)
    m.observe_rpc(GRAB, "P0", "RESOURCE_EXHAUSTED", 20.0)
    page = samples(m.render().decode())
    assert value(page, "hongbao_rpc_requests_total", method=GRAB, tier="P0", code="OK") == 2
    assert value(page, "hongbao_rpc_requests_total", method=GRAB, tier="P0",
                 code="RESOURCE_EXHAUSTED") == 1
    hist = {"method": GRAB, "tier": "P0"}
    assert value(page, "hongbao_rpc_duration_seconds_count", **hist) == 3
    assert abs(value(page, "hongbao_rpc_duration_seconds_sum", **hist) - 20.0034) < 1e-9
    assert value(page, "hongbao_rpc_duration_seconds_bucket", le="0.0005", **hist) == 1
    assert value(page, "hongbao_rpc_duration_seconds_bucket", le="0.005", **hist) == 2
    assert value(page, "hongbao_rpc_duration_seconds_bucket", le="10.0", **hist) == 2
    assert value(page, "hongbao_rpc_duration_seconds_bucket", le="+Inf", **hist) == 3


def test_shed_and_queuing_delay_are_counted():
    """shed counts by (tier, reason); observe_queuing fills the unlabelled histogram."""
    m = Metrics()
    for _ in range(3):
        m.shed("P3", "level")
    m.shed("P2", "level")
    m.observe_queuing(0.00005)
    m.observe_queuing(0.03)
    page = samples(m.render().decode())
    assert value(page, "hongbao_shed_total", tier="P3", reason="level") == 3
    assert value(page, "hongbao_shed_total", tier="P2", reason="level") == 1
    assert value(page, "hongbao_queuing_delay_seconds_count") == 2
    assert value(page, "hongbao_queuing_delay_seconds_bucket", le="0.0001") == 1
    assert value(page, "hongbao_queuing_delay_seconds_bucket", le="0.05") == 2


def test_each_metrics_object_has_its_own_registry():
    """Two Metrics in one process share no series (tests build several apps per process)."""
    a, b = Metrics(), Metrics()
    a.observe_rpc(GRAB, "P0", "OK", 0.001)
    assert value(samples(a.render().decode()), "hongbao_rpc_requests_total",
                 method=GRAB, tier="P0", code="OK") == 1
    assert "hongbao_rpc_requests_total" not in names(samples(b.render().decode()))


def test_method_label_sets_are_bounded():
    """Past MAX_SERIES label sets, calls of new method names are counted as method "other"."""
    m = Metrics()
    extra = 10
    for i in range(MAX_SERIES + extra):
        m.observe_rpc(f"/x.Y/M{i}", "exempt", "UNIMPLEMENTED", 0.001)
    page = samples(m.render().decode())
    methods = {dict(labels)["method"] for name, labels in page
               if name == "hongbao_rpc_requests_total"}
    assert len(methods) == MAX_SERIES + 1
    assert value(page, "hongbao_rpc_requests_total", method=OTHER_METHOD, tier="exempt",
                 code="UNIMPLEMENTED") == extra


# -- state series, from a Snapshot ---------------------------------------------------------

def _stats(**kw) -> LedgerStats:
    base = dict(queue_depth=3, batches=10, requests=40, batch_size_max=9, apply_s_total=0.5,
                commit_s_total=1.25, credit_backlog=7, queue_wait_s_total=0.75)
    return LedgerStats(**{**base, **kw})


def _bank(bank_id: str, state: str, channel: str = "direct") -> dict:
    return {"bank_id": bank_id, "channel": channel, "limit": 500, "in_flight": 2,
            "latency_ms_p99": 250.0, "error_rate": 0.125, "breaker_state": state,
            "traffic_share": 0.25 if channel == "direct" else 0.75, "calls": 40,
            "rerouted_in": 0 if channel == "direct" else 9}


def _admission() -> AdmissionState:
    tiers = [TierCount("P0", 100, 100, 0, False), TierCount("P3", 50, 20, 30, True)]
    return AdmissionState(True, 300, "P2", 44, 12.5, 3.0, 17, tiers,
                          {name: name == "moments_free" for name in DEGRADATIONS}, 0.5, 0.1)


def test_state_series_come_from_the_snapshot():
    """Writer, bus, butler, admission and degradation series show the snapshot's values."""
    m = Metrics()
    qos = QosStatus([TopicLag("credit", 7, 1000.0)],
                    [_bank("icbc", "open"), _bank("icbc", "closed", "clearing"),
                     _bank("ccb", "closed")], 3, _admission())
    m.update(Snapshot(qos, _stats(), {"balance_cache": 4}, 12, 99))
    page = samples(m.render().decode())
    assert value(page, "hongbao_writer_requests_total") == 40
    assert value(page, "hongbao_writer_commit_seconds_total") == 1.25
    assert value(page, "hongbao_writer_queue_wait_seconds_total") == 0.75
    assert value(page, "hongbao_bus_lag", topic="credit") == 7
    assert value(page, "hongbao_bus_rate_per_second", topic="credit") == 1000
    assert [value(page, "hongbao_butler_state", bank="icbc", channel="direct", state=s)
            for s in ("closed", "open", "half_open")] == [0, 1, 0]
    assert [value(page, "hongbao_butler_state", bank="icbc", channel="clearing", state=s)
            for s in ("closed", "open", "half_open")] == [1, 0, 0]
    assert value(page, "hongbao_bank_traffic_share", bank="icbc", channel="clearing") == 0.75
    assert value(page, "hongbao_bank_rerouted_total", bank="icbc", channel="clearing") == 9
    assert value(page, "hongbao_bank_latency_p99_seconds", bank="icbc",
                 channel="direct") == 0.25
    assert value(page, "hongbao_bank_error_rate", bank="ccb", channel="direct") == 0.125
    assert value(page, "hongbao_admission_level") == 300
    assert value(page, "hongbao_admission_window_delay_seconds") == 0.0125
    assert value(page, "hongbao_admission_windows_total") == 17
    assert value(page, "hongbao_tier_shed_total", tier="P3") == 30
    assert value(page, "hongbao_tier_shedding", tier="P3") == 1
    assert value(page, "hongbao_degradation_in_force", name="moments_free") == 1
    assert value(page, "hongbao_degraded_total", name="balance_cache") == 4
    assert value(page, "hongbao_degraded_total", name="list_cache") == 0
    assert value(page, "hongbao_gate_envelopes") == 12
    assert value(page, "hongbao_credit_applied_total") == 99


def test_without_a_governor_admission_reads_everything_admitted():
    """admission None: enabled 0 and level 511, no per-tier series; no consumer, no credit."""
    m = Metrics()
    m.update(Snapshot(QosStatus([], [], 0, None), _stats(), {}, 0, None))
    page = samples(m.render().decode())
    assert value(page, "hongbao_admission_enabled") == 0
    assert value(page, "hongbao_admission_level") == 511
    assert not {"hongbao_tier_offered_total", "hongbao_event_loop_lag_seconds",
                "hongbao_degradation_in_force", "hongbao_credit_applied_total"} & names(page)


def test_serve_metrics_reads_the_app_at_scrape_time(tmp_path):
    """serve_metrics on port 0 over a real app and LMDB answers a page with the app's state."""
    settings = Settings()

    async def scenario() -> tuple[bytes, bytes]:
        app = build_app(settings, tickets.KeyRing.load_or_create(tmp_path),
                        open_ledger(settings, tmp_path))
        server = await serve_metrics(0, app)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, body = answer.split(b"\r\n\r\n", 1)
            return head, body
        finally:
            server.close()
            await server.wait_closed()
            await app.close()

    head, body = run(scenario())
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    page = samples(body.decode())
    assert value(page, "hongbao_writer_queue_depth") == 0
    assert value(page, "hongbao_bus_lag", topic="credit") == 0
    assert value(page, "hongbao_gate_envelopes") == 0
    assert "hongbao_credit_applied_total" in names(page)  # worker 0 runs the credit consumer


# -- a real gateway process ----------------------------------------------------------------

def _restart_with_metrics(stack) -> int:
    stack.gateway.stop()
    port = free_port()
    stack.start_gateway("--metrics-port", str(port))
    return port


def _money_moves(stack) -> None:
    async def scenario():
        c = Client(stack.target)
        try:
            await top_up(c, stack.meta("alice"), 50_000)
            sent = await send(c, stack.meta("alice"), 1_000, 2)
            got = await grab(c, stack.meta("bob"), sent.envelope_id)
            assert got.outcome == envelope_pb2.GRAB_OUTCOME_GRABBED
            await wait_credited(c, stack.meta("bob"))
        finally:
            await c.close()

    run(scenario())


def test_a_running_gateway_exposes_its_state(stack):
    """A live gateway's page shows the writer, bus, butler and gate, and they move with money."""
    port = _restart_with_metrics(stack)
    before = scrape(port)
    assert {"hongbao_writer_queue_depth", "hongbao_writer_batches_total",
            "hongbao_writer_batch_size_max", "hongbao_credit_backlog",
            "hongbao_admission_level", "hongbao_degraded_total"} <= names(before)
    assert {dict(labels)["topic"] for name, labels in before
            if name == "hongbao_bus_lag"} == {"credit", "payment-unknown"}
    steered = {(dict(labels)["bank"], dict(labels)["channel"]) for name, labels in before
               if name == "hongbao_butler_state"}
    assert steered == {(b, ch) for b in Settings().banks for ch in ("direct", "clearing")}
    for bank, ch in steered:  # one breaker state per channel; a fresh one is closed
        assert value(before, "hongbao_butler_state", bank=bank, channel=ch, state="closed") == 1
        assert sum(value(before, "hongbao_butler_state", bank=bank, channel=ch, state=s)
                   for s in ("open", "half_open")) == 0
        assert value(before, "hongbao_butler_limit", bank=bank, channel=ch) > 0

    _money_moves(stack)
    after = scrape(port)
    for name in ("hongbao_writer_requests_total", "hongbao_writer_batches_total"):
        assert value(after, name) > value(before, name), name
    assert value(after, "hongbao_writer_commit_seconds_total") > 0
    assert value(after, "hongbao_writer_batch_size_max") >= 1
    assert value(after, "hongbao_gate_envelopes") >= 1
    assert value(after, "hongbao_credit_applied_total") >= 1
    assert value(after, "hongbao_bus_lag", topic="credit") == 0
    assert value(after, "hongbao_butler_in_flight", bank="icbc", channel="direct") == 0
    assert value(after, "hongbao_bank_calls_total", bank="icbc", channel="direct") >= 1


# -- the Grafana dashboard -----------------------------------------------------------------

# PromQL words that are not metric names: aggregation clauses, set operators, modifiers.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels and keywords dropped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables outside matchers
    found = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        before = text[m.start() - 1:m.start()]
        if m.group() in _KEYWORDS or rest.startswith("(") or before.isdigit() or before == ".":
            continue  # a keyword, a function call, or part of a number like 2.5e3
        found.add(m.group())
    return found


def test_metric_names_are_read_from_promql():
    """The name extraction keeps metrics and drops functions, labels, variables and numbers."""
    expr = ('histogram_quantile(0.99, sum by (le) (rate(hongbao_rpc_duration_seconds_bucket'
            '{tier="P0", instance=~"$instance"}[$__rate_interval]))) / ignoring (state) '
            'max by (bank) (2.5e3 * hongbao_butler_state{state="open"})')
    assert metric_names(expr) == {"hongbao_rpc_duration_seconds_bucket", "hongbao_butler_state"}


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def _exported_names(stack) -> set[str]:
    """Every sample name a live gateway exports, plus the per-call series exercised."""
    port = _restart_with_metrics(stack)
    _money_moves(stack)
    live = names(scrape(port))
    m = Metrics()
    m.observe_rpc(GRAB, "P0", "OK", 0.001)
    m.shed("P3", "level")
    m.observe_queuing(0.001)
    return live | names(samples(m.render().decode()))


def test_every_dashboard_query_reads_exported_metrics(stack):
    """Each expr of every panel, and the worker variable, names only series the gateway exports."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in _panels(dash)}
    variable = re.fullmatch(r"label_values\((\w+), instance\)", variables["instance"]["definition"])
    assert variable is not None
    exprs["variable instance"] = [variable.group(1)]
    exported = _exported_names(stack)
    used: set[str] = set()
    for title, targets in exprs.items():
        for expr in targets:
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            found = metric_names(expr)
            assert found, (title, expr)
            assert found <= exported, (title, sorted(found - exported))
            used |= found
    for p in _panels(dash):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    asked = {"hongbao_rpc_requests_total", "hongbao_rpc_duration_seconds_bucket",
             "hongbao_shed_total", "hongbao_admission_level",
             "hongbao_queuing_delay_seconds_bucket", "hongbao_event_loop_lag_seconds",
             "hongbao_writer_queue_depth", "hongbao_writer_requests_total",
             "hongbao_writer_batches_total", "hongbao_bus_lag", "hongbao_degradation_in_force",
             "hongbao_butler_state", "hongbao_bank_error_rate"}
    assert asked <= used, sorted(asked - used)
