"""The worker supervisor: ``hongbao serve --workers N`` runs N processes on one port.

A parent holds the port with SO_REUSEPORT while the workers start (each binds
it too, and opens LMDB itself, after its own start), then forwards SIGTERM and
SIGINT to them. If one worker dies the rest are stopped: a supervisor above
(systemd, a container runtime) restarts the service whole.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from gateway.transport.portfile import write_port_file
from gateway.transport.server import ServeOptions


def _reserve_port(host: str, port: int) -> socket.socket:
    """Holds a port with SO_REUSEPORT so N workers can bind it (never listens)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(argv_without_workers: list[str], opts: ServeOptions, wait_s: float = 60) -> int:
    """Starts ``opts.workers`` worker processes on one port; stops them all on a signal."""
    holder = _reserve_port(opts.host, opts.port)
    port = holder.getsockname()[1]
    run_dir = opts.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for i in range(opts.workers):
        pf = run_dir / f"worker-{i}.port"
        pf.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gateway.ops.cli", *argv_without_workers, "--port", str(port),
               "--worker-index", str(i), "--reuse-port", "--port-file", str(pf)]
        children.append((subprocess.Popen(cmd), pf))
    deadline = time.monotonic() + wait_s
    while not all(pf.exists() for _p, pf in children):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _pf in children):
            for p, _pf in children:
                p.kill()
            return 1
        time.sleep(0.05)
    holder.close()
    if opts.port_file:
        write_port_file(opts.port_file, port)

    def forward(signum, _frame):
        for p, _pf in children:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # If one worker dies, stop the rest: a supervisor above restarts the service whole.
    while all(p.poll() is None for p, _pf in children):
        time.sleep(0.2)
    forward(signal.SIGTERM, None)
    rc = 0
    for p, _pf in children:
        try:
            rc = rc or p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = rc or 1
    return rc
