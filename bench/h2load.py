"""An h2load driver for gRPC: prebuilt length-prefixed frames, the summary and the latencies.

h2load (Debian's ``nghttp2-client``) is an HTTP/2 load generator written in C: it
costs the machine a few tens of microseconds of CPU per call, several times less
than a Python gRPC client, so it can load a Python server without becoming the
bottleneck. It knows nothing of gRPC, so this module

- builds the request body once: a gRPC message is one length-prefixed frame
  (1 byte compressed-flag 0, 4 bytes big-endian length, the serialized protobuf),
  written to a file that h2load posts as the body of every request (``-d``);
- runs h2load with the headers a gRPC server wants (``content-type:
  application/grpc``, ``te: trailers``, optionally ``authorization: Bearer ...``);
- parses its summary (requests done and succeeded, req/s, time for request
  min/max/mean/sd) and its per-request ``--log-file`` (start time, HTTP status,
  microseconds to the end of the response) for p50 and p99.

Two limits a reader of its figures must keep in mind:

- h2load counts HTTP 200 as success even when the gRPC status in the trailers is
  not 0 (a refused call is still HTTP 200), so a benchmark must cross-check with
  the server's own counters (hongbao: ``hongbao_rpc_requests_total{method,code}``
  on ``--metrics-port``);
- every request carries the same body and headers: one user making the same call
  over and over. For GetBalance that is a real read; for GrabEnvelope it is one
  user re-grabbing one envelope (after the first call an ALREADY_GRABBED replay);
  for SendEnvelope it is a retry of one request id (an idempotent replay).

As a script (the target's port, a method, a request as JSON)::

    python bench/h2load.py 127.0.0.1:PORT hongbao.v1.WalletService/GetBalance \
        --json '{}' --ticket TICKET -D 3 -c 4 -m 16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from gateway.ops.loadgen import percentile

MAX_MESSAGE_BYTES = 4 << 20  # the gateway's grpc.max_receive_message_length
MAX_DURATION_S = 600  # one run; h2load is killed past duration + STOP_GRACE_S
STOP_GRACE_S = 30.0
MAX_LOG_ROWS = 5_000_000  # per-request rows read from a --log-file (about 100 MB)
_PB2_MODULES = tuple(f"hongbao.v1.{m}_pb2" for m in ("admin", "auth", "envelope", "moments",
                                                     "notification", "wallet"))

_UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0}
_TIME = r"([\d.]+)(us|ms|s)"
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")
_FINISHED = re.compile(r"finished in " + _TIME + r", ([\d.]+) req/s")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FOR_REQUEST = re.compile(r"time for request:\s+" + r"\s+".join([_TIME] * 4))


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """One h2load run. Times in microseconds unless the name says otherwise."""

    total: int
    done: int
    succeeded: int  # HTTP 2xx: NOT the gRPC status (see the module docstring)
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    elapsed_s: float
    requests_per_s: float
    min_us: float
    max_us: float
    mean_us: float
    sd_us: float
    p50_ms: float | None = None  # from the --log-file, when one was asked for
    p99_ms: float | None = None
    cpu_s: float = 0.0  # h2load's own CPU time (user + system)
    log_rows: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def grpc_frame(message: Message | bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(payload)} bytes is over {MAX_MESSAGE_BYTES}")
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def write_body(path: str | os.PathLike, message: Message | bytes) -> Path:
    """Writes the request body h2load posts with ``-d``: one frame (one message a call)."""
    path = Path(path)
    path.write_bytes(grpc_frame(message))
    return path


def find_h2load() -> str | None:
    return shutil.which("h2load")


def command(target: str, method: str, body: Path, *, ticket: str | None = None,
            duration_s: float | None = None, requests: int | None = None,
            clients: int = 4, streams: int = 16, threads: int = 1,
            log_file: Path | None = None, h2load: str = "h2load") -> list[str]:
    """The h2load command line. ``method`` is ``package.Service/Method`` (a leading / is
    optional); exactly one of ``duration_s`` (-D) and ``requests`` (-n) bounds the run."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    if not 1 <= clients <= 1024 or not 1 <= streams <= 1024 or not 1 <= threads <= clients:
        raise ValueError("clients and streams must be in 1..1024, threads in 1..clients")
    cmd = [h2load, "-c", str(clients), "-m", str(streams), "-t", str(threads), "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if ticket:
        cmd += ["-H", f"authorization: Bearer {ticket}"]
    if duration_s is not None:
        if not 0 < duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}]")
        cmd += ["-D", f"{max(1, round(duration_s))}"]  # h2load takes whole seconds
    else:
        assert requests is not None
        if requests < clients:
            raise ValueError("requests must be >= clients")
        cmd += ["-n", str(requests)]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    cmd.append(f"http://{target}/{method.lstrip('/')}")
    return cmd


