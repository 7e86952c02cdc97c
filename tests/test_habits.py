"""House habits the code keeps, checked over the source tree rather than by review."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The hand-written code; tests are exempt (a scenario may read best as one function).
SOURCE_DIRS = ("gateway", "hotpath", "banksim", "bench")
# Build outputs: compiled from protos/, never edited, so not held to our habits.
GENERATED_DIRS = (ROOT / "banksim" / "v1",)
MAX_FUNCTION_LINES = 70


def _source_files() -> Iterator[Path]:
    for name in SOURCE_DIRS:
        for path in sorted((ROOT / name).rglob("*.py")):
            if not any(path.is_relative_to(gen) for gen in GENERATED_DIRS):
                yield path


def _long_functions(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # lineno is the `def` line: decorators sit above it and do not count.
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)"


def test_source_tree_is_found():
    """The walk sees the packages it is meant to check (an empty walk would pass anything)."""
    found = {path.relative_to(ROOT).parts[0] for path in _source_files()}
    assert found == set(SOURCE_DIRS)


def test_no_function_is_longer_than_70_lines():
    """No function or method outside tests spans more than 70 lines, decorators excluded."""
    too_long = [line for path in _source_files() for line in _long_functions(path)]
    assert not too_long, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them:\n  " + "\n  ".join(too_long))
