"""The worker supervisor: ``hongbao serve --workers N`` runs N processes on one port.

A parent holds the port with SO_REUSEPORT while the workers start (each binds
it too, and opens LMDB itself, after its own start), then forwards SIGTERM and
SIGINT to them. A worker that dies is started again on the same port after a
backoff (0.5 s, doubling to 30 s; back to 0.5 s once a worker has lived a minute),
while the others keep serving; the background loops move to a surviving worker
on their own (``role.py``). More than ``MAX_RESTARTS`` restarts within
``RESTART_WINDOW_S`` means something is wrong with every start (a bad disk, a
broken setting): the supervisor then stops them all and exits 1, for the
supervisor above (systemd, a container runtime) to act on.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import structlog

from gateway.transport.portfile import write_port_file
from gateway.transport.server import ServeOptions

log = structlog.get_logger(__name__)


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
    cmds = []
    for i in range(opts.workers):
        pf = run_dir / f"worker-{i}.port"
        pf.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gateway.ops.cli", *argv_without_workers, "--port", str(port),
               "--worker-index", str(i), "--reuse-port", "--port-file", str(pf)]
        cmds.append(cmd)
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

    stopping = [False]

    def forward(signum, _frame):
        stopping[0] = True
        for p, _pf in children:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = _keep_alive(children, cmds, stopping)
    forward(signal.SIGTERM, None)
    for p, _pf in children:
        try:
            rc = rc or p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = rc or 1
    return rc


MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
_HEALTHY_S = 60.0  # a worker that lived this long starts its backoff afresh


def _keep_alive(children: list, cmds: list[list[str]], stopping: list[bool]) -> int:
    """Restarts dead workers with backoff until a signal (0) or too many restarts (1)."""
    started = [time.monotonic()] * len(children)
    failures = [0] * len(children)
    due: list[float | None] = [None] * len(children)
    restarts: list[float] = []
    while not stopping[0]:
        now = time.monotonic()
        for i, (p, pf) in enumerate(children):
            if due[i] is None and p.poll() is not None and not stopping[0]:
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
                if len(restarts) >= MAX_RESTARTS:
                    log.error("workers_keep_dying", restarts=len(restarts),
                              window_s=RESTART_WINDOW_S)
                    return 1
                if now - started[i] >= _HEALTHY_S:
                    failures[i] = 0
                delay = _BACKOFF_S[min(failures[i], len(_BACKOFF_S) - 1)]
                log.warning("worker_died", worker=i, pid=p.pid, returncode=p.returncode,
                            restart_in_s=delay)
                due[i] = now + delay
            restart_at = due[i]
            if restart_at is not None and now >= restart_at and not stopping[0]:
                pf.unlink(missing_ok=True)
                children[i] = (subprocess.Popen(cmds[i]), pf)
                log.info("worker_restarted", worker=i, pid=children[i][0].pid)
                started[i], due[i] = now, None
                failures[i] += 1
                restarts.append(now)
        time.sleep(0.1)
    return 0
