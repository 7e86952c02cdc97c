"""``make cluster``: a local cluster on loopback, in the foreground until Ctrl-C.

    python -m gateway.ops.cluster_up [--dir build/cluster] [--sets 3] [--idcs 1|2]

Starts 3 ``nats-server`` nodes (JetStream, routes on loopback), the bank simulator and
``--sets`` SETs (``hongbao serve --cluster``, one LMDB each), stores the slot map (slots
spread evenly), prints every address and the commands to use them, and stops every process
it started, by pid, on SIGINT or SIGTERM. The folder is emptied first: each run is a new
cluster.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import threading
from pathlib import Path

from gateway.ops.clusterproc import LocalCluster


def describe(cluster: LocalCluster) -> str:
    first = next(iter(cluster.sets.values()))
    lines = ["hongbao cluster on loopback:",
             f"  NATS        {', '.join(cluster.nats.urls)}"]
    if cluster.bank is not None:
        lines.append(f"  bank        {cluster.bank.target}")
    for name, groups in cluster.groups.items():
        for g in groups:
            idc = f" idc {g.idc}" if len(groups) > 1 else ""
            lines.append(f"  SET {name:<7} {g.address}{idc}   data {g.data_dir}   log {g.log}")
    lines += [
        f"  ticket keys {cluster.key_file}",
        "",
        "try:",
        f"  T=$(hongbao ticket issue --key-file {cluster.key_file} --user alice)",
        f"  grpcurl -plaintext -H \"authorization: Bearer $T\" {first.address} "
        "hongbao.v1.WalletService/GetBalance",
        f"  grpcurl -plaintext {first.address} hongbao.v1.ClusterService/GetClusterMap",
        f"  hongbao cluster show --cluster {first.cluster_file}",
        f"  hongbao reconcile --cluster {first.cluster_file} --key-file {cluster.key_file}"
        + (f" --bank {cluster.bank.target}" if cluster.bank is not None else ""),
        "",
        "Ctrl-C stops every process."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.ops.cluster_up",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("build/cluster"))
    ap.add_argument("--sets", type=int, default=3, choices=range(1, 10), metavar="1..9")
    ap.add_argument("--idcs", type=int, default=1, choices=(1, 2),
                    help="gateway groups per SET over the same data (IDC a and b)")
    args = ap.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(args.dir.resolve(), sets=args.sets, idcs=args.idcs)
    try:
        cluster.start()
        print(describe(cluster), flush=True)
        while not stop.wait(1.0):
            dead = [g.address for groups in cluster.groups.values() for g in groups
                    if not g.running]
            if dead:
                print(f"the gateway at {', '.join(dead)} exited; see its log. Stopping.",
                      flush=True)
                return 1
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
