"""The fault campaign, short: a seeded run of ``hongbao chaos`` inside the suite.

``make chaos`` runs the long one (60 cycles and 20,000 fuzz examples per fuzz test) and
writes its table to docs/RELIABILITY.md; this one runs 5 cycles of the same faults against
the same real processes and checks the same invariants, then scans every log the run
wrote for a ticket, a ticket key or the issuer key.
"""

from __future__ import annotations

import json
import re

from gateway.ops.chaos import render, run_campaign

TICKET = re.compile(r"v1\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}")


def test_a_short_campaign_keeps_every_invariant_and_logs_no_secret(tmp_path):
    report = run_campaign(tmp_path, seed=20261202, cycles=5, gap_s=(0.5, 2.0), clients=2)
    assert report["violations"] == [], report["violations"][:20]
    assert report["reconcile"] == "BALANCED"
    assert sum(report["faults"].values()) == 5
    ops = report["operations"]
    assert ops.get("grab ok", 0) > 0 and ops.get("top_up ok", 0) > 0 and ops.get("send ok", 0)
    assert "| PASS (BALANCED) | 20261202 |" in render(report)
    keys = json.loads((tmp_path / "gw" / "ticket_keys.json").read_text())
    secrets = [keys["issuer_key"], *(k["secret"] for k in keys["keys"])]
    for log in tmp_path.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not TICKET.search(text), log.name
        assert not any(s in text for s in secrets), log.name
    # The run really was hit: at least one process was SIGKILLed and came back.
    assert any(k.startswith("SIGKILL") for k in report["faults"]), report["faults"]
