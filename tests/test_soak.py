"""The soak (issue 9, ``make soak``): millions of grabs through a real gateway worker.

A bank simulator and one ``hongbao serve`` worker run as real processes on loopback; a spawned
client process tops senders up, pays 100-share envelopes from their wallets and BatchGrabs
every share, without pause, while the worker's own credit consumer moves the money into the
wallets (the load is ``bench/bench_storage.py``'s). Every N/20 grabs the test samples the
worker's /proc status and the size of its data.mdb.

``HONGBAO_SOAK_GRABS`` sets N (default 10,000,000; 200000 makes a check of a few minutes),
``HONGBAO_SOAK_TIMEOUT_S`` the bound on the whole load (default: 600 s or N / 2,000 grabs/s,
whichever is longer), ``HONGBAO_SOAK_SETTINGS`` extra gateway settings (TOML lines joined by
``;``). Run with ``-s`` to see the table of samples.

Memory is judged on RssAnon, the worker's private memory: LMDB's map is file-backed, so
VmRSS also holds every page of data.mdb the worker has read (RssFile, clean page cache the
kernel reclaims under pressure), and that part grows with the file by design. Both are
printed.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from gateway.config import Settings

ROOT = Path(__file__).resolve().parent.parent
GRABS = int(os.environ.get("HONGBAO_SOAK_GRABS", "10000000"))
TIMEOUT_S = float(os.environ.get("HONGBAO_SOAK_TIMEOUT_S", max(600.0, GRABS / 2_000)))
RECONCILE_TIMEOUT_S = max(300.0, GRABS / 5_000)
# More gateway settings as TOML lines (default: none), e.g. "gate_max_envelopes = 1000" to
# see what the grab gate's memory contributes.
SETTINGS = os.environ.get("HONGBAO_SOAK_SETTINGS", "").replace(";", "\n")
CHECKPOINTS = 20
RSS_GROWTH_MAX = 1.2  # the largest RssAnon past warm-up over its value at warm-up
# Warm-up: a quarter of the run, or until the grab gate has filled (it keeps up to
# gate_max_envelopes envelopes, about 250 B each once sold out: a bounded cache that
# grows until it is full, by design), whichever is later.
GATE_MAX_ENVELOPES = Settings().gate_max_envelopes
FILE_RATE_RATIO_MAX = 1.5  # data.mdb bytes per grab, last half against first half
MIB = 2 ** 20


def _load_driver():
    """bench/bench_storage.py, the load and its samplers (bench/ is not a package)."""
    path = ROOT / "bench" / "bench_storage.py"
    spec = importlib.util.spec_from_file_location("bench_storage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gate_bound(settings: str) -> int:
    """gate_max_envelopes as HONGBAO_SOAK_SETTINGS sets it, else the default."""
    for line in settings.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "gate_max_envelopes":
            return int(value.strip())
    return GATE_MAX_ENVELOPES


def _nearest(points: list[dict], grabs: float) -> dict:
    return min(points, key=lambda p: abs(p["grabbed"] - grabs))


def _table(points: list[dict]) -> str:
    rows = [f"{'grabs':>12}{'t s':>8}{'VmRSS MiB':>11}{'RssAnon':>9}{'RssFile':>9}"
            f"{'data.mdb MiB':>14}{'B/grab':>8}{'not credited':>14}"]
    for p in points:
        per = p["file_b"] / p["grabbed"] if p["grabbed"] else 0.0
        rows.append(f"{p['grabbed']:>12,}{p['t_s']:>8.0f}{p['VmRSS'] / MIB:>11.1f}"
                    f"{p['RssAnon'] / MIB:>9.1f}{p['RssFile'] / MIB:>9.1f}"
                    f"{p['file_b'] / MIB:>14.1f}{per:>8.0f}{p['backlog']:>14,}")
    return "\n".join(rows)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + RECONCILE_TIMEOUT_S + 300)  # the load, reconcile, start/stop
def test_soak_memory_stays_flat_and_the_data_file_grows_linearly(tmp_path):
    """Past warm-up (a quarter of the run, or the grab gate full, whichever is later, at most
    half) the worker's private memory stays within 1.2x, data.mdb grows by the same
    bytes per grab (within 1.5x) in both halves, and the books balance at the end."""
    driver = _load_driver()
    with driver.LoadStack(tmp_path, settings=SETTINGS) as stack:
        run = driver.drive(stack, envelopes=-(-GRABS // driver.SHARES), seconds=TIMEOUT_S,
                           timeout_s=TIMEOUT_S + 120, checkpoint_grabs=GRABS // CHECKPOINTS)
        drain_s = stack.drain(timeout_s=RECONCILE_TIMEOUT_S)
        drained = driver.sample(stack, time.monotonic() - drain_s - run["seconds"],
                                 run["grabbed"])
        check = stack.reconcile(timeout_s=RECONCILE_TIMEOUT_S)
    points = run["checkpoints"]
    report = (f"{run['grabbed']:,} grabs in {run['seconds']:.0f} s "
              f"({run['grabbed'] / run['seconds']:,.0f}/s); refused {run['refused'] or 'none'}; "
              f"{check}\n{_table(points)}\ncredits drained {drain_s:.0f} s after the load:\n"
              f"{_table([drained])}")
    print("\n" + report)
    assert run["grabbed"] >= 0.95 * GRABS, report

    gate = _gate_bound(SETTINGS) * driver.SHARES
    warm = _nearest(points, min(max(GRABS / 4, gate), GRABS / 2))
    half = _nearest(points, GRABS / 2)
    last = points[-1]
    later = max(p["RssAnon"] for p in points if p["grabbed"] >= warm["grabbed"])
    assert later <= RSS_GROWTH_MAX * warm["RssAnon"], report

    first_rate = (half["file_b"] - points[0]["file_b"]) / half["grabbed"]
    last_rate = (last["file_b"] - half["file_b"]) / (last["grabbed"] - half["grabbed"])
    ratio = last_rate / first_rate
    assert 1 / FILE_RATE_RATIO_MAX <= ratio <= FILE_RATE_RATIO_MAX, (ratio, report)
