"""Starting and stopping the project's own processes (demo, tests, benchmarks).

Every process is started with a port file, waited for with a deadline, and
stopped by its pid: SIGTERM, a bounded wait, then SIGKILL. Each starts in a session
of its own, so its process group is its pid: SIGKILL goes to the group, and a
``--workers N`` supervisor killed after its wait takes its workers with it instead of
orphaning them (the supervisor itself waits up to 30 s for each worker to drain).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A loopback port free a moment ago, for a process that cannot bind port 0 and say
    which (redis-server, a metrics page) or must come back on the same one (a bank)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Longer than a supervisor's drain of its workers, shorter than a test's time limit.
STOP_TIMEOUT_S = 40.0


class Proc:
    """A child process serving on a loopback port it chose itself (port 0)."""

    def __init__(self, cmd: list[str], port_file: Path, log_path: Path | None = None,
                 env: dict | None = None) -> None:
        self.cmd = cmd
        self.port_file = port_file
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Proc:
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> Proc:
        """Starts the process without waiting for its port (see :meth:`wait_ready`)."""
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            stdout = subprocess.DEVNULL if log is None else log
            self.popen = subprocess.Popen(self.cmd, stdout=stdout, stderr=subprocess.STDOUT,
                                          env=self.env, start_new_session=True)
        finally:
            if log is not None:
                log.close()  # the child has its own copy of the descriptor
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> Proc:
        """Waits until the process has written its port; kills it after ``timeout_s``."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                if text:
                    self.port = int(text)
                    return self
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.cmd[:4]} exited with {self.popen.returncode}; "
                                   f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.cmd[:4]} did not start in {timeout_s} s")
            time.sleep(0.02)

    def children(self) -> list[int]:
        """The pids of its child processes (a supervisor's workers), from /proc."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL to its group if it has not gone after ``timeout_s``."""
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL to the process and its group (workers): the crash durability must survive."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)   # the group: its pid (own session)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def banksim_proc(data_dir: Path, *extra: str, log_path: Path | None = None) -> Proc:
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = data_dir / "banksim.port"
    cmd = [sys.executable, "-m", "banksim", "--port", "0", "--port-file", str(port_file),
           "--data-dir", str(data_dir), *extra]
    return Proc(cmd, port_file, log_path)


def gateway_proc(data_dir: Path, *extra: str, bank: str | None = None,
                 log_path: Path | None = None, env: dict | None = None) -> Proc:
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = data_dir / "gateway.port"
    cmd = [sys.executable, "-m", "gateway.ops.cli", "serve", "--port", "0", "--port-file",
           str(port_file), "--data-dir", str(data_dir), *extra]
    if bank:
        cmd += ["--bank", bank]
    return Proc(cmd, port_file, log_path, env)
