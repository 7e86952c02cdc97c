"""The demo's report: report.html stands alone, and each plot is drawn only from data it has."""

from __future__ import annotations

import base64
import copy
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from gateway.ops.report import write_report

NAMES = ("timeline", "peak", "card", "flows", "splits")


def _series(n: int, f) -> list[float]:
    return [round(f(i), 2) for i in range(n)]


def _card_payments(rng: random.Random) -> list[dict]:
    """A dozen card payments: every kind, every first answer, every final state."""
    answers = [("succeeded", "succeeded"), ("declined", "failed"), ("unknown", "succeeded"),
               ("unknown", "refunded"), ("failed", "locked"), ("second card", "succeeded")]
    payments = []
    for i in range(12):
        first, final = answers[i % len(answers)]
        first_s = 40.0 + i * 0.4
        payments.append({"id": f"pay_{i:04d}", "kind": ("envelope", "withdraw", "auto")[i % 3],
                         "first": first, "first_s": first_s, "final": final,
                         "final_s": first_s + rng.uniform(0.1, 4.0)})
    return payments


def _envelopes(rng: random.Random) -> list[dict]:
    envelopes = []
    for i in range(5):
        total, n = 1000 * (i + 1), 5 + 3 * i
        cuts = sorted(rng.sample(range(1, total), n - 1))
        shares = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
        envelopes.append({"id": f"e_{i:08x}", "total_fen": total, "shares_fen": shares,
                          "best_luck_user": f"user{rng.randrange(300):04d}"})
    return envelopes


def _peak() -> dict:
    t = _series(40, lambda i: 20 + i * 0.25)
    tiers = {}
    for k, tier in enumerate(("P0", "P1", "P2", "P3")):
        offered = _series(40, lambda i, k=k: 400 + 300 * math.sin(i / 6) + 50 * k)
        admitted = [o * (1 - 0.2 * k) for o in offered]
        tiers[tier] = {"offered": offered, "admitted": admitted,
                       "shed": [o - a for o, a in zip(offered, admitted, strict=True)]}
    return {"t_s": t, "level": _series(40, lambda i: 511 - (i * 37) % 400),
            "p0_goodput_per_s": tiers["P0"]["admitted"], "tiers": tiers,
            "set_killed_s": 25.0, "set_back_s": 28.5}


def _record() -> dict:
    rng = random.Random(8)
    t = _series(48, lambda i: i * 0.5)
    return {
        "title": "Spring Festival eve on loopback", "mode": "cluster",
        "phases": [
            {"name": "top-ups", "start_s": 0.0, "end_s": 3.2,
             "result": "300 top-ups, 15,000.00 yuan <script>alert('x')</script>"},
            {"name": "envelopes & grabs", "start_s": 3.2, "end_s": 19.0, "result": "60 sent"},
            {"name": "midnight peak", "start_s": 19.0, "end_s": 30.0, "result": "P0 kept"},
            {"name": "card payments", "start_s": 39.0, "end_s": 48.0, "result": "12 resolved"},
        ],
        "timeline": {"t_s": t, "grabs_per_s": _series(48, lambda i: 800 + 500 * math.sin(i / 5)),
                     "p50_ms": _series(48, lambda i: 3 + (i % 7) * 0.3),
                     "p99_ms": _series(48, lambda i: 12 + (i % 11) * 1.5)},
        "peak": _peak(),
        "card": {"channel_killed_s": 41.5, "payments": _card_payments(rng)},
        "flows": {"top_ups_fen": 15_000_000, "card_sends_fen": 240_000,
                  "balance_sends_fen": 1_200_000, "grabs_credited_fen": 1_150_000,
                  "expiry_refunds_fen": 50_000, "withdrawals_fen": 300_000, "unlocks_fen": 4_000,
                  "wallets_fen": 14_700_000, "escrow_fen": 230_000, "pending_fen": 10_000},
        "reconcile": {"balanced": True, "text": "BALANCED: every fen is accounted for\n<ok>"},
        "envelopes": _envelopes(rng),
    }


def _embedded(page: str) -> dict[str, bytes]:
    """data-file name -> the bytes of its embedded data URI."""
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)" '
                       r'data-file="([^"]+)">', page)
    return {file: base64.b64decode(data, validate=True) for data, _alt, file in found}


