"""Command line of the bank simulator: ``python -m banksim`` and ``hongbao banksim``.

``add_arguments`` and ``run`` are the public pair the gateway's console script
calls. Settings resolve, for each key, from the flag if given, else the
``--config`` JSON file, else the default. Fault settings resolve per channel of
each bank: built-in default <- file top level <- file ``banks.<id>`` <- file
``channels.<channel>`` <- flag <- ``--channel-capacity-tps``.

Config file (every key optional)::

    {"card_balance_fen": 1000000, "seed": 7, "latency_ms": 20, "capacity_tps": 500,
     "banks": {"icbc": {"capacity_tps": 2000}, "ccb": {"decline_rate": 0.01}},
     "channels": {"direct": {}, "clearing": {"capacity_tps": 800, "latency_ms": 40}}}

``banks`` may also be a list (or comma string) of bank ids, ``channels`` of
channel names (``direct``, ``clearing``; default both). A channel's settings may
also say ``"down": true``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from typing import Any

from banksim._errors import BankError
from banksim._faults import DEFAULT_COLLAPSE_AFTER_S, FAULT_KEYS, Faults
from banksim._model import INT64_MAX, Channel
from banksim.cards import BANK_ID

DEFAULT_BANKS = ("icbc", "ccb", "abc", "boc")
CHANNELS = {c.label: c for c in Channel}
DEFAULT_CHANNELS = tuple(CHANNELS)
_GENERAL_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1", "port": 0, "port_file": None, "card_balance_fen": 1_000_000,
    "seed": None, "map_size_mib": 256, "grace_s": 2.0, "log_level": "info",
    "tls_cert": None, "tls_key": None, "tls_ca": None,
}
_FAULT_HELP = {
    "capacity_tps": "requests per second each channel of each bank admits (0: unlimited)",
    "latency_ms": "mean added latency; each call sleeps uniform [0.5, 1.5] x this",
    "decline_rate": "share of new debits/credits declined (reason DECLINED)",
    "timeout_rate": "share of calls held unanswered until the caller's deadline",
    "lost_response_rate": "share of new debits/credits applied, then failed UNAVAILABLE",
    "late_debit_rate": "share of new debits failed DEADLINE_EXCEEDED now, applied later",
    "collapse_after_s": "seconds over capacity before a bank collapses "
                        f"(default {DEFAULT_COLLAPSE_AFTER_S:g} when capacity is set; 0: never)",
    "collapse_for_s": "seconds a collapsed bank answers nothing (default 10)",
    "late_debit_delay_ms": "mean delay before a late debit applies (default 1000)",
}


class ConfigError(Exception):
    """A flag or config file value the simulator cannot run with."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the simulator's flags to ``parser`` (every optional one defaults to None)."""
    parser.add_argument("--data-dir", required=True, help="the bank's own LMDB directory")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--port-file", help="write the bound port here (atomically)")
    parser.add_argument("--card-balance-fen", type=int,
                        help="balance a card opens with on first use (default 1000000)")
    parser.add_argument("--banks",
                        help=f"comma-separated bank ids (default {','.join(DEFAULT_BANKS)})")
    parser.add_argument("--config", help="JSON file: the same keys as the flags, plus per-bank "
                        "fault settings under banks.<id>; flags override it")
    parser.add_argument("--seed", type=int, help="seed of the fault dice (default: random, logged)")
    parser.add_argument("--map-size-mib", type=int, help="initial LMDB map size (default 256); "
                        "it doubles when full")
    parser.add_argument("--grace-s", type=float, help="graceful shutdown period (default 2)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--tls-cert", help="serve over TLS with this PEM certificate")
    parser.add_argument("--tls-key", help="and this PEM private key")
    parser.add_argument("--tls-ca", help="require client certificates signed by this PEM CA "
                        "(mutual TLS; needs --tls-cert and --tls-key)")
    parser.add_argument("--channels", help="comma-separated channels every bank is reached "
                        f"through (default {','.join(DEFAULT_CHANNELS)})")
    parser.add_argument("--channel-capacity-tps", help="per-channel capacity overriding "
                        "--capacity-tps, e.g. clearing=500 or direct=1000,clearing=500")
    for key in FAULT_KEYS:
        parser.add_argument("--" + key.replace("_", "-"), type=float, help=_FAULT_HELP[key])


