"""The demo's report: one self-contained HTML page and the plots beside it.

:func:`write_report` takes the run's record (a JSON-serialisable dict; only
``title`` is required, times are seconds from the demo's start, money is in
fen) and writes ``report.html`` into a folder: the summary of the phases, the
ledger's flows as a table, every plot embedded as a base64 PNG data URI (so
the page stands alone) and the reconcile output. With plots on, each PNG is
also written beside the page:

``timeline.png``
    grabs per second and grab latency p50/p99 over the evening, phases shaded;
``peak.png``
    the midnight peak: per tier offered, admitted and shed per second, the
    admission level and P0 goodput, a killed SET's outage marked;
``card.png``
    every card payment from its first answer to its final state, the moment
    the bank's direct channel was killed marked;
``flows.png``
    where every yuan went, with the reconcile verdict in the title;
``splits.png``
    a few envelopes' shares in grab order, the best luck highlighted.

A plot is drawn only when the record holds its data. The figures are drawn on
:class:`matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no
backend switch, no change to matplotlib's global settings.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, StrMethodFormatter
from matplotlib.typing import LineStyleType

from gateway.qos.controller import MAX_LEVEL

Record = Mapping[str, Any]

TIERS = ("P0", "P1", "P2", "P3")
MAX_SPLITS = 6           # envelopes drawn in splits.png; the rest are left out
MAX_LABELLED_ROWS = 40   # card payments named on the y axis; more rows go unnamed
DPI = 110
PHASE_SHADES = ("#e8eef7", "#f6f1e4")
FIRST_STYLE = {  # a card payment's first answer: (colour, marker)
    "succeeded": ("#2e7d32", "o"), "declined": ("#ef6c00", "X"), "unknown": ("#757575", "D"),
    "failed": ("#c62828", "s"), "second card": ("#1565c0", "^"),
}
FINAL_COLOUR = {"succeeded": "#2e7d32", "refunded": "#6a1b9a", "locked": "#c62828",
                "failed": "#8d6e63"}
OTHER_COLOUR = "#9e9e9e"
# A tier's series in peak.png: (record key, colour, line style).
TIER_LINES: tuple[tuple[str, str, LineStyleType], ...] = (
    ("offered", "#616161", "--"), ("admitted", "#2e7d32", "-"), ("shed", "#c62828", "-"))
# Where money moves: in from the bank, within the books, out to the bank, or held now.
DIRECTION = {"in": ("#2e7d32", "in from the bank"), "within": ("#1565c0", "within the books"),
             "out": ("#ef6c00", "out to the bank"), "held": ("#546e7a", "held now")}
# Ledger flows: (record key, from -> to, what moved, direction).
FLOWS = (
    ("top_ups_fen", "bank cards → wallets", "top-ups", "in"),
    ("card_sends_fen", "bank cards → envelopes", "card-paid sends", "in"),
    ("balance_sends_fen", "wallets → envelopes", "balance-paid sends", "within"),
    ("grabs_credited_fen", "envelopes → wallets", "grabs credited", "within"),
    ("expiry_refunds_fen", "envelopes → wallets", "expiry refunds", "within"),
    ("unlocks_fen", "wallets → wallets", "photo unlocks", "within"),
    ("withdrawals_fen", "wallets → bank", "withdrawals", "out"),
)
HELD = (
    ("wallets_fen", "wallets", "balances", "held"),
    ("escrow_fen", "escrow", "live envelopes", "held"),
    ("pending_fen", "pending", "credits not yet applied", "held"),
)


# --- the record ------------------------------------------------------------------------------

def _part(record: Record, key: str) -> Mapping[str, Any]:
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []


def _items(value: Any) -> list[Mapping[str, Any]]:
    """The mappings in a list (a phase, a payment, an envelope); anything else is skipped."""
    return [v for v in _list(value) if isinstance(v, Mapping)]


def _has_any(part: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """Whether any of the keys holds a non-empty series."""
    return any(_list(part.get(key)) for key in keys)


def _nums(value: Any) -> list[float]:
    """A series as floats; a missing point (None) becomes NaN, a gap in the line."""
    return [math.nan if v is None else float(v) for v in _list(value)]


def _yuan(fen: float) -> str:
    return f"{fen / 100:,.2f}"


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def _verdict(record: Record) -> str:
    reconcile = _part(record, "reconcile")
    if "balanced" not in reconcile:
        return "not reconciled"
    return "BALANCED" if reconcile["balanced"] else "NOT BALANCED"


# --- drawing helpers -------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _line(ax: Axes, t: list[float], ys: list[float], **style: Any) -> None:
    """Plots ys over t, both cut to the shorter of the two."""
    n = min(len(t), len(ys))
    if n:
        ax.plot(t[:n], ys[:n], **style)


def _event(ax: Axes, at: float | None, label: str, colour: str, *, text: bool = True) -> None:
    """A vertical line at a moment, named at the top of the axes."""
    if at is None:
        return
    ax.axvline(at, color=colour, linestyle="--", linewidth=1.2, zorder=3)
    if text:
        ax.text(at, 0.98, f" {label}", transform=ax.get_xaxis_transform(), color=colour,
                fontsize=8, ha="left", va="top", rotation=90, clip_on=True)


def _shade_phases(ax: Axes, phases: list[Mapping[str, Any]], *, labels: bool) -> None:
    """Shades each phase's span, alternating tints, and names it at its start."""
    for i, phase in enumerate(phases):
        start, end = _seconds(phase.get("start_s")), _seconds(phase.get("end_s"))
        if start is None or end is None:
            continue
        ax.axvspan(start, end, color=PHASE_SHADES[i % 2], zorder=0, linewidth=0)
        if labels:
            ax.text(start, 0.98, f" {phase.get('name', '')}", transform=ax.get_xaxis_transform(),
                    fontsize=7, color="#37474f", ha="left", va="top", rotation=90, clip_on=True)


