"""``hongbao cluster init|show|move``: the slot map in the cluster's JetStream.

    hongbao cluster init --nats nats://127.0.0.1:4222 --set s1=127.0.0.1:7101 \\
                         --set s2=127.0.0.1:7102 --set s3=127.0.0.1:7103
    hongbao cluster init --nats nats://127.0.0.1:4222 \\
                         --set s1=10.0.1.5:7101,10.0.2.5:7101 --set s2=...   # IDC A, then B
    hongbao cluster show --cluster s1.toml [--history]
    hongbao cluster move --cluster s1.toml --slots 0-99,500 --to s2

The NATS servers come from ``--nats`` (comma-separated) or from a SET's cluster file
(``--cluster FILE``). ``init`` spreads the 1,024 slots evenly over the SETs in the order
given and refuses when a map exists (a SET given several addresses runs as that many
gateway groups over the same data, IDC A first: callers prefer it while it is up);
``move`` stores the next version by compare-and-set.
A mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.cluster import mapstore
from gateway.cluster.config import ClusterConfig, ClusterFileError
from gateway.cluster.slotmap import MapError, SlotMap, parse_slots

CONNECT_TIMEOUT_S = 5.0


class _Refused(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hongbao cluster", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("init", "store the first slot map"), ("show", "print the slot map"),
                       ("move", "hand slots to another SET")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--nats", help="NATS server URLs, comma-separated")
        p.add_argument("--cluster", help="a SET's cluster file (for its NATS servers)")
        if name == "init":
            p.add_argument("--set", action="append", default=[],
                           metavar="NAME=HOST:PORT[,HOST:PORT]",
                           help="a SET and its address, or its gateway groups' addresses "
                                "(IDC A first); repeat, in slot order")
            p.add_argument("--replicas", type=int, default=0,
                           help="bucket replicas (default: 3, or 1 with fewer servers)")
        if name == "show":
            p.add_argument("--history", action="store_true", help="every stored version")
        if name == "move":
            p.add_argument("--slots", required=True, help="e.g. 0-99,500")
            p.add_argument("--to", required=True, help="the SET that takes them")
            p.add_argument("--key-file", help="the SETs' ticket keys (for the admin calls)")
            p.add_argument("--ticket", help="an admin ticket, instead of --key-file")
            p.add_argument("--drain-s", type=float, default=3.0,
                           help="wait between freezing the slots and exporting them")
            p.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for the export and the import")
            p.add_argument("--map-only", action="store_true",
                           help="change the map without moving data (only for slots that "
                                "hold none, e.g. before the SETs serve)")
    return ap


def _servers(args: argparse.Namespace) -> list[str]:
    if args.nats:
        return [u.strip() for u in args.nats.split(",") if u.strip()]
    if args.cluster:
        return list(ClusterConfig.load(args.cluster).nats)
    raise _Refused("say where NATS is: --nats URLS or --cluster FILE")


async def _run(args: argparse.Namespace) -> str:
    import nats
    from nats.errors import NoServersError

    servers = _servers(args)

    async def quiet(_exc: Exception) -> None:  # the failure is reported once, below
        return None

    try:
        nc = await nats.connect(servers=servers, connect_timeout=CONNECT_TIMEOUT_S,
                                max_reconnect_attempts=1, allow_reconnect=False,
                                error_cb=quiet)
    except (TimeoutError, NoServersError, OSError) as exc:
        raise _Refused(f"cannot reach NATS at {','.join(servers)}: {exc}") from None
    try:
        js = nc.jetstream()
        if args.cmd == "init":
            addresses = dict(_set_arg(s) for s in args.set)
            if len(addresses) != len(args.set):
                raise MapError("a SET is named twice")
            slotmap = SlotMap.even(addresses)
            replicas = args.replicas or (3 if len(servers) >= 3 else 1)
            await mapstore.init(js, slotmap, replicas)
            return slotmap.describe()
        if args.cmd == "move":
            if args.map_only:
                return (await mapstore.move(js, parse_slots(args.slots), args.to)).describe()
            return (await _handoff(js, args)).describe()
        if args.history:
            versions = await mapstore.history(js)
            if not versions:
                raise MapError("the cluster has no slot map yet: run `hongbao cluster init`")
            return "\n".join(m.describe() for m in versions)
        return (await mapstore.load(js))[0].describe()
    finally:
        await nc.close()


async def _handoff(js, args: argparse.Namespace):
    from gateway.ops import handoff
    from gateway.security import tickets

    if bool(args.key_file) == bool(args.ticket):
        raise _Refused("a move hands the slots' data over through the SETs' admin calls: "
                       "give --key-file FILE (the SETs' ticket keys) or --ticket, one of "
                       "them (or --map-only for slots that hold no data)")
    try:
        ticket = args.ticket or tickets.mint(tickets.KeyRing.from_file(args.key_file),
                                             "hongbao-cluster-move", ["admin"], 3600)[0]
    except tickets.KeyFileError as exc:
        raise _Refused(str(exc)) from None
    try:
        return await handoff.move(js, parse_slots(args.slots), args.to, ticket,
                                  drain_s=args.drain_s, timeout_s=args.timeout,
                                  say=lambda line: print(line, flush=True))
    except handoff.HandoffError as exc:
        raise _Refused(str(exc)) from None


def _set_arg(text: str) -> tuple[str, list[str]]:
    """``s1=HOST:PORT`` or ``s1=HOST:PORT,HOST:PORT`` -> (name, its groups' addresses)."""
    name, sep, addresses = text.partition("=")
    listed = [a.strip() for a in addresses.split(",")]
    if not sep or not all(listed):
        raise MapError(f"--set {text!r}: want NAME=HOST:PORT[,HOST:PORT]")
    return name, listed


def main(argv: list[str] | None = None) -> int:
    from nats.errors import Error as NatsError
    from nats.errors import TimeoutError as NatsTimeout

    args = _parser().parse_args(argv)
    try:
        print(asyncio.run(_run(args)))
    except (_Refused, MapError, ClusterFileError) as exc:
        print(f"hongbao cluster {args.cmd}: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, NatsTimeout):
        print(f"hongbao cluster {args.cmd}: JetStream did not answer in time (after a node "
              "is lost, electing new leaders takes a few seconds): try again", file=sys.stderr)
        return 2
    except NatsError as exc:
        print(f"hongbao cluster {args.cmd}: JetStream refused: {exc}", file=sys.stderr)
        return 2
    return 0