def run(args: argparse.Namespace) -> int:
    """Runs the simulator until SIGTERM/SIGINT; returns the process exit code."""
    # Imported here so `--help` and flag errors stay free of gRPC start-up.
    from banksim._logging import configure
    from banksim._server import serve

    try:
        settings, log_level = settings_from(args)
    except ConfigError as err:
        sys.stderr.write(f"banksim: {err}\n")
        return 2
    configure(log_level)
    return asyncio.run(serve(settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="banksim", description="Bank simulator for the hongbao gateway (gRPC, LMDB)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def settings_from(args: argparse.Namespace) -> tuple[Any, str]:
    """The server settings and log level from parsed flags and the config file they name."""
    from banksim._server import Settings

    file = _load(args.config) if getattr(args, "config", None) else {}
    file_banks = file.pop("banks", None)
    file_channels = file.pop("channels", None)
    file_faults = {k: file.pop(k) for k in FAULT_KEYS if k in file}
    unknown = set(file) - set(_GENERAL_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")

    def pick(key: str) -> Any:
        value = getattr(args, key, None)
        return value if value is not None else file.get(key, _GENERAL_DEFAULTS[key])

    card_balance_fen = pick("card_balance_fen")
    if type(card_balance_fen) is not int or not 0 <= card_balance_fen <= INT64_MAX:
        raise ConfigError("card_balance_fen must be an integer in 0..2^63-1 (fen)")
    map_size_mib = pick("map_size_mib")
    if type(map_size_mib) is not int or not 1 <= map_size_mib <= 65536:
        raise ConfigError("map_size_mib must be an integer in 1..65536")
    seed = pick("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    flag_faults = {k: getattr(args, k) for k in FAULT_KEYS if getattr(args, k, None) is not None}
    channels = _channels(getattr(args, "channels", None), file_channels)
    channel_caps = _channel_caps(getattr(args, "channel_capacity_tps", None), channels)
    banks = _banks(args.banks, file_banks, file_faults, flag_faults, channels, channel_caps)
    settings = Settings(
        data_dir=args.data_dir, host=pick("host"), port=_int(pick("port"), "port", 0, 65535),
        port_file=pick("port_file"), card_balance_fen=card_balance_fen, banks=banks,
        seed=_int(seed, "seed", 0, 2**64), map_size=map_size_mib << 20,
        grace_s=float(pick("grace_s")),
        tls=_tls(pick("tls_cert"), pick("tls_key"), pick("tls_ca")),
    )
    return settings, str(pick("log_level"))


def _pem(path: str, flag: str, marker: bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(f"{flag} {path}: not a PEM {marker.decode().lower()}")
    return data


def _tls(cert: str | None, key: str | None, ca: str | None
         ) -> tuple[bytes, bytes, bytes | None] | None:
    """(cert, key, ca) PEM bytes, None for plaintext; an incomplete set is an error:
    a CA alone must not start a plaintext server that checks no client."""
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        missing = " and ".join(f"--tls-{n}" for n, v in (("cert", cert), ("key", key))
                               if v is None)
        raise ConfigError(f"TLS needs both --tls-cert and --tls-key; {missing} is missing")
    return (_pem(cert, "--tls-cert", b"CERTIFICATE"), _pem(key, "--tls-key", b"PRIVATE KEY"),
            _pem(ca, "--tls-ca", b"CERTIFICATE") if ca is not None else None)


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be an object")
    return data


def _int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}")
    return value


def _names(value: Any, what: str) -> tuple[list[str], dict[str, Any]]:
    """Ids from an object (keys, with their values), a list or a comma-separated string."""
    if isinstance(value, dict):
        return list(value), value
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value], {}
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")], {}
    raise ConfigError(f"{what} must be an object, a list or a comma-separated string")


def _channels(flag: str | None, file_channels: Any) -> dict[Channel, dict[str, Any]]:
    """The served channels and each one's own settings from the file."""
    names, own = _names(DEFAULT_CHANNELS if file_channels is None else file_channels,
                        "channels")
    if flag is not None:
        names = [n.strip() for n in flag.split(",")]
    if not names or len(set(names)) != len(names) or not set(names) <= set(CHANNELS):
        raise ConfigError(f"channels must be distinct names of {', '.join(CHANNELS)}")
    for name in names:
        settings = own.get(name) or {}
        if not isinstance(settings, dict) or set(settings) - {*FAULT_KEYS, "down"}:
            raise ConfigError(f"channels.{name}: an object of {', '.join(FAULT_KEYS)}, down")
        if type(settings.get("down", False)) is not bool:
            raise ConfigError(f"channels.{name}.down must be true or false")
    return {CHANNELS[name]: dict(own.get(name) or {}) for name in names}


def _channel_caps(flag: str | None, channels: dict[Channel, Any]) -> dict[Channel, float]:
    """``--channel-capacity-tps name=tps[,name=tps]``, each a served channel."""
    caps: dict[Channel, float] = {}
    for item in (flag.split(",") if flag else []):
        name, _, tps = item.partition("=")
        channel = CHANNELS.get(name.strip())
        if channel not in channels or channel in caps:
            raise ConfigError(f"--channel-capacity-tps {item!r}: name a served channel once")
        try:
            caps[channel] = float(tps)
        except ValueError:
            raise ConfigError(f"--channel-capacity-tps {item!r}: not a number") from None
    return caps


def _banks(
    flag: str | None, file_banks: Any, file_faults: dict[str, Any], flag_faults: dict[str, Any],
    channels: dict[Channel, dict[str, Any]], channel_caps: dict[Channel, float],
) -> dict[str, dict[Channel, Faults]]:
    ids, per_bank = _names(list(DEFAULT_BANKS) if file_banks is None else file_banks, "banks")
    if flag is not None:
        ids = flag.split(",")
    ids = [str(i).strip() for i in ids]
    if not ids or len(set(ids)) != len(ids) or not all(BANK_ID.fullmatch(i) for i in ids):
        raise ConfigError("bank ids must be distinct and match [a-z][a-z0-9_]{0,15}")
    banks: dict[str, dict[Channel, Faults]] = {}
    for bank_id in ids:
        own = per_bank.get(bank_id) or {}
        if not isinstance(own, dict) or set(own) - set(FAULT_KEYS):
            raise ConfigError(f"banks.{bank_id}: an object of {', '.join(FAULT_KEYS)}")
        banks[bank_id] = {
            channel: _faults(f"{bank_id} ({channel.label})", file_faults, own, ch_own,
                             flag_faults, {"capacity_tps": channel_caps[channel]}
                             if channel in channel_caps else {})
            for channel, ch_own in channels.items()
        }
    return banks


def _faults(name: str, *layers: dict[str, Any]) -> Faults:
    """One channel's settings: ``layers`` merged, later ones winning."""
    merged = {k: v for layer in layers for k, v in layer.items()}
    down = merged.pop("down", False)
    for key, value in merged.items():
        if type(value) not in (int, float):
            raise ConfigError(f"{key} for bank {name} must be a number")
    if merged.get("capacity_tps", 0) > 0 and "collapse_after_s" not in merged:
        merged["collapse_after_s"] = DEFAULT_COLLAPSE_AFTER_S
    try:
        return Faults(**{k: float(v) for k, v in merged.items()}, down=down).checked()
    except BankError as err:
        raise ConfigError(f"bank {name}: {err.message}") from err
