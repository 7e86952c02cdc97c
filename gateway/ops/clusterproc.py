"""A whole cluster of real processes on loopback: 3 ``nats-server`` nodes, a bank simulator
and K SETs (``hongbao serve --cluster FILE``), for tests, ``make cluster``, the benchmark
and the demo.

Each SET gets a free port picked at construction and kept across restarts (its address is
in the slot map), its own data directory and cluster file. The SETs share one ticket key
file, as the SETs of a real cluster must: a forwarded call carries the caller's ticket and
the owner verifies it again. Every process is stopped by its pid (``gateway.ops.procs``).

``idcs=2`` runs each SET as two gateway groups, "a" and "b" (two IDCs): two processes,
each on its own port with its own cluster file (``idc = "a"``), over the same data
directory (LMDB is multi-process; the background role's flock in ``<data-dir>/run``
makes one worker of both groups run the relay, the consumer, the resolver and the
sweepers) and the same key file. ``cluster.sets[name]`` is group a;
``cluster.groups[name]`` lists the groups, a first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.ops.natsproc import NatsCluster
from gateway.ops.procs import Proc, banksim_proc, free_port
from gateway.security import tickets


class SetProc:
    """One SET, or one gateway group of a SET (``idc``): a ``hongbao serve --cluster``
    process group on a fixed port. Groups of one SET share its data directory."""

    def __init__(self, root: Path, name: str, nats_urls: list[str], key_file: Path,
                 bank: str | None, extra: tuple[str, ...] = (), idc: str | None = None) -> None:
        self.name = name
        self.idc = idc
        self.port = free_port()
        self.data_dir = root / name
        group = name if idc is None else f"{name}-{idc}"
        self.cluster_file = root / f"{group}.toml"
        self.log = root / f"{group}.log"
        # Beside the shared ledger, one port file per group.
        self.port_file = self.data_dir / ("gateway.port" if idc is None
                                          else f"gateway-{idc}.port")
        self.key_file = key_file
        self.bank = bank
        self.extra = extra
        self.proc: Proc | None = None
        urls = ", ".join(f'"{u}"' for u in nats_urls)
        self.cluster_file.write_text(
            f'set = "{name}"\naddress = "127.0.0.1:{self.port}"\nnats = [{urls}]\n'
            + (f'idc = "{idc}"\n' if idc is not None else ""))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway.ops.cli", "serve", "--cluster",
               str(self.cluster_file), "--data-dir", str(self.data_dir), "--key-file",
               str(self.key_file), "--port-file", str(self.port_file), *self.extra]
        return cmd + (["--bank", self.bank] if self.bank else [])

    def start(self, timeout_s: float = 60.0) -> SetProc:
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> SetProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(self.command(), self.port_file, self.log)
        self.proc.spawn()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> SetProc:
        assert self.proc is not None
        self.proc.wait_ready(timeout_s)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    @property
    def running(self) -> bool:
        return (self.proc is not None and self.proc.popen is not None
                and self.proc.popen.poll() is None)


IDC_NAMES = "abcdefgh"


class LocalCluster:
    """``sets`` SETs named s1..sK over a 3-node JetStream cluster, with a bank simulator;
    each SET as ``idcs`` gateway groups (a, b, ...) over its one data directory."""

    def __init__(self, root: Path, sets: int = 3, *, bank: bool = True, idcs: int = 1,
                 set_args: tuple[str, ...] = (), bank_args: tuple[str, ...] = (),
                 nats: NatsCluster | None = None) -> None:
        """``nats``: a running NATS cluster to use instead of starting one. It is cleared
        of every stream and bucket at start and left running at stop (the tests share one:
        a JetStream cluster takes seconds to elect its meta leader)."""
        assert 1 <= idcs <= len(IDC_NAMES)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._own_nats = nats is None
        self.nats = NatsCluster(root / "nats") if nats is None else nats
        self.bank = banksim_proc(root / "bank", *bank_args, log_path=root / "banksim.log") \
            if bank else None
        ring = tickets.KeyRing.load_or_create(root / "keys")
        self.key_file = root / "keys" / "ticket_keys.json"
        self._ring = ring
        self._set_args = set_args
        self.sets: dict[str, SetProc] = {}            # group a of each SET
        self.groups: dict[str, list[SetProc]] = {}    # every group of each SET, a first
        self._count = sets
        self._idcs = idcs

    def start(self) -> LocalCluster:
        try:
            if self.bank is not None:
                self.bank.spawn()
            if self._own_nats:
                self.nats.start()
            else:
                self.nats.clear()
            if self.bank is not None:
                self.bank.wait_ready()
            bank = self.bank.target if self.bank is not None else None
            for i in range(self._count):
                name = f"s{i + 1}"
                idcs = [None] if self._idcs == 1 else list(IDC_NAMES[:self._idcs])
                self.groups[name] = [SetProc(self.root, name, self.nats.urls, self.key_file,
                                             bank, self._set_args, idc) for idc in idcs]
                self.sets[name] = self.groups[name][0]
            self.init_map()
            # Every SET's group a together, then the other groups: a second group opens a
            # ledger its SET's first group has finished creating.
            for wave in (list(self.sets.values()),
                         [g for groups in self.groups.values() for g in groups[1:]]):
                for group in wave:
                    group.spawn()
                for group in wave:
                    group.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def init_map(self) -> None:
        """``hongbao cluster init`` over the SETs, through the real command."""
        cmd = [sys.executable, "-m", "gateway.ops.cli", "cluster", "init", "--nats",
               ",".join(self.nats.urls)]
        for name, groups in self.groups.items():
            cmd += ["--set", f"{name}={','.join(g.address for g in groups)}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"cluster init failed: {done.stderr.strip()}")

    def ticket(self, user: str, scopes: tuple[str, ...] = ("pay", "grab", "read"),
               ttl_s: int = 3600) -> str:
        return tickets.mint(self._ring, user, list(scopes), ttl_s)[0]

    @property
    def addresses(self) -> dict[str, str]:
        """Each SET's first group's address."""
        return {name: s.address for name, s in self.sets.items()}

    @property
    def group_addresses(self) -> dict[str, list[str]]:
        """Each SET's groups' addresses, a first (as in the slot map)."""
        return {name: [g.address for g in groups] for name, groups in self.groups.items()}

    def group(self, name: str, idc: str) -> SetProc:
        """SET ``name``'s gateway group ``idc`` ("a", "b")."""
        return self.groups[name][IDC_NAMES.index(idc)] if self._idcs > 1 else self.sets[name]

    def all_groups(self) -> list[SetProc]:
        return [g for groups in self.groups.values() for g in groups]

    def reconcile_set(self, name: str) -> subprocess.CompletedProcess:
        """One SET's own books (``hongbao reconcile --data-dir``)."""
        return subprocess.run(
            [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
             str(self.sets[name].data_dir)], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for group in self.all_groups():
            group.stop()
        if self.bank is not None:
            self.bank.stop()
        if self._own_nats:
            self.nats.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
