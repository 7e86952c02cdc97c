"""The ``hongbao`` console script."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

_SCOPES_HELP = "comma-separated: pay,grab,read,batch,admin"


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None,
                   help="0 picks a free port (default 50051, or the cluster file's address)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--bank", metavar="HOST:PORT", help="the bank simulator")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus metrics on 127.0.0.1 (worker i: port + i)")
    p.add_argument("--resolve-delay-s", type=float, default=None,
                   help="wait before asking the bank about an unknown result")
    p.add_argument("--durability", choices=("strict", "relaxed"), default=None,
                   help="strict (default) fsyncs every group commit; relaxed does not")
    p.add_argument("--key-file", type=Path, help="ticket keys (default: in --data-dir)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="require client certificates from this CA "
                   "(mutual TLS; needs --tls-cert and --tls-key)")
    _bank_tls_arguments(p)
    p.add_argument("--config", type=Path, help="TOML settings (see gateway/config.py)")
    p.add_argument("--cluster", type=Path, metavar="FILE",
                   help="run as one SET of a cluster (TOML: set, address, nats)")
    p.add_argument("--log-level", default="info")


def _bank_tls_arguments(p) -> None:
    p.add_argument("--bank-tls-ca", type=Path,
                   help="reach the bank over TLS, its certificate checked against this CA")
    p.add_argument("--bank-tls-cert", type=Path, help="client certificate for the bank link")
    p.add_argument("--bank-tls-key", type=Path, help="its private key")


def _fail(command: str, message: object) -> int:
    """One line on stderr and exit status 2: how every start-up mistake is reported."""
    print(f"hongbao {command}: {message}", file=sys.stderr)
    return 2


def _cmd_serve(args) -> int:
    from gateway.config import Settings
    from gateway.ledger import LedgerCorrupt, check_ledger
    from gateway.security import tickets
    from gateway.security.tls import TlsConfigError
    from gateway.transport.interceptors.logging import configure_logging
    from gateway.transport.server import ServeOptions, serve
    from gateway.transport.supervisor import supervise

    try:
        configure_logging(args.log_level)
        settings = Settings.load(args.config, durability=args.durability,
                                 resolve_delay_s=args.resolve_delay_s)
    except (ValueError, OSError) as err:  # a bad level, an unknown or mistyped setting
        return _fail("serve", err)
    if args.workers < 1:
        return _fail("serve", "--workers must be >= 1")
    try:
        port = _serve_port(args)
    except ValueError as err:   # a bad cluster file: one line naming the key
        return _fail("serve", err)
    opts = ServeOptions(
        data_dir=args.data_dir, host=args.host, port=port, port_file=args.port_file,
        bank=args.bank, workers=args.workers, worker_index=args.worker_index,
        metrics_port=args.metrics_port, key_file=args.key_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_ca=args.tls_ca, bank_tls_ca=args.bank_tls_ca,
        bank_tls_cert=args.bank_tls_cert, bank_tls_key=args.bank_tls_key,
        reuse_port=args.reuse_port, cluster_file=args.cluster)
    try:
        opts.check()
        if args.key_file is not None:
            tickets.KeyRing.from_file(args.key_file)  # readable, private, well formed
        if not args.reuse_port:  # the supervisor checks once; its workers need not race it
            check_ledger(args.data_dir)  # never serve a damaged or truncated ledger
    except (TlsConfigError, tickets.KeyFileError, LedgerCorrupt) as err:
        return _fail("serve", err)
    if args.workers > 1:
        argv = sys.argv[1:]
        keep = []
        skip = False
        for a in argv:
            if skip:
                skip = False
                continue
            if a in ("--workers", "--port", "--port-file"):
                skip = True
                continue
            if a.startswith(("--workers=", "--port=", "--port-file=")):
                continue
            keep.append(a)
        return supervise(keep, opts)
    from gateway.cluster.config import ClusterStartError

    try:
        run_loop(serve(settings, opts), settings.event_loop)
    except ClusterStartError as err:   # no slot map, not in it, NATS unreachable
        return _fail("serve", err)
    return 0


def _serve_port(args) -> int:
    """``--port``; else, in cluster mode, the port of this SET's address in its cluster
    file (other SETs and clients reach it there); else 50051."""
    if args.cluster is None:
        return 50051 if args.port is None else args.port
    from gateway.cluster.config import ClusterConfig

    config = ClusterConfig.load(args.cluster)
    return int(config.address.rsplit(":", 1)[1]) if args.port is None else args.port


def run_loop(main, event_loop: str) -> None:
    """Runs ``main`` on uvloop (the default: measured 15-27 % more GetBalance calls/s on one
    pinned worker than the standard loop, bench/RESULTS.md) or on asyncio's own loop."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _ticket_parser(sub) -> None:
    p = sub.add_parser("ticket", help="tickets")
    tsub = p.add_subparsers(dest="ticket_cmd", required=True)
    issue = tsub.add_parser("issue", help="print a ticket")
    where = issue.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path)
    where.add_argument("--key-file", type=Path)
    issue.add_argument("--user", required=True)
    issue.add_argument("--scope", default="pay,grab,read", help=_SCOPES_HELP)
    issue.add_argument("--ttl", type=int, default=3600, help="seconds (1..86400)")


