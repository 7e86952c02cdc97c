"""The hot path: envelope splitting, the grab gate and ledger record packing.

Two implementations with one API: Cython (`hotpath._split`, `_gate`,
`_records`; the default) and a pure-Python twin (`hotpath._pure_*`), which is
the reference for property tests and benchmarks.  HONGBAO_HOTPATH=pure selects
the twin for the names re-exported here; load(name) returns either one
explicitly.  mypy cannot read .pyx: the Cython modules' Python API is typed by
their .pyi stubs beside them, which `make lint` checks against the build (stubtest).
"""

import os
import types

__all__ = [
    "DEFAULT_MAX_SHARE_FEN",
    "ENVELOPE_HEADER_SIZE",
    "GATE_ALREADY",
    "GATE_SOLD_OUT",
    "GATE_UNTRACKED",
    "GRAB_RECORD_SIZE",
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "MAX_COUNT",
    "TRANSFER_HEADER_SIZE",
    "EnvelopeSoldOutError",
    "GrabGate",
    "MalformedRecordError",
    "add_fen",
    "claim_share",
    "debit_ok",
    "envelope_header",
    "load",
    "pack_envelope",
    "pack_grab",
    "pack_i64",
    "pack_transfer",
    "split_lucky",
    "split_normal",
    "unpack_envelope",
    "unpack_grab",
    "unpack_i64",
    "unpack_transfer",
]

IMPLEMENTATIONS = ("cython", "pure")

# The names each implementation provides (the errors are shared, see _errors).
_API = {
    "split": ("DEFAULT_MAX_SHARE_FEN", "MAX_COUNT", "split_lucky", "split_normal"),
    "gate": ("GATE_ALREADY", "GATE_SOLD_OUT", "GATE_UNTRACKED", "GrabGate"),
    "records": (
        "ENVELOPE_HEADER_SIZE", "GRAB_RECORD_SIZE", "TRANSFER_HEADER_SIZE",
        "add_fen", "claim_share", "debit_ok", "envelope_header", "pack_envelope",
        "pack_grab", "pack_i64", "pack_transfer", "unpack_envelope", "unpack_grab",
        "unpack_i64", "unpack_transfer",
    ),
}

_loaded: dict[str, types.SimpleNamespace] = {}


def load(name: str) -> types.SimpleNamespace:
    """Return the implementation called `name` ("cython" or "pure") as a namespace."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown hot-path implementation {name!r}; "
                         f"choose one of {', '.join(IMPLEMENTATIONS)}")
    if name not in _loaded:
        from hotpath import _errors

        modules: dict[str, types.ModuleType]
        if name == "cython":
            # No silent fallback to the twin: a missing build must be loud.
            from hotpath import _gate, _records, _split

            modules = {"split": _split, "gate": _gate, "records": _records}
        else:
            from hotpath import _pure_gate, _pure_records, _pure_split

            modules = {"split": _pure_split, "gate": _pure_gate, "records": _pure_records}
        names = {n: getattr(modules[m], n) for m, ns in _API.items() for n in ns}
        _loaded[name] = types.SimpleNamespace(
            IMPLEMENTATION=name,
            EnvelopeSoldOutError=_errors.EnvelopeSoldOutError,
            MalformedRecordError=_errors.MalformedRecordError,
            **names,
        )
    return _loaded[name]


IMPLEMENTATION = os.environ.get("HONGBAO_HOTPATH", "cython")
_chosen = load(IMPLEMENTATION)

DEFAULT_MAX_SHARE_FEN = _chosen.DEFAULT_MAX_SHARE_FEN
MAX_COUNT = _chosen.MAX_COUNT
split_lucky = _chosen.split_lucky
split_normal = _chosen.split_normal

GATE_ALREADY = _chosen.GATE_ALREADY
GATE_SOLD_OUT = _chosen.GATE_SOLD_OUT
GATE_UNTRACKED = _chosen.GATE_UNTRACKED
GrabGate = _chosen.GrabGate

ENVELOPE_HEADER_SIZE = _chosen.ENVELOPE_HEADER_SIZE
GRAB_RECORD_SIZE = _chosen.GRAB_RECORD_SIZE
TRANSFER_HEADER_SIZE = _chosen.TRANSFER_HEADER_SIZE
add_fen = _chosen.add_fen
claim_share = _chosen.claim_share
debit_ok = _chosen.debit_ok
envelope_header = _chosen.envelope_header
pack_envelope = _chosen.pack_envelope
pack_grab = _chosen.pack_grab
pack_i64 = _chosen.pack_i64
pack_transfer = _chosen.pack_transfer
unpack_envelope = _chosen.unpack_envelope
unpack_grab = _chosen.unpack_grab
unpack_i64 = _chosen.unpack_i64
unpack_transfer = _chosen.unpack_transfer

EnvelopeSoldOutError = _chosen.EnvelopeSoldOutError
MalformedRecordError = _chosen.MalformedRecordError
