"""The bank simulator process: LMDB ledger, gRPC server, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import tempfile
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from banksim._bank import BankSim
from banksim._faults import Faults
from banksim._ledger import Ledger
from banksim._model import Channel
from banksim._service import BankAdminService, BankService
from banksim.v1 import bank_pb2, bank_pb2_grpc

log = structlog.get_logger("banksim.server")

# Held calls (timeouts, a collapsed bank) occupy slots too; past this, gRPC refuses.
MAX_CONCURRENT_RPCS = 20_000


@dataclass(frozen=True)
class Settings:
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    port_file: str | None = None
    card_balance_fen: int = 1_000_000
    # Each bank's channels and their faults.
    banks: dict[str, dict[Channel, Faults]] = field(default_factory=dict)
    seed: int = 0
    map_size: int = 256 << 20
    grace_s: float = 2.0
    # (certificate, private key, client CA or None) as PEM; None serves plaintext.
    tls: tuple[bytes, bytes, bytes | None] | None = None


def write_port_file(path: str | os.PathLike[str], port: int) -> None:
    """Writes the bound port atomically: a reader sees no file or the whole number."""
    # The temp file sits in the same directory, so os.replace is a rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT, then stops gracefully; returns the exit code."""
    ledger = Ledger(settings.data_dir, opening_fen=settings.card_balance_fen,
                    map_size=settings.map_size)
    try:
        sim = BankSim(ledger, settings.banks, random.Random(settings.seed))
        return await _serve(settings, sim)
    finally:
        ledger.close()


async def _serve(settings: Settings, sim: BankSim) -> int:
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
    )
    bank_pb2_grpc.add_BankServiceServicer_to_server(BankService(sim), server)
    bank_pb2_grpc.add_BankAdminServiceServicer_to_server(BankAdminService(sim), server)
    # grpc-stubs 1.53 types grpc_health.v1.health without its aio submodule; grpcio has it.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [
        bank_pb2.DESCRIPTOR.services_by_name["BankService"].full_name,
        bank_pb2.DESCRIPTOR.services_by_name["BankAdminService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(services, server)
    address = _address(settings.host, settings.port)
    if settings.tls is None:
        port = server.add_insecure_port(address)
    else:
        cert, key, ca = settings.tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None))
    await server.start()
    for name in services:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.port_file:
        write_port_file(settings.port_file, port)
    log.info("banksim_serving", host=settings.host, port=port, data_dir=settings.data_dir,
             tls=settings.tls is not None,
             mtls=settings.tls is not None and settings.tls[2] is not None,
             banks=sorted(settings.banks), seed=settings.seed,
             channels=sorted({c.label for chs in settings.banks.values() for c in chs}),
             card_balance_fen=settings.card_balance_fen)
    try:
        await stop.wait()
    finally:
        log.info("banksim_stopping", grace_s=settings.grace_s)
        await health_servicer.enter_graceful_shutdown()
        sim.begin_shutdown()
        await server.stop(settings.grace_s)
        await sim.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("banksim_stopped")
    return 0
