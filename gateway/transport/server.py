"""The gRPC server process: wiring, lifecycle and graceful shutdown.

``hongbao serve`` runs one asyncio gRPC server per process. With
``--workers N`` a parent starts N such processes on one port (SO_REUSEPORT);
each opens LMDB itself, after the fork, and has its own group-commit writer
(LMDB serialises writers across processes) and its own grab gate (which only
caches facts that never change back, so gates of different workers never
disagree with LMDB). Worker 0 alone runs the bus consumers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import hotpath
from gateway.config import Settings
from gateway.ledger import LmdbLedger
from gateway.ops.procs import write_port_file
from gateway.payments.bank import BankClient
from gateway.payments.butler import ButlerOptions, PaymentButler
from gateway.payments.resolver import Resolver
from gateway.security import tickets
from gateway.transport.interceptors.auth import AuthInterceptor
from gateway.transport.interceptors.logging import LoggingInterceptor
from gateway.transport.servicers.admin import AdminServicer
from gateway.transport.servicers.auth import AuthServicer
from gateway.transport.servicers.envelope import EnvelopeServicer
from gateway.transport.servicers.notification import NotificationServicer
from gateway.transport.servicers.wallet import WalletServicer
from gateway.usecases import Gateway
from gateway.usecases.background import CreditConsumer, ExpirySweeper
from hongbao.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    envelope_pb2,
    envelope_pb2_grpc,
    notification_pb2,
    notification_pb2_grpc,
    wallet_pb2,
    wallet_pb2_grpc,
)

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    envelope_pb2.DESCRIPTOR.services_by_name["EnvelopeService"].full_name,
    wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
    notification_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclasses.dataclass(slots=True)
class ServeOptions:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    port_file: Path | None = None
    bank: str | None = None
    workers: int = 1
    worker_index: int = 0
    metrics_port: int | None = None
    key_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    reuse_port: bool = False


def _credentials(opts: ServeOptions) -> grpc.ServerCredentials | None:
    if not opts.tls_cert:
        return None
    if not opts.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    ca = opts.tls_ca.read_bytes() if opts.tls_ca else None
    return grpc.ssl_server_credentials(
        [(opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())],
        root_certificates=ca, require_client_auth=ca is not None)


async def _serve_metrics(port: int, gateway: Gateway, credit: CreditConsumer | None):
    """A plain-text metrics page (Prometheus exposition format) on loopback."""
    writer = gateway.ledger.writer

    async def handle(reader, stream):
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = "\n".join([
                f"hongbao_writer_queue_depth {writer.depth}",
                f"hongbao_writer_batches_total {writer.batches}",
                f"hongbao_writer_requests_total {writer.requests}",
                f"hongbao_writer_batch_size_max {writer.batch_size_max}",
                f"hongbao_writer_apply_seconds_total {writer.apply_s_total:.6f}",
                f"hongbao_writer_commit_seconds_total {writer.commit_s_total:.6f}",
                f"hongbao_gate_envelopes {len(gateway.gate)}",
                f"hongbao_credit_applied_total {credit.applied if credit else 0}",
                f"hongbao_credit_backlog {gateway.ledger.credit_backlog()}",
            ]) + "\n"
            stream.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + body.encode())
            await stream.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            stream.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def serve(settings: Settings, opts: ServeOptions) -> None:
    """Runs one worker until SIGTERM/SIGINT, then shuts down gracefully."""
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    # The writer thread shares the GIL with the event loop; the default 5 ms
    # switch interval would add up to 5 ms to every group commit's latency.
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    keyring = (tickets.KeyRing.from_file(opts.key_file) if opts.key_file
               else tickets.KeyRing.load_or_create(opts.data_dir))
    ledger = LmdbLedger(
        opts.data_dir, durable=settings.durability == "strict",
        map_size_bytes=settings.map_size_mb << 20, max_readers=settings.max_readers,
        max_batch=settings.writer_max_batch, max_wait_s=settings.writer_max_wait_ms / 1000,
        queue_limit=settings.writer_queue_limit)
    bank = BankClient(opts.bank, settings.bank_timeout_s) if opts.bank else None
    butler = None
    if bank is not None:
        butler = PaymentButler(bank, settings.capacities(),
                               ButlerOptions(call_timeout_s=settings.bank_timeout_s),
                               enabled=settings.butler_enabled)
    gateway = Gateway(ledger, settings, bank, butler=butler)
    credit = sweeper = resolver = None
    if opts.worker_index == 0:
        if bank is not None:
            resolver = Resolver(ledger, bank, delay_s=settings.resolve_delay_s,
                                max_backoff_s=settings.resolver_max_backoff_s)
        credit = CreditConsumer(ledger, batch=settings.credit_batch,
                                rate_per_s=settings.credit_rate_per_s)
        sweeper = ExpirySweeper(ledger, interval_s=settings.expiry_sweep_s)

    server = grpc.aio.server(
        interceptors=[LoggingInterceptor(access_log=settings.access_log,
                                         echo_request_id=settings.echo_request_id),
                      AuthInterceptor(keyring)],
        options=[("grpc.so_reuseport", 1 if opts.reuse_port else 0),
                 ("grpc.max_receive_message_length", 4 << 20)],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    envelope_pb2_grpc.add_EnvelopeServiceServicer_to_server(EnvelopeServicer(gateway), server)
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(WalletServicer(gateway), server)
    notification_pb2_grpc.add_NotificationServiceServicer_to_server(
        NotificationServicer(gateway), server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(keyring), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(gateway, credit, resolver), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{opts.host}:{opts.port}"
    creds = _credentials(opts)
    port = (server.add_secure_port(address, creds) if creds
            else server.add_insecure_port(address))
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(w.run()) for w in (credit, sweeper, resolver) if w is not None]
    metrics = None
    if opts.metrics_port is not None:
        # Workers share the gRPC port but not the metrics one: worker i serves
        # metrics on metrics_port + i (port 0 lets each pick its own).
        port_i = opts.metrics_port + opts.worker_index if opts.metrics_port else 0
        metrics = await _serve_metrics(port_i, gateway, credit)
    if opts.port_file:
        write_port_file(opts.port_file, port)
    log.info("serving", address=f"{opts.host}:{port}", worker=opts.worker_index,
             hotpath=hotpath.IMPLEMENTATION, durability=settings.durability,
             bank=opts.bank or "", tls=creds is not None, pid=os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting_down", grace_s=settings.grace_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_s)
    for w in (credit, sweeper, resolver):
        if w is not None:
            w.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    if metrics:
        metrics.close()
    if butler:
        await butler.close()
    if bank:
        await bank.close()
    ledger.close()
    log.info("stopped")


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
