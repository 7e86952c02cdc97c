"""The architecture's import rules, read from the source with ``ast``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from gateway.domain import model
from hongbao.v1 import envelope_pb2, notification_pb2, wallet_pb2

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
SUBPACKAGES = ("domain", "ledger", "payments", "qos", "usecases", "transport", "security", "ops",
               "sim", "cluster")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (``from a.b import c`` counts as a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _files(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)


def _offenders(files: list[Path], banned) -> list[str]:
    return [f"{p.relative_to(ROOT)}: {name}" for p in files for name in sorted(_imports(p))
            if banned(name)]


def test_only_the_ledger_package_touches_lmdb_or_private_ledger_names():
    """Outside gateway/ledger nothing imports lmdb or a private ledger module."""
    outside = [p for p in _files(GATEWAY) if "ledger" not in p.relative_to(GATEWAY).parts[:1]]
    outside += _files(ROOT / "bench") + _files(ROOT / "tests")
    assert _offenders(outside, lambda n: n == "lmdb" or n.startswith("gateway.ledger._")) == []


def test_the_bank_link_is_the_only_gateway_module_speaking_the_banks_protocol():
    """Only gateway/payments/bank.py imports banksim.v1; the rest of banksim stays outside."""
    files = [p for p in _files(GATEWAY) if p != GATEWAY / "payments" / "bank.py"]
    allowed = {"banksim.cli", "banksim.cards"}  # `hongbao banksim`, and the card-id rule
    assert _offenders(files, lambda n: n.startswith("banksim.")
                      and not any(n == a or n.startswith(a + ".") for a in allowed)) == []


def test_the_domain_imports_no_backend_transport_or_bank():
    """gateway/domain depends on hotpath, gateway.errors and the standard library only."""
    banned = ("gateway.ledger", "gateway.payments", "gateway.usecases", "gateway.transport",
              "gateway.ops", "grpc", "lmdb", "banksim", "hongbao")
    assert _offenders(_files(GATEWAY / "domain"),
                      lambda n: any(n == b or n.startswith(b + ".") for b in banned)) == []


def test_servicers_reach_only_the_use_cases():
    """Servicers never import the ledger, the butler or the bank link."""
    banned = ("gateway.ledger", "gateway.payments")
    assert _offenders(_files(GATEWAY / "transport" / "servicers"),
                      lambda n: any(n == b or n.startswith(b + ".") for b in banned)) == []


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns(name):
    """Each subpackage's docstring says what it owns and what it may import."""
    doc = importlib.import_module(f"gateway.{name}").__doc__ or ""
    assert "Owns" in doc and "May import" in doc, name


@pytest.mark.parametrize("ours, theirs", [
    (model.EnvelopeKind, envelope_pb2.EnvelopeKind),
    (model.EnvelopeStatus, envelope_pb2.EnvelopeStatus),
    (model.PayMethod, envelope_pb2.PayMethod),
    (model.GrabOutcome, envelope_pb2.GrabOutcome),
    (model.TxKind, wallet_pb2.TransactionKind),
    (model.PaymentStatus, wallet_pb2.PaymentStatus),
    (model.NoticeKind, notification_pb2.NotificationKind),
])
def test_domain_enums_share_the_api_numbers(ours, theirs):
    """Each domain enum member has the number of the hongbao.v1 value with the same name."""
    prefix = theirs.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    names = {v.name.removeprefix(prefix): v.number for v in theirs.DESCRIPTOR.values}
    for member in ours:
        if member is model.TxKind.GRAB:
            continue  # an internal transfer kind, never a wallet entry
        assert names.get(member.name) == member.value, (ours.__name__, member.name, names)


def test_only_the_cluster_and_ops_packages_speak_nats():
    """The embedded mode never needs NATS: only gateway/cluster and the commands import it."""
    files = [p for p in _files(GATEWAY)
             if p.relative_to(GATEWAY).parts[0] not in ("cluster", "ops")]
    assert _offenders(files, lambda n: n == "nats" or n.startswith("nats.")) == []
