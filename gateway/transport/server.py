"""One worker process: the gRPC server's lifecycle and graceful shutdown.

``hongbao serve`` runs one asyncio gRPC server per process; ``--workers N``
starts N of them on one port (``gateway.transport.supervisor``). Each worker
opens LMDB itself, after the fork, and has its own group-commit writer (LMDB
serialises writers across processes) and its own grab gate (which only caches
facts that never change back, so gates of different workers never disagree
with LMDB). Worker 0 alone runs the background workers. The parts are built
by the app factory (``gateway.transport.app``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import hotpath
from gateway.config import Settings
from gateway.security import tickets, tls
from gateway.transport import reflection
from gateway.transport.app import App, build_app, open_ledger
from gateway.transport.interceptors.logging import flush_access_log
from gateway.transport.metrics import serve_metrics
from gateway.transport.portfile import write_port_file
from gateway.transport.role import BackgroundRole
from gateway.transport.servicers._boundary import register
from gateway.transport.servicers.admin import AdminServicer
from gateway.transport.servicers.auth import AuthServicer
from gateway.transport.servicers.cluster import ClusterServicer
from gateway.transport.servicers.envelope import EnvelopeServicer
from gateway.transport.servicers.moments import MomentsServicer
from gateway.transport.servicers.notification import NotificationServicer
from gateway.transport.servicers.wallet import WalletServicer
from hongbao.v1 import (
    admin_pb2,
    auth_pb2,
    cluster_pb2,
    envelope_pb2,
    moments_pb2,
    notification_pb2,
    wallet_pb2,
)

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    envelope_pb2.DESCRIPTOR.services_by_name["EnvelopeService"].full_name,
    wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
    notification_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name,
    moments_pb2.DESCRIPTOR.services_by_name["MomentsService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name


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
    bank_tls_ca: Path | None = None
    bank_tls_cert: Path | None = None
    bank_tls_key: Path | None = None
    reuse_port: bool = False
    cluster_file: Path | None = None

    def check(self) -> None:
        """Raises TlsConfigError (one line) for an incomplete or unreadable TLS flag set."""
        tls.server_credentials(self.tls_cert, self.tls_key, self.tls_ca)
        self.bank_credentials()

    def bank_credentials(self) -> grpc.ChannelCredentials | None:
        return tls.channel_credentials(self.bank_tls_ca, self.bank_tls_cert, self.bank_tls_key)


def _grpc_server(app: App, opts: ServeOptions) -> tuple[grpc.aio.Server, int, bool]:
    """The server with every service, health and reflection, bound; (server, port, tls)."""
    server = grpc.aio.server(
        interceptors=app.interceptors,
        options=[("grpc.so_reuseport", 1 if opts.reuse_port else 0),
                 ("grpc.max_receive_message_length", 4 << 20)],
        maximum_concurrent_rpcs=app.settings.max_concurrent_rpcs)
    gw = app.gateway
    # Registered with deserializers that never raise: an undecodable body is answered
    # INVALID_ARGUMENT BAD_MESSAGE (servicers/_boundary.py), not UNKNOWN or a hang.
    for pb2, name, servicer in (
            (envelope_pb2, "EnvelopeService", EnvelopeServicer(gw)),
            (wallet_pb2, "WalletService", WalletServicer(gw)),
            (notification_pb2, "NotificationService", NotificationServicer(gw)),
            (moments_pb2, "MomentsService", MomentsServicer(gw)),
            (auth_pb2, "AuthService", AuthServicer(app.keyring)),
            (admin_pb2, "AdminService", AdminServicer(gw.operations))):
        register(server, pb2.DESCRIPTOR.services_by_name[name], servicer)
    names: tuple[str, ...] = SERVICE_NAMES
    if app.cluster is not None:
        register(server, cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"],
                 ClusterServicer(app.cluster.name, lambda: app.cluster.map))
        names = (*SERVICE_NAMES, CLUSTER_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_reflection(
        (*names, health.SERVICE_NAME, *reflection.SERVICE_NAMES), server)
    address = f"{opts.host}:{opts.port}"
    creds = tls.server_credentials(opts.tls_cert, opts.tls_key, opts.tls_ca)
    port = (server.add_secure_port(address, creds) if creds
            else server.add_insecure_port(address))
    return server, port, creds is not None


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _join_cluster(path: Path):
    """The started ``ClusterNode`` of this SET (NATS imported only in cluster mode)."""
    from gateway.cluster.config import ClusterConfig
    from gateway.cluster.node import ClusterNode

    node = ClusterNode(ClusterConfig.load(path))
    await node.start()
    return node


async def serve(settings: Settings, opts: ServeOptions) -> None:
    """Runs one worker until SIGTERM/SIGINT, then shuts down gracefully."""
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    # The writer thread shares the GIL with the event loop; the default 5 ms
    # switch interval would add up to 5 ms to every group commit's latency.
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    keyring = (tickets.KeyRing.from_file(opts.key_file) if opts.key_file
               else tickets.KeyRing.load_or_create(opts.data_dir))
    node = await _join_cluster(opts.cluster_file) if opts.cluster_file else None
    app = build_app(settings, keyring, open_ledger(settings, opts.data_dir),
                    bank_target=opts.bank, bank_credentials=opts.bank_credentials(),
                    role=BackgroundRole(opts.data_dir / "run" / "background.lock"),
                    cluster=node)
    server, port, secure = _grpc_server(app, opts)
    await server.start()
    for name in ("", *SERVICE_NAMES, *((CLUSTER_SERVICE,) if node else ())):
        await app.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    app.start_background()
    metrics = None
    if opts.metrics_port is not None:
        # Workers share the gRPC port but not the metrics one: worker i serves
        # metrics on metrics_port + i (port 0 lets each pick its own).
        port_i = opts.metrics_port + opts.worker_index if opts.metrics_port else 0
        metrics = await serve_metrics(port_i, app)
    if opts.port_file:
        write_port_file(opts.port_file, port)
    log.info("serving", address=f"{opts.host}:{port}", worker=opts.worker_index,
             hotpath=hotpath.IMPLEMENTATION, durability=settings.durability,
             bank=opts.bank or "", tls=secure, mtls=secure and opts.tls_ca is not None,
             bank_tls=opts.bank_tls_ca is not None, pid=os.getpid(),
             set=node.name if node else "", map_version=node.version if node else 0,
             event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
    await _wait_for_signal()

    log.info("shutting_down", grace_s=settings.grace_s)
    await app.health.enter_graceful_shutdown()
    await server.stop(settings.grace_s)
    if metrics:
        metrics.close()
    await app.close()
    flush_access_log()
    log.info("stopped")