def _assert_real_image(path: Path) -> None:
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 10, f"{path.name} is (nearly) a flat colour"


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, str]:
    """The whole record's report, drawn once: (its folder, the page)."""
    out = tmp_path_factory.mktemp("report")
    record = _record()
    record["title"] = "eve <b>bold</b>"
    page_path = write_report(record, out)
    assert page_path == out / "report.html"
    return out, page_path.read_text(encoding="utf-8")


def test_every_plot_is_written_and_embedded(full):
    """Each PNG exists, is a drawn image, and the page embeds exactly its bytes and links it."""
    tmp_path, page = full
    embedded = _embedded(page)
    assert sorted(embedded) == sorted(f"{n}.png" for n in NAMES)
    for name in NAMES:
        png = tmp_path / f"{name}.png"
        _assert_real_image(png)
        assert embedded[png.name] == png.read_bytes()
        assert f'alt="{name}"' in page and f'<a href="{name}.png">' in page
    assert page.index('data-file="timeline.png"') < page.index('<a href="timeline.png">')


def test_summary_and_reconcile_are_on_the_page(tmp_path):
    """The phases table, the ledger figures in yuan and the reconcile text are there."""
    page = write_report(_record(), tmp_path, plots=False).read_text(encoding="utf-8")
    assert "<h1>Spring Festival eve on loopback</h1>" in page
    assert "<td>midnight peak</td>" in page and "11.00 s" in page
    assert "150,000.00" in page            # top-ups, fen / 100
    assert "BALANCED: every fen is accounted for" in page and "NOT BALANCED" not in page


def test_text_from_the_record_is_escaped(full):
    """A <script> in a phase result, a tag in the title or reconcile text never reaches raw."""
    _out, page = full
    assert "<script>" not in page and "<b>" not in page and "<ok>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "envelopes &amp; grabs" in page and "<h1>eve &lt;b&gt;bold&lt;/b&gt;</h1>" in page


def test_plots_false_writes_no_png(tmp_path):
    """Without plots: the page only, no images in it or beside it."""
    page = write_report(_record(), tmp_path, plots=False).read_text(encoding="utf-8")
    assert list(tmp_path.glob("*.png")) == []
    assert "<img" not in page and "data:image" not in page


@pytest.mark.parametrize("drop, kept", [
    (("timeline", "peak"), ("card", "flows", "splits")),
    (("card", "envelopes"), ("timeline", "peak", "flows")),
    (("flows", "reconcile", "phases", "mode"), ("timeline", "peak", "card", "splits")),
])
def test_a_partial_record_draws_only_what_it_has(tmp_path, drop, kept):
    """A missing part leaves its plot out; the rest are still drawn and embedded."""
    record = _record()
    for key in drop:
        del record[key]
    page = write_report(record, tmp_path).read_text(encoding="utf-8")
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(kept)
    assert sorted(_embedded(page)) == sorted(f"{n}.png" for n in kept)


@pytest.mark.parametrize("record", [
    {"title": "empty evening"},
    {"title": "empty evening", "timeline": {"t_s": [0.0, 1.0]}, "peak": {"t_s": [0.0]},
     "card": {"channel_killed_s": 3.0, "payments": []}, "flows": {}, "envelopes": [{"id": "e"}],
     "phases": []},
])
def test_a_record_without_data_writes_a_page_and_no_plot(tmp_path, record):
    """Only the title, or parts with times but no series: a valid page, no plots."""
    page = write_report(record, tmp_path / "new").read_text(encoding="utf-8")
    assert "<h1>empty evening</h1>" in page and "<img" not in page
    assert list((tmp_path / "new").glob("*.png")) == []


def test_gaps_and_odd_shapes_still_draw(tmp_path):
    """Uneven series lengths, None points, no SET back, unresolved payments, no verdict."""
    record = copy.deepcopy(_record())
    record["timeline"]["p99_ms"] = record["timeline"]["p99_ms"][:10]
    record["timeline"]["grabs_per_s"][5] = None
    record["peak"]["set_back_s"] = None
    del record["peak"]["tiers"]["P3"]
    record["card"]["payments"][0]["final_s"] = None
    record["card"]["channel_killed_s"] = None
    record["envelopes"] = [{"id": "e_1", "shares_fen": [100, 100]},
                           {"id": "e_2", "total_fen": 0, "shares_fen": [0, 0]}]
    record["reconcile"] = {"balanced": False, "text": "NOT BALANCED: 1 fen"}
    page = write_report(record, tmp_path).read_text(encoding="utf-8")
    assert sorted(_embedded(page)) == sorted(f"{n}.png" for n in NAMES)
    assert "NOT BALANCED" in page
