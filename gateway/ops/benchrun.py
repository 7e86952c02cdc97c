"""``hongbao bench``: runs the benchmarks in bench/ and prints their figures.

The benchmarks live beside the source (bench/*.py, each with ``main(argv)``);
this finds them from a checkout, so it works for an editable install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
NAMES = ("hotpath", "tickets", "ledger", "butler", "balance_first")


def _load(name: str):
    path = BENCH_DIR / f"bench_{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `hongbao bench` from a source checkout")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None  # a .py path always has both
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(names: list[str]) -> int:
    for name in names or NAMES:
        if name not in NAMES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
            return 2
        print(f"\n== bench/bench_{name}.py")
        _load(name).main([])
    return 0
