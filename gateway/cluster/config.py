"""The cluster file a SET is started with (``hongbao serve --cluster FILE``) and that the
``hongbao cluster`` and ``hongbao reconcile --cluster`` commands read:

    set = "s1"                          # this SET's name, as in the slot map
    address = "127.0.0.1:7101"          # where other SETs and clients reach this group
    nats = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
    idc = "a"                           # optional: which gateway group of the SET this is

A SET run as two gateway groups (two IDCs over the same data) has one file per group:
the same ``set`` and ``nats``, each group its own ``address`` (one of the SET's addresses
in the slot map) and ``idc`` (a name for logs: "a", "b"). Any mistake is one line naming
the key (``ClusterFileError``), never a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from gateway.cluster.slotmap import ADDRESS, SET_NAME

IDC_NAME = re.compile(r"[a-z][a-z0-9_-]{0,15}")


class ClusterFileError(ValueError):
    pass


class ClusterStartError(RuntimeError):
    """A SET cannot join its cluster (no slot map, not in it, NATS unreachable)."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    set_name: str
    address: str
    nats: tuple[str, ...]
    idc: str | None = None   # the gateway group's name ("a", "b"); None: not said

    @property
    def group(self) -> str:
        """``s1`` or ``s1/a``: how logs and the NATS connection name this group."""
        return self.set_name if self.idc is None else f"{self.set_name}/{self.idc}"

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ClusterFileError(f"{path}: {exc}") from None
        unknown = set(values) - {"set", "address", "nats", "idc"}
        if unknown:
            raise ClusterFileError(f"{path}: unknown keys {sorted(unknown)} "
                                   "(want set, address, nats, idc)")
        idc = values.get("idc")
        if idc is not None and (not isinstance(idc, str) or not IDC_NAME.fullmatch(idc)):
            raise ClusterFileError(f"{path}: idc must be a short name like \"a\" or \"b\"")
        name, address, nats = values.get("set"), values.get("address"), values.get("nats")
        if not isinstance(name, str) or not SET_NAME.fullmatch(name):
            raise ClusterFileError(f"{path}: set must be a name like \"s1\"")
        if not isinstance(address, str) or not ADDRESS.fullmatch(address):
            raise ClusterFileError(f"{path}: address must be host:port")
        if (not isinstance(nats, list) or not nats
                or not all(isinstance(u, str) and u.startswith("nats://") for u in nats)):
            raise ClusterFileError(f"{path}: nats must be a list of nats://host:port URLs")
        return cls(name, address, tuple(nats), idc)
