"""A NATS JetStream cluster of real ``nats-server`` processes on loopback (tests, demo,
``make cluster``).

Each node gets a client port and a route port picked free at construction, kept across
restarts (a node that comes back must come back where its peers route to), a store
directory of its own and a config file written next to it. Nodes are started and stopped
by pid like every process of the project (``gateway.ops.procs``): SIGTERM then SIGKILL, or
SIGKILL at once to test a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.ops.procs import Proc, free_port

READY_TIMEOUT_S = 30.0


def nats_server_binary() -> str | None:
    """The ``nats-server`` on PATH (Debian's package puts it in /usr/bin), or None."""
    return shutil.which("nats-server")


class NatsNode:
    def __init__(self, root: Path, name: str, port: int, route_port: int) -> None:
        self.root = root
        self.name = name
        self.port = port
        self.route_port = route_port
        self.store = root / name
        self.config = root / f"{name}.conf"
        self.log = root / f"{name}.log"
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, routes: list[int]) -> None:
        others = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes if p != self.route_port)
        self.config.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"jetstream {{ store_dir: \"{self.store}\", max_memory_store: 64MB, "
            f"max_file_store: 2GB }}\n"
            f"cluster {{ name: hongbao, listen: 127.0.0.1:{self.route_port}, "
            f"routes: [{others}] }}\n")

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install -y nats-server)")
        self.store.mkdir(parents=True, exist_ok=True)
        # nats-server writes no port file; the port is fixed, so Proc's port file is ours.
        marker = self.root / f"{self.name}.port"
        self.proc = Proc([binary, "-c", str(self.config)], marker, self.log)
        self.proc.port_file.unlink(missing_ok=True)
        _start_and_wait(self.proc, self.port, marker)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout_s=10.0)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    @property
    def running(self) -> bool:
        return (self.proc is not None and self.proc.popen is not None
                and self.proc.popen.poll() is None)


def _start_and_wait(proc: Proc, port: int, marker: Path) -> None:
    """Starts ``proc`` and waits until its client port accepts connections."""
    log = open(proc.log_path, "ab") if proc.log_path else None  # noqa: SIM115
    try:
        proc.popen = subprocess.Popen(proc.cmd, stdout=log or subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not None:
            log.close()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.popen.returncode}; "
                               f"see {proc.log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            proc.port = port
            marker.write_text(str(port))
            return
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"nats-server on port {port} did not start in {READY_TIMEOUT_S} s")


class NatsCluster:
    """``size`` JetStream nodes routed to each other (3 by default, as the cluster wants)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.nodes = [NatsNode(root, f"n{i + 1}", free_port(), free_port())
                      for i in range(size)]
        routes = [n.route_port for n in self.nodes]
        for n in self.nodes:
            n.write_config(routes)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> NatsCluster:
        try:
            for n in self.nodes:
                n.start()
            asyncio.run(wait_for_jetstream(self.urls))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def clear(self) -> int:
        """Deletes every stream (key-value buckets included): a cluster used again starts
        empty, as a new one would. Returns how many were deleted."""
        return asyncio.run(clear_jetstream(self.urls))

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_jetstream(urls: list[str], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Returns once JetStream answers through ``urls`` (the cluster has a meta leader)."""
    import nats
    from nats.errors import Error as NatsError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(servers=urls, connect_timeout=1, max_reconnect_attempts=0)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except (TimeoutError, NatsError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.2)
    raise TimeoutError(f"JetStream did not become ready at {urls} in {timeout_s} s: {last!r}")


async def clear_jetstream(urls: list[str]) -> int:
    """Deletes every stream of the account behind ``urls``; waits for the cluster first."""
    import nats

    await wait_for_jetstream(urls)
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        js = nc.jetstream()
        names = [info.config.name for info in await js.streams_info() if info.config.name]
        for name in names:
            await js.delete_stream(name)
        return len(names)
    finally:
        await nc.close()
