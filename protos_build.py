"""Compiles protos/ into the generated packages (run by setup.py and `make protos`).

Outputs, all git-ignored and never edited by hand:
  hongbao/__init__.py, hongbao/v1/*_pb2.py, *_pb2_grpc.py, *.pyi
  banksim/v1/...  (beside the hand-written banksim package)
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
_NOTICE = '"""Generated from protos/ by protos_build.py. DO NOT EDIT."""\n'


def compile_protos() -> None:
    import grpc_tools  # noqa: PLC0415 - only present at build time
    from grpc_tools import protoc  # noqa: PLC0415

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    for pkg in ("hongbao", "hongbao/v1", "banksim/v1"):
        init = ROOT / pkg / "__init__.py"
        if not init.exists() or init.read_text() != _NOTICE:
            init.write_text(_NOTICE)


if __name__ == "__main__":
    compile_protos()
    sys.stdout.write("protos compiled\n")