def _finish(ax: Axes, title: str, ylabel: str, *, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper right")


# --- the plots -------------------------------------------------------------------------------

def _timeline(record: Record) -> Figure | None:
    part = _part(record, "timeline")
    t = _nums(part.get("t_s"))
    if not t or not _has_any(part, ("grabs_per_s", "p50_ms", "p99_ms")):
        return None
    fig = _figure(11, 6)
    grabs, latency = fig.subplots(2, 1, sharex=True)
    phases = _items(record.get("phases"))
    _shade_phases(grabs, phases, labels=True)
    _shade_phases(latency, phases, labels=False)
    _line(grabs, t, _nums(part.get("grabs_per_s")), color="#c62828", label="grabs/s")
    _line(latency, t, _nums(part.get("p50_ms")), color="#1565c0", label="p50")
    _line(latency, t, _nums(part.get("p99_ms")), color="#ef6c00", label="p99")
    _finish(grabs, "Grabs per second over the evening", "grabs/s")
    _finish(latency, "Grab latency", "ms")
    latency.set_xlabel("seconds since the demo started", fontsize=9)
    return fig


def _mark_outage(axes: list[Axes], killed: float | None, back: float | None,
                 last: float) -> None:
    """Shades a killed SET's outage on every panel (to the last point if it never came back),
    naming its ends on the top row."""
    for i, ax in enumerate(axes):
        if killed is not None:
            ax.axvspan(killed, back if back is not None else last, color="#ffcdd2", alpha=0.4,
                       zorder=0, linewidth=0)
        _event(ax, killed, "SET killed", "#c62828", text=i < 2)
        _event(ax, back, "SET back", "#2e7d32", text=i < 2)


def _peak(record: Record) -> Figure | None:
    part = _part(record, "peak")
    t = _nums(part.get("t_s"))
    if not t or not (_part(part, "tiers") or _has_any(part, ("level", "p0_goodput_per_s"))):
        return None
    fig = _figure(11, 9)
    axes = fig.subplots(3, 2, sharex=True)
    tiers = _part(part, "tiers")
    for ax, tier in zip(axes.flat[:4], TIERS, strict=True):
        series = _part(tiers, tier)
        for key, colour, style in TIER_LINES:
            _line(ax, t, _nums(series.get(key)), color=colour, linestyle=style)
        _finish(ax, f"{tier}: calls per second", "calls/s", legend=False)
    level, goodput = axes[2]
    _line(level, t, _nums(part.get("level")), color="#6a1b9a", drawstyle="steps-post")
    level.set_ylim(-10, MAX_LEVEL + 10)
    _finish(level, f"Admission level (0..{MAX_LEVEL})", "level", legend=False)
    _line(goodput, t, _nums(part.get("p0_goodput_per_s")), color="#1565c0")
    _finish(goodput, "P0 goodput", "completed/s", legend=False)
    _mark_outage(list(axes.flat), _seconds(part.get("set_killed_s")),
                 _seconds(part.get("set_back_s")), t[-1])
    for ax in axes[2]:
        ax.set_xlabel("seconds since the demo started", fontsize=9)
    mode = record.get("mode")
    fig.suptitle("Midnight peak" + (f" ({mode} mode)" if mode else ""), fontsize=12)
    fig.legend(handles=[Line2D([], [], color=c, linestyle=s, label=key)
                        for key, c, s in TIER_LINES],
               loc="outside upper right", ncols=3, fontsize=8)
    return fig


def _card_legend(ax: Axes) -> None:
    handles = [Line2D([], [], color=c, marker=m, linestyle="", label=f"first: {name}")
               for name, (c, m) in FIRST_STYLE.items()]
    handles += [Line2D([], [], color=c, linewidth=3, label=f"final: {name}")
                for name, c in FINAL_COLOUR.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _card(record: Record) -> Figure | None:
    part = _part(record, "card")
    payments = [p for p in _items(part.get("payments")) if p.get("first_s") is not None]
    if not payments:
        return None
    payments.sort(key=lambda p: float(p["first_s"]))
    fig = _figure(11, min(2.5 + 0.22 * len(payments), 24))
    ax = fig.subplots()
    for row, pay in enumerate(payments):
        first_s = float(pay["first_s"])
        final_s = _seconds(pay.get("final_s"))
        final_colour = FINAL_COLOUR.get(str(pay.get("final")), OTHER_COLOUR)
        if final_s is not None:
            ax.plot([first_s, final_s], [row, row], color=final_colour, linewidth=3,
                    solid_capstyle="butt", zorder=2)
            ax.plot([final_s], [row], color=final_colour, marker="|", markersize=10, zorder=3)
        colour, marker = FIRST_STYLE.get(str(pay.get("first")), (OTHER_COLOUR, "o"))
        ax.plot([first_s], [row], color=colour, marker=marker, linestyle="", zorder=4)
    if len(payments) <= MAX_LABELLED_ROWS:
        ax.set_yticks(range(len(payments)),
                      [f"{p.get('kind', '')} {str(p.get('id', ''))[:16]}" for p in payments])
    else:
        ax.set_yticks([])
    ax.set_ylim(len(payments) - 0.5, -0.5)
    _event(ax, _seconds(part.get("channel_killed_s")), "direct channel killed", "#c62828")
    _finish(ax, "Card payments: first answer → final state", "payment", legend=False)
    ax.set_xlabel("seconds since the demo started", fontsize=9)
    _card_legend(ax)
    return fig


def _amounts(part: Mapping[str, Any], rows: tuple) -> list[tuple[str, float, str]]:
    """(label, fen, direction) for each of rows the record has a figure for."""
    return [(f"{where}\n{what}", float(part[key]), direction)
            for key, where, what, direction in rows if part.get(key) is not None]


def _bars(ax: Axes, rows: list[tuple[str, float, str]], title: str) -> None:
    """Horizontal bars in yuan, top to bottom, each with its amount written beside it."""
    ax.set_title(title, fontsize=10, loc="left")
    if not rows:
        ax.text(0.5, 0.5, "no figures", transform=ax.transAxes, ha="center", color="#757575")
        return
    labels, fen, directions = zip(*rows, strict=True)
    bars = ax.barh(range(len(rows)), [f / 100 for f in fen],
                   color=[DIRECTION[d][0] for d in directions])
    ax.bar_label(bars, [_yuan(f) for f in fen], padding=3, fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_xlabel("yuan", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(labelsize=8)


def _flows(record: Record) -> Figure | None:
    part = _part(record, "flows")
    moved, held = _amounts(part, FLOWS), _amounts(part, HELD)
    if not moved and not held:
        return None
    fig = _figure(11, 5.5)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2), sharex=True)
    _bars(left, moved, "Money moved")
    _bars(right, held, "Held now")
    largest = max(fen for _label, fen, _d in moved + held) / 100
    left.set_xlim(0, max(largest, 0.01) * 1.4)
    verdict = _verdict(record)
    fig.suptitle(f"Where every yuan went (reconcile: {verdict})", fontsize=12,
                 color="#2e7d32" if verdict == "BALANCED" else "#c62828")
    fig.legend(handles=[Patch(color=c, label=name) for c, name in DIRECTION.values()],
               loc="outside lower center", ncols=4, fontsize=8)
    return fig


def _envelopes(record: Record) -> list[Mapping[str, Any]]:
    found = [e for e in _items(record.get("envelopes"))
             if _list(e.get("shares_fen")) and None not in _list(e.get("shares_fen"))]
    return found[:MAX_SPLITS]


def _split(ax: Axes, envelope: Mapping[str, Any]) -> None:
    shares = _nums(envelope.get("shares_fen"))
    best = max(range(len(shares)), key=lambda i: shares[i])
    colours = ["#f9a825" if i == best else "#90a4ae" for i in range(len(shares))]
    bars = ax.bar(range(1, len(shares) + 1), [s / 100 for s in shares], color=colours)
    who = envelope.get("best_luck_user")
    ax.bar_label(bars, [f"best luck {_yuan(shares[best])}" + (f"\n{who}" if who else "")
                        if i == best else "" for i in range(len(shares))], fontsize=7)
    total = envelope.get("total_fen")
    title = f"{envelope.get('id', '')}: {len(shares)} shares"
    if total is not None:
        title += f", total {_yuan(float(total))} yuan"
        if not math.isclose(sum(shares), float(total)):
            title += f" (shares add up to {_yuan(sum(shares))})"
    ax.set_ylim(0, max(max(shares), 1) / 100 * 1.35)
    ax.set_xticks(range(1, len(shares) + 1))
    _finish(ax, title, "yuan", legend=False)


def _splits(record: Record) -> Figure | None:
    envelopes = _envelopes(record)
    if not envelopes:
        return None
    fig = _figure(11, 0.8 + 2.2 * len(envelopes))
    axes = fig.subplots(len(envelopes), 1, squeeze=False)[:, 0]
    for ax, envelope in zip(axes, envelopes, strict=True):
        _split(ax, envelope)
    axes[-1].set_xlabel("grab order", fontsize=9)
    fig.suptitle("How envelopes split: shares in grab order", fontsize=12)
    return fig


# (file name without .png, heading, drawing: a figure, or None when the record lacks the data)
PLOTS: tuple[tuple[str, str, Callable[[Record], Figure | None]], ...] = (
    ("timeline", "Grabs and latency over the evening", _timeline),
    ("peak", "The midnight peak", _peak),
    ("card", "Card payments while the bank misbehaved", _card),
    ("flows", "Where every yuan went", _flows),
    ("splits", "How envelopes split", _splits),
)


# --- the page --------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
       color: #212121; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } .meta { color: #616161; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #cfd8dc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #eceff1; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eceff1; } figure { margin: 0 0 2em; }
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; }
.ok { color: #2e7d32; } .bad { color: #c62828; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: list[list[tuple[str, str]]]) -> str:
    """An HTML table; each cell is (css class, already-escaped text)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{text}</td>' if c else f"<td>{text}</td>"
                                   for c, text in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _phase_rows(record: Record) -> list[list[tuple[str, str]]]:
    rows = []
    for phase in _items(record.get("phases")):
        start, end = _seconds(phase.get("start_s")), _seconds(phase.get("end_s"))
        took = f"{end - start:.2f} s" if start is not None and end is not None else ""
        rows.append([("", _e(phase.get("name", ""))), ("num", took),
                     ("", _e(phase.get("result", "")))])
    return rows


def _flow_rows(record: Record) -> list[list[tuple[str, str]]]:
    part = _part(record, "flows")
    return [[("", _e(f"{route}: {what}")), ("num", _yuan(float(part[key])))]
            for key, route, what, _direction in FLOWS + HELD if part.get(key) is not None]


def _figure_html(name: str, heading: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<h2>{_e(heading)}</h2><figure>"
            f'<img src="data:image/png;base64,{data}" alt="{name}" data-file="{name}.png">'
            f'<figcaption><a href="{name}.png">{name}.png</a></figcaption></figure>')


def _page(record: Record, images: list[tuple[str, str, bytes]]) -> str:
    title = _e(record.get("title", "hongbao demo"))
    parts = [f"<h1>{title}</h1>"]
    if record.get("mode"):
        parts.append(f'<p class="meta">mode: {_e(record["mode"])}</p>')
    if phases := _phase_rows(record):
        parts += ["<h2>Summary</h2>", _table(("phase", "duration", "result"), phases)]
    if flows := _flow_rows(record):
        parts += ["<h2>Ledger figures</h2>", _table(("flow", "yuan"), flows)]
    parts += [_figure_html(name, heading, png) for name, heading, png in images]
    reconcile = _part(record, "reconcile")
    if reconcile:
        verdict = _verdict(record)
        tone = "ok" if verdict == "BALANCED" else "bad"
        parts.append(f'<h2>Reconcile: <span class="{tone}">{verdict}</span></h2>')
        parts.append(f"<pre>{_e(reconcile.get('text', ''))}</pre>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(record: dict, out: Path, *, plots: bool = True) -> Path:
    """Writes out/report.html (self-contained: every image embedded as a base64 data URI) and,
    with plots, the PNGs beside it; returns the html path.

    A plot is drawn only when the record holds its data; with ``plots=False`` no PNG is
    written and the page has the tables and the reconcile text only.
    """
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str, bytes]] = []
    for name, heading, draw in PLOTS if plots else ():
        fig = draw(record)
        if fig is None:
            continue
        png = _png(fig)
        (out / f"{name}.png").write_bytes(png)
        images.append((name, heading, png))
    path = out / "report.html"
    path.write_text(_page(record, images), encoding="utf-8")
    return path
