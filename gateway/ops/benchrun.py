"""``hongbao bench``: runs the benchmarks in bench/ and prints their figures.

The benchmarks live beside the source (bench/*.py, each with ``main(argv)``);
this finds them from a checkout, so it works for an editable install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"  # gateway/ops/ -> the checkout
NAMES = ("hotpath", "tickets", "ledger", "butler", "balance_first", "batchgrab", "unary", "storage",
         "ghz", "cluster")


def _load(name: str):
    path = BENCH_DIR / f"bench_{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `hongbao bench` from a source checkout")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None  # a .py path always has both
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would be (dataclasses look their module up).
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(names: list[str]) -> int:
    for name in names:
        if name not in NAMES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
            return 2
    results: dict[str, dict | BaseException] = {}
    for name in names or NAMES:
        print(f"\n== bench/bench_{name}.py")
        try:
            results[name] = _load(name).main([]) or {}
        except Exception as exc:  # one benchmark failing must not hide the others' figures
            print(f"bench_{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results[name] = exc
    _summary(results)
    return 1 if any(isinstance(r, BaseException) for r in results.values()) else 0


def _figures(result: dict, prefix: str = "") -> list[tuple[str, str]]:
    """The numbers (and short strings) a benchmark returned, nested keys joined by '.'."""
    rows: list[tuple[str, str]] = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            rows.append((name, str(value)))
        elif isinstance(value, int | float):
            text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.3f}".rstrip("0")
            rows.append((name, text.rstrip(".")))
        elif isinstance(value, str) and len(value) <= 40:
            rows.append((name, value))
        elif isinstance(value, dict) and len(rows) < 200:
            rows.extend(_figures(value, name + "."))
    return rows


def _summary(results: dict[str, dict | BaseException]) -> None:
    """One table of every benchmark's figures, after all have run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hongbao bench: figures (bench/RESULTS.md says how each is measured)")
    for col in ("benchmark", "figure", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name, result in results.items():
        if isinstance(result, BaseException):
            table.add_row(name, "FAILED", f"{type(result).__name__}: {result}"[:60])
            continue
        for figure, value in _figures(result)[:40]:
            table.add_row(name, figure, value)
    Console().print(table)
