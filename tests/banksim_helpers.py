"""Start and stop a real bank simulator process for tests (also used by the gateway's tests).

The process binds port 0 on loopback and writes the port it got to a port file;
the helper waits for that file (bounded) and stops the process by its pid:
SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def data_dir_of(tmp_path: Path) -> Path:
    """Where ``start_banksim`` keeps the ledger for ``tmp_path`` (a restart reuses it)."""
    return tmp_path / "banksim-data"


def start_banksim(tmp_path: Path, *extra_args: str) -> tuple[subprocess.Popen[bytes], int]:
    """Starts ``python -m banksim`` on 127.0.0.1, port 0; returns the process and its port.

    The ledger lives in ``data_dir_of(tmp_path)`` unless ``extra_args`` name a
    ``--data-dir``; logs append to ``tmp_path / "banksim.log"``.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    port_file = tmp_path / "banksim.port"
    port_file.unlink(missing_ok=True)
    args = ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    if "--data-dir" not in extra_args:
        args += ["--data-dir", str(data_dir_of(tmp_path))]
    log_path = tmp_path / "banksim.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "banksim", *args, *extra_args],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.exists():
            return proc, int(port_file.read_text().strip())
        if proc.poll() is not None:
            raise RuntimeError(f"banksim exited with {proc.returncode}:\n{_tail(log_path)}")
        time.sleep(0.02)
    stop_banksim(proc)
    raise TimeoutError(f"banksim wrote no port file in {START_TIMEOUT_S} s:\n{_tail(log_path)}")


def stop_banksim(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return proc.returncode


@contextlib.contextmanager
def running_banksim(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``start_banksim`` as a context manager that always stops the process."""
    proc, port = start_banksim(tmp_path, *args)
    try:
        yield proc, port
    finally:
        stop_banksim(proc)


def reason_of(err: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failed call, if the server sent one."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
