"""Declares the extension modules; metadata lives in pyproject.toml.

The one addition: protos/ is compiled into the generated packages
``hongbao.v1`` and ``banksim.v1`` (with ``.pyi`` stubs) before setup() runs,
because setuptools checks that listed package folders exist before any build
command could make them.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protos_build import compile_protos  # noqa: E402 - needs the line above

# HONGBAO_DEBUG=1 compiles the hot path with its internal assertions on.
_DEBUG = os.environ.get("HONGBAO_DEBUG", "") == "1"
_MACROS = [("HONGBAO_DEBUG", "1")] if _DEBUG else [("CYTHON_WITHOUT_ASSERTIONS", "1")]
_COMPILE_ARGS = ["-O1", "-g"] if _DEBUG else ["-O3"]

_EXTENSIONS = [
    Extension(f"hotpath.{name}", [f"hotpath/{name}.pyx"],
              define_macros=_MACROS, extra_compile_args=_COMPILE_ARGS)
    for name in ("_split", "_gate", "_records")
]

compile_protos()
setup(
    ext_modules=cythonize(
        _EXTENSIONS,
        language_level=3,
        compile_time_env={"HONGBAO_DEBUG": _DEBUG},
        compiler_directives={
            "boundscheck": _DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": _DEBUG,
        },
    ),
)