def _us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_summary(text: str) -> dict:
    """The figures of h2load's summary; raises ValueError naming the first line missing."""
    found = {}
    for name, pattern in (("requests", _REQUESTS), ("finished", _FINISHED),
                          ("status", _STATUS), ("for_request", _FOR_REQUEST)):
        m = pattern.search(text)
        if m is None:
            raise ValueError(f"h2load output has no {name!r} line:\n{text[-2000:]}")
        found[name] = m.groups()
    total, _started, done, ok, failed, errored, timeout = map(int, found["requests"])
    fin = found["finished"]
    t = found["for_request"]
    return {"total": total, "done": done, "succeeded": ok, "failed": failed,
            "errored": errored, "timeout": timeout, "status_2xx": int(found["status"][0]),
            "elapsed_s": _us(fin[0], fin[1]) / 1e6, "requests_per_s": float(fin[2]),
            "min_us": _us(t[0], t[1]), "max_us": _us(t[2], t[3]),
            "mean_us": _us(t[4], t[5]), "sd_us": _us(t[6], t[7])}


def parse_log(path: Path, max_rows: int = MAX_LOG_ROWS) -> tuple[int, float | None,
                                                                 float | None]:
    """(rows, p50 ms, p99 ms) of the 2xx rows of an h2load ``--log-file`` (tab-separated:
    start time in us since the epoch, HTTP status or -1 for a failed stream, duration in
    us). Reads at most ``max_rows`` rows."""
    durations = []
    with open(path, encoding="ascii", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= max_rows:
                break
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                durations.append(int(cols[2]) / 1000.0)
    if not durations:
        return 0, None, None
    durations.sort()
    return len(durations), percentile(durations, 0.50), percentile(durations, 0.99)


def run(target: str, method: str, message: Message | bytes, *, ticket: str | None = None,
        duration_s: float | None = None, requests: int | None = None, clients: int = 4,
        streams: int = 16, latencies: bool = True, cpus: set[int] | None = None,
        h2load: str | None = None) -> Result:
    """Runs h2load once against ``target`` (loopback) and returns what it measured.

    ``cpus`` pins h2load to those CPUs right after it is spawned. Bounded in time:
    killed STOP_GRACE_S past its duration (or MAX_DURATION_S for a request count).
    """
    exe = h2load or find_h2load()
    if exe is None:
        raise FileNotFoundError("h2load not found: apt-get install nghttp2-client (make h2load)")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = write_body(Path(tmp) / "body.bin", message)
        log = Path(tmp) / "requests.tsv" if latencies else None
        cmd = command(target, method, body, ticket=ticket, duration_s=duration_s,
                      requests=requests, clients=clients, streams=streams, log_file=log,
                      h2load=exe)
        limit_s = (duration_s or MAX_DURATION_S) + STOP_GRACE_S
        out, cpu_s = _run_bounded(cmd, limit_s, cpus)
        fields = parse_summary(out)
        rows, p50, p99 = parse_log(log) if log is not None and log.exists() else (0, None, None)
    return Result(**fields, p50_ms=p50, p99_ms=p99, cpu_s=cpu_s, log_rows=rows)


def _run_bounded(cmd: list[str], limit_s: float, cpus: set[int] | None) -> tuple[str, float]:
    """Runs ``cmd`` to its end (killed past ``limit_s``); (stdout, its CPU seconds).

    The CPU time is the growth of this process's reaped children's usage across the
    wait, so it is h2load's own as long as no other child is reaped meanwhile.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if cpus:
            with contextlib.suppress(OSError):  # it may have exited already
                os.sched_setaffinity(proc.pid, cpus)
        out, _ = proc.communicate(timeout=limit_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited with {proc.returncode}:\n{text[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return text, cpu_s


def _request_of(method: str, json_text: str) -> Message:
    """The request message of ``package.Service/Method``, from JSON, via the generated code."""
    for module in _PB2_MODULES:  # importing a generated module registers its descriptors
        importlib.import_module(module)
    service, _, name = method.lstrip("/").partition("/")
    pool = descriptor_pool.Default()
    descriptor = pool.FindServiceByName(service).FindMethodByName(name).input_type
    return json_format.Parse(json_text, message_factory.GetMessageClass(descriptor)())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="HOST:PORT (loopback)")
    ap.add_argument("method", help="package.Service/Method, e.g. "
                    "hongbao.v1.WalletService/GetBalance")
    ap.add_argument("--json", default="{}", help="the request message as JSON")
    ap.add_argument("--ticket", help="sent as authorization: Bearer TICKET")
    ap.add_argument("-D", "--duration-s", type=float)
    ap.add_argument("-n", "--requests", type=int)
    ap.add_argument("-c", "--clients", type=int, default=4)
    ap.add_argument("-m", "--streams", type=int, default=16)
    args = ap.parse_args(argv)
    if args.duration_s is None and args.requests is None:
        args.duration_s = 3.0
    started = time.monotonic()
    r = run(args.target, args.method, _request_of(args.method, args.json), ticket=args.ticket,
            duration_s=args.duration_s, requests=args.requests, clients=args.clients,
            streams=args.streams)
    print(json.dumps(r.as_dict(), indent=2))
    print(f"# {time.monotonic() - started:.1f} s; h2load counts HTTP 200, not grpc-status: "
          f"check the server's own counters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
