"""Shared fixtures: real processes on loopback, real LMDB in tmp_path."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.client import Client
from gateway.ops.procs import Proc, banksim_proc, gateway_proc
from gateway.security import tickets


def run(coro):
    """Runs a coroutine on a fresh event loop (the suite needs no asyncio plugin)."""
    return asyncio.run(coro)


class Stack:
    """A bank simulator and a gateway, both real processes, and tickets for users."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bank: Proc = banksim_proc(root / "bank", log_path=root / "banksim.log")
        self.gateway: Proc | None = None
        self.gateway_args: tuple[str, ...] = ()
        self._ring: tickets.KeyRing | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "gateway"

    def start_gateway(self, *args: str) -> Proc:
        """(Re)starts the gateway with ``args``; a running one is stopped first."""
        if self.gateway is not None:
            self.gateway.stop()
        self.gateway_args = args or self.gateway_args
        self.gateway = gateway_proc(self.data_dir, *self.gateway_args, bank=self.bank.target,
                                    log_path=self.root / "gateway.log")
        self.gateway.start()
        self._ring = None
        return self.gateway

    @property
    def target(self) -> str:
        assert self.gateway is not None
        return self.gateway.target

    def ticket(self, user: str, scopes=("pay", "grab", "read")) -> str:
        if self._ring is None:
            self._ring = tickets.KeyRing.load_or_create(self.data_dir)
        return tickets.mint(self._ring, user, list(scopes), 3600)[0]

    def meta(self, user: str, scopes=("pay", "grab", "read")):
        return Client.bearer(self.ticket(user, scopes))

    def reconcile(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir", str(self.data_dir),
             "--bank", self.bank.target, *extra], capture_output=True, text=True, timeout=120)

    def assert_balanced(self) -> None:
        rec = self.reconcile()
        assert rec.returncode == 0, rec.stdout + rec.stderr
        assert "BALANCED" in rec.stdout

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.bank.stop()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory):
    """One NATS JetStream cluster (3 nodes) for the cluster tests that leave its nodes alone:
    electing a meta leader takes seconds, so the suite starts it once. Each user clears it
    first (``LocalCluster(nats=...)`` does that itself); the nodes stop at the session end."""
    from gateway.ops.natsproc import NatsCluster
    with NatsCluster(tmp_path_factory.mktemp("shared-nats")) as cluster:
        yield cluster


@pytest.fixture
def stack(tmp_path):
    """A running bank simulator and gateway; books must balance at the end of every test."""
    s = Stack(tmp_path)
    try:
        s.bank.start()
        s.start_gateway()
        yield s
        s.assert_balanced()
    finally:
        s.stop()


@pytest.fixture
def bank_stack(tmp_path):
    """The stack with a short bank deadline and resolve delay, so faults resolve in seconds."""
    config = tmp_path / "gateway.toml"
    config.write_text("bank_timeout_s = 1.0\nresolve_delay_s = 0.5\n"
                      "resolver_max_backoff_s = 2.0\n")
    s = Stack(tmp_path)
    try:
        s.bank.start()
        s.start_gateway("--config", str(config))
        yield s
        s.assert_balanced()
    finally:
        s.stop()