def _cmd_ticket(args) -> int:
    from gateway import errors
    from gateway.security import tickets

    scopes = [s for s in args.scope.split(",") if s]
    try:
        ring = (tickets.KeyRing.from_file(args.key_file) if args.key_file
                else tickets.KeyRing.load_or_create(args.data_dir))
        ticket, _expires_at = tickets.mint(ring, args.user, scopes, args.ttl)
    except (errors.GatewayError, tickets.KeyFileError) as err:
        print(f"hongbao ticket issue: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    print(ticket)
    return 0


def _reconcile_parser(sub) -> None:
    p = sub.add_parser("reconcile", help="prove the books balance")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="one gateway's ledger (read-only)")
    where.add_argument("--cluster", type=Path, metavar="FILE",
                       help="every SET of the cluster in a SET's cluster file, and the "
                       "credit stream (the SETs are asked over gRPC)")
    p.add_argument("--key-file", type=Path,
                   help="with --cluster: mint the admin ticket from the SETs' ticket keys")
    p.add_argument("--ticket", help="with --cluster: an admin ticket")
    p.add_argument("--bank", metavar="HOST:PORT", help="cross-check with the bank simulator")
    _bank_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable report")


def _cmd_reconcile(args) -> int:
    from gateway.ledger import LedgerCorrupt
    from gateway.ops.reconcile import ClusterReconcileError, reconcile_cluster, reconcile_dir
    from gateway.security import tickets
    from gateway.security.tls import TlsConfigError, channel_credentials

    if args.cluster is None and (args.key_file or args.ticket):
        return _fail("reconcile", "--key-file and --ticket go with --cluster")
    if args.cluster is not None and bool(args.key_file) == bool(args.ticket):
        return _fail("reconcile", "--cluster needs an admin ticket: --key-file FILE (the "
                     "SETs' ticket keys) or --ticket TICKET, one of them")
    try:
        creds = channel_credentials(args.bank_tls_ca, args.bank_tls_cert, args.bank_tls_key)
        ticket = args.ticket or (args.key_file and tickets.mint(
            tickets.KeyRing.from_file(args.key_file), "hongbao-reconcile", ["admin"], 3600)[0])
        report = (reconcile_dir(args.data_dir, args.bank, creds) if args.cluster is None
                  else reconcile_cluster(args.cluster, ticket, args.bank, creds))
    except (FileNotFoundError, TlsConfigError, LedgerCorrupt, tickets.KeyFileError,
            ClusterReconcileError) as err:
        return _fail("reconcile", err)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.balanced else 1


def _qos_parser(sub) -> None:
    p = sub.add_parser("qos", help="a worker's live QoS state (admission, tiers, bus, banks)")
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--ticket", help="an admin ticket")
    who.add_argument("--data-dir", type=Path, help="mint an admin ticket from these keys")
    who.add_argument("--key-file", type=Path)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--once", action="store_true", help="print one table and exit")


def _cmd_qos(args) -> int:
    from gateway.ops.qos import admin_ticket, watch
    from gateway.security import tickets

    if not 0.1 <= args.interval <= 60:
        print("hongbao qos: --interval must be in 0.1..60 seconds", file=sys.stderr)
        return 2
    try:
        ticket = admin_ticket(args.ticket, args.data_dir, args.key_file)
    except tickets.KeyFileError as err:
        print(f"hongbao qos: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(watch(args.target, ticket, interval_s=args.interval, once=args.once))
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hongbao", description="red-envelope payment gateway")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _serve_parser(sub)
    bank = sub.add_parser("banksim", help="run the bank simulator")
    from banksim import cli as banksim_cli

    banksim_cli.add_arguments(bank)
    _ticket_parser(sub)
    sub.add_parser("demo", help="the Spring-Festival story, end to end, with a report "
                   "(see gateway/ops/demo.py)", add_help=False)
    _reconcile_parser(sub)
    _qos_parser(sub)
    sub.add_parser("chaos", help="a seeded fault campaign (see gateway/ops/chaos.py)",
                   add_help=False)
    sub.add_parser("sim", help="seeded simulations of the money flows (see gateway/ops/sim.py)",
                   add_help=False)
    sub.add_parser("cluster", help="the slot map of a SET cluster: init, show, move",
                   add_help=False)
    bench = sub.add_parser("bench", help="run the benchmarks in bench/")
    bench.add_argument("names", nargs="*",
                       help="hotpath, tickets, ledger, butler, balance_first (default: all)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:   # its own flags, parsed by gateway.ops.chaos
        from gateway.ops.chaos import main as chaos_main

        return chaos_main(argv[1:])
    if argv[:1] == ["cluster"]:   # its own subcommands, parsed by gateway.ops.cluster_cli
        from gateway.ops.cluster_cli import main as cluster_main

        return cluster_main(argv[1:])
    if argv[:1] == ["demo"]:   # its own flags, parsed by gateway.ops.demo
        from gateway.ops.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["sim"]:   # its own flags, parsed by gateway.ops.sim
        from gateway.ops.sim import main as sim_main

        return sim_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return _cmd_serve(args)
    if args.cmd == "banksim":
        return banksim_cli.run(args)
    if args.cmd == "ticket":
        return _cmd_ticket(args)
    if args.cmd == "reconcile":
        return _cmd_reconcile(args)
    if args.cmd == "qos":
        return _cmd_qos(args)
    if args.cmd == "bench":
        from gateway.ops.benchrun import main as bench_main

        return bench_main(args.names)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
