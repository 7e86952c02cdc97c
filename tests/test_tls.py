"""TLS and mutual TLS on the gateway, the bank simulator and the link between them.

Certificates are made here with `cryptography`: a CA, a server certificate for
127.0.0.1, a client certificate from the same CA, and one from another CA.
Every process is real; every incomplete flag set must refuse to start with one line.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.security import tickets
from hongbao.v1 import wallet_pb2, wallet_pb2_grpc

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(root: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (root / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(root: Path, name: str, ca, *, server: bool) -> tuple[Path, Path]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(minutes=5))
               .not_valid_after(NOW + datetime.timedelta(days=1)))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    crt, key_path = root / f"{name}.crt", root / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return crt, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = _ca(root, "ca")
    other = _ca(root, "other-ca")
    return {
        "ca": root / "ca.crt",
        "server": _leaf(root, "server", ca, server=True),
        "client": _leaf(root, "client", ca, server=False),
        "stranger": _leaf(root, "stranger", other, server=False),
        "root": root,
    }


def _creds(pki, client: str | None) -> grpc.ChannelCredentials:
    ca = pki["ca"].read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    crt, key = pki[client]
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key.read_bytes(),
                                        certificate_chain=crt.read_bytes())


async def _health(target: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(target, creds) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            return err.code()


def test_gateway_and_bank_over_mutual_tls(tmp_path, pki):
    """Both servers require a client certificate of the CA; the gateway reaches the bank with
    its own; a client without one, or with another CA's, is refused; a top-up goes through."""
    srv_crt, srv_key = pki["server"]
    cli_crt, cli_key = pki["client"]
    tls = ("--tls-cert", str(srv_crt), "--tls-key", str(srv_key), "--tls-ca", str(pki["ca"]))
    bank = banksim_proc(tmp_path / "bank", *tls, log_path=tmp_path / "bank.log")
    gw = gateway_proc(tmp_path / "gw", *tls, "--bank-tls-ca", str(pki["ca"]),
                      "--bank-tls-cert", str(cli_crt), "--bank-tls-key", str(cli_key),
                      log_path=tmp_path / "gw.log")
    try:
        bank.start()
        gw.cmd += ["--bank", bank.target]
        gw.start()
        for target in (gw.target, bank.target):
            assert asyncio.run(_health(target, _creds(pki, "client"))) == grpc.StatusCode.OK
            assert asyncio.run(_health(target, _creds(pki, None))) == grpc.StatusCode.UNAVAILABLE
            assert asyncio.run(_health(target, _creds(pki, "stranger"))) == (
                grpc.StatusCode.UNAVAILABLE)

        ring = tickets.KeyRing.load_or_create(tmp_path / "gw")
        ticket = tickets.mint(ring, "tls-user", ["pay", "read"], 600)[0]
        meta = (("authorization", f"Bearer {ticket}"),)

        async def top_up() -> int:
            async with grpc.aio.secure_channel(gw.target, _creds(pki, "client")) as ch:
                wallet = wallet_pb2_grpc.WalletServiceStub(ch)
                r = await wallet.TopUp(wallet_pb2.TopUpRequest(
                    request_id="tls-1", card_id="icbc-7", amount_fen=500), metadata=meta,
                    timeout=10)
                assert r.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED
                return (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(),
                                                metadata=meta, timeout=5)).balance_fen
        assert asyncio.run(top_up()) == 500
        assert '"mtls": true' in (tmp_path / "gw.log").read_text()
        assert '"bank_tls": true' in (tmp_path / "gw.log").read_text()
        gw.stop()
        rec = subprocess.run(
            [sys.executable, "-m", "gateway.ops.cli", "reconcile", "--data-dir",
             str(tmp_path / "gw"), "--bank", bank.target, "--bank-tls-ca", str(pki["ca"]),
             "--bank-tls-cert", str(cli_crt), "--bank-tls-key", str(cli_key)],
            capture_output=True, text=True, timeout=60)
        assert rec.returncode == 0 and "BALANCED" in rec.stdout, rec.stdout + rec.stderr
    finally:
        gw.stop()
        bank.stop()


def _refused(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _serve(tmp_path: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "gateway.ops.cli", "serve", "--port", "0", "--data-dir",
            str(tmp_path / "gw"), *flags]


def _banksim(tmp_path: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "banksim", "--port", "0", "--data-dir",
            str(tmp_path / "bank"), *flags]


def test_incomplete_tls_flags_refuse_to_start_in_one_line(tmp_path, pki):
    """A CA alone (which used to serve plaintext), a cert without its key, a file that is
    missing or not PEM: `serve` and `banksim` both exit 2 with one line, no traceback."""
    crt, key = (str(p) for p in pki["server"])
    ca = str(pki["ca"])
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    for build in (_serve, _banksim):
        line = _refused(build(tmp_path, "--tls-ca", ca))
        assert "--tls-cert" in line and "--tls-key" in line
        assert "--tls-key" in _refused(build(tmp_path, "--tls-cert", crt))
        assert "--tls-cert" in _refused(build(tmp_path, "--tls-key", key, "--tls-ca", ca))
        assert "no such file" in _refused(build(tmp_path, "--tls-cert", crt, "--tls-key",
                                                str(tmp_path / "nope.key"))).lower()
        assert "PEM" in _refused(build(tmp_path, "--tls-cert", str(not_pem), "--tls-key", key))
    assert "--bank-tls-ca" in _refused(_serve(tmp_path, "--bank-tls-cert", crt,
                                              "--bank-tls-key", key))
    assert "--bank-tls-key" in _refused(_serve(tmp_path, "--bank-tls-ca", ca,
                                               "--bank-tls-cert", crt))
    assert not (tmp_path / "gw" / "data.mdb").exists()   # refused before opening anything
