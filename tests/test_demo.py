"""`hongbao demo` runs end to end, balances its books and leaves no process behind."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(330)  # above the run's own 300 s, so that one reports a hang
def test_demo_runs_and_balances():
    """The demo exits 0, reports BALANCED and agrees with the bank."""
    out = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "demo"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "BALANCED: every fen is accounted for" in out.stdout
    assert "grab latency" in out.stdout and "Best luck" in out.stdout
    assert "stopped every process the demo started" in out.stdout
