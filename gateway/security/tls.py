"""TLS and mutual TLS from command-line flags, with every incomplete set refused.

The gateway takes ``--tls-cert/--tls-key`` (serve over TLS) and ``--tls-ca`` (also
require client certificates signed by that CA: mutual TLS); its link to the bank takes
``--bank-tls-ca`` (verify the bank's certificate against it) and
``--bank-tls-cert/--bank-tls-key`` (present a client certificate to the bank).

A set of flags that does not say one complete thing is an error, not a fallback: a CA
without a certificate and key would otherwise start a plaintext server that checks no
client at all. Files are read and checked to be PEM of the right kind up front, so a
mistake is one line at start (:class:`TlsConfigError`), not a handshake failure later.
A client certificate for the bank link needs ``--bank-tls-ca``: the bank's certificate
is verified against a CA the operator names, never against whatever roots the
machine trusts.
"""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["TlsConfigError", "channel_credentials", "server_credentials"]


class TlsConfigError(ValueError):
    """A TLS flag set that is incomplete or contradictory, or a file that is not PEM."""


def _read(path: Path, flag: str, kinds: tuple[bytes, ...]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if not any(b"-----BEGIN " + kind in data for kind in kinds):
        want = " or ".join(k.decode().rstrip("-").strip() for k in kinds)
        raise TlsConfigError(f"{flag} {path}: not PEM ({want} expected)")
    return data


_CERT = (b"CERTIFICATE-----",)
_KEY = (b"PRIVATE KEY-----", b"RSA PRIVATE KEY-----", b"EC PRIVATE KEY-----")


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None,
                       flag: str = "--tls") -> grpc.ServerCredentials | None:
    """None when no flag is given; TLS with cert and key; mutual TLS when ``ca`` is too."""
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        given = " and ".join(f"{flag}-{n}" for n, v in (("cert", cert), ("key", key),
                                                         ("ca", ca)) if v is not None)
        missing = " and ".join(f"{flag}-{n}" for n, v in (("cert", cert), ("key", key))
                               if v is None)
        why = (": a CA alone would serve plaintext and check no client" if ca is not None
               else "")
        raise TlsConfigError(f"{given} needs {missing}{why}")
    cert_pem = _read(cert, f"{flag}-cert", _CERT)
    key_pem = _read(key, f"{flag}-key", _KEY)
    ca_pem = _read(ca, f"{flag}-ca", _CERT) if ca is not None else None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def channel_credentials(ca: Path | None, cert: Path | None, key: Path | None,
                        flag: str = "--bank-tls") -> grpc.ChannelCredentials | None:
    """None when no flag is given; TLS verified against ``ca``; plus a client certificate."""
    if ca is None and cert is None and key is None:
        return None
    if ca is None:
        raise TlsConfigError(f"{flag}-cert and {flag}-key need {flag}-ca: the bank's "
                             "certificate must be checked against a CA you name")
    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        raise TlsConfigError(f"{flag}-{given} needs {flag}-{missing}")
    ca_pem = _read(ca, f"{flag}-ca", _CERT)
    cert_pem = _read(cert, f"{flag}-cert", _CERT) if cert is not None else None
    key_pem = _read(key, f"{flag}-key", _KEY) if key is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)
