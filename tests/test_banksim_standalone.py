"""The bank simulator stands alone: it imports nothing from the gateway; its card-id rule."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from banksim import cards

ROOT = Path(__file__).resolve().parent.parent
BANKSIM = ROOT / "banksim"
IMPORT_TIMEOUT_S = 60.0

# Imports every module of banksim (found by walking the package, so a new module is
# covered without editing this test) and prints what it imported and what got loaded.
# __main__ is skipped: importing it runs the simulator.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import banksim
names = sorted(m.name for m in pkgutil.walk_packages(banksim.__path__, "banksim.")
               if m.name != "banksim.__main__")
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def _is_gateway(module: str) -> bool:
    return module.partition(".")[0] == "gateway"


def test_importing_every_banksim_module_loads_no_gateway_module() -> None:
    """Importing each banksim module in a fresh interpreter leaves no gateway module loaded."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True,
                          text=True, timeout=IMPORT_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    # Guards against a vacuous pass: the walk really found the package's modules.
    assert {"banksim.cards", "banksim.cli", "banksim._server", "banksim._errors",
            "banksim.v1.bank_pb2_grpc"} <= set(seen["imported"])
    assert [m for m in seen["loaded"] if _is_gateway(m)] == []


def _imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_banksim_source_file_imports_gateway() -> None:
    """No import statement in any banksim source file, even one not run at import, names gateway."""
    files = sorted(BANKSIM.rglob("*.py"))
    assert BANKSIM / "cards.py" in files
    offenders = {str(f.relative_to(ROOT)): [m for m in _imported_modules(f) if _is_gateway(m)]
                 for f in files}
    assert {f: ms for f, ms in offenders.items() if ms} == {}


@pytest.mark.parametrize(("card_id", "parsed"), [
    ("icbc-6222020000000001", ("icbc", "6222020000000001")),
    ("a-0", ("a", "0")),
    ("bank_2-42", ("bank_2", "42")),
    ("b" * 16 + "-" + "9" * 32, ("b" * 16, "9" * 32)),
])
def test_parse_card_id_splits_a_valid_id_into_bank_and_number(
    card_id: str, parsed: tuple[str, str]
) -> None:
    """A well-formed id, up to 16 bank characters and 32 digits, parses into bank id and number."""
    assert cards.parse_card_id(card_id) == parsed
    assert cards.bank_of(card_id) == parsed[0]


@pytest.mark.parametrize("card_id", [
    "", "icbc", "icbc1", "icbc-", "-1", "ICBC-1", "1cbc-1", "_cbc-1", "icbc-12a", "icbc--1",
    "icbc-1-2", " icbc-1", "icbc-1\n", "ic bc-1", "icbc-١٢",  # the last: Arabic-Indic digits
])
def test_parse_card_id_rejects_a_malformed_id(card_id: str) -> None:
    """A malformed id parses to None, and bank_of raises ValueError for it."""
    assert cards.parse_card_id(card_id) is None
    with pytest.raises(ValueError, match="malformed card id"):
        cards.bank_of(card_id)


@pytest.mark.parametrize("card_id", ["b" * 17 + "-1", "icbc-" + "1" * 33])
def test_parse_card_id_rejects_a_too_long_bank_id_or_number(card_id: str) -> None:
    """A bank id past 16 characters or a card number past 32 digits is malformed."""
    assert cards.parse_card_id(card_id) is None
