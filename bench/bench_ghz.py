"""ghz against a real gateway, by reflection, with the configs in bench/ghz/.

ghz (https://ghz.sh) is in no package registry this project can install from, so this
runs it only when ``GHZ=/path/to/ghz`` is set and otherwise says so and stops (the
figure it returns is the reason). What it does either way is build ready-to-run
configs from the templates in ``bench/ghz/``: it starts a bank simulator and one
``hongbao serve`` worker in a temporary folder, funds ``--senders`` senders by TopUp,
sends ``--envelopes`` envelopes of ``--shares`` shares paid from their balances,
mints a ticket per user, and fills each template:

- ``grab.json``: GrabEnvelope, ``data`` one entry per envelope and ``metadata`` one
  ticket per grabber; ghz takes both round-robin, one step per call, and the counts are
  coprime, so the first envelopes x grabbers calls are each a distinct (user, envelope)
  pair, every one a real grab; ``request_id`` is ``ghz-grab-{{.RequestNumber}}``;
- ``send.json``: SendEnvelope by balance, a fresh request id per call, round-robin
  over the senders' tickets;
- ``balance.json``: GetBalance, round-robin over every user's ticket.

The filled configs (``<name>.ready.json``, tickets included: they stay in the
temporary folder) are run with ``ghz --config FILE --format json`` one after the
other; the figures are ghz's own (calls, req/s, p50, p99, the status codes) beside
the server's counts of OK answers from its metrics page (ghz counts errors too).

    GHZ=/path/to/ghz python bench/bench_ghz.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from gateway.client import Client
from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.security import tickets
from hongbao.v1 import envelope_pb2, wallet_pb2

HERE = Path(__file__).resolve().parent
TEMPLATES = ("grab", "send", "balance")
TOP_UP_FEN = 1_000_000
CALL_TIMEOUT_S = 10.0


def coprime_above(n: int, other: int) -> int:
    """The smallest m >= n with gcd(m, other) == 1: round-robin pairs stay distinct."""
    m = max(1, n)
    while math.gcd(m, other) != 1:
        m += 1
    return m


def fill(template: dict, target: str, data: list | dict | None, tickets_: list[str]) -> dict:
    """A template with the host, the data (when given) and one metadata entry per ticket."""
    config = dict(template)
    config["host"] = target
    if data is not None:
        config["data"] = data
    config["metadata"] = [{"authorization": f"Bearer {t}"} for t in tickets_]
    return config


def load_template(name: str) -> dict:
    return json.loads((HERE / "ghz" / f"{name}.json").read_text())


async def _fund_and_send(target: str, senders: list[str], n_envelopes: int, shares: int
                         ) -> list[str]:
    """Tops every sender up and sends ``n_envelopes`` envelopes; returns their ids."""
    async with Client(target) as c:
        for i, t in enumerate(senders):
            meta = Client.bearer(t)
            for attempt in range(5):
                r = await c.wallet.TopUp(wallet_pb2.TopUpRequest(
                    request_id=f"ghz-fund-{i}-{attempt}", card_id=f"icbc-{i}",
                    amount_fen=TOP_UP_FEN), metadata=meta, timeout=CALL_TIMEOUT_S)
                if r.status == wallet_pb2.PAYMENT_STATUS_SUCCEEDED:
                    break
                await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise RuntimeError(f"sender {i} could not be funded")
        ids = []
        for j in range(n_envelopes):
            env = await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id=f"ghz-env-{j}", total_fen=100 * shares, count=shares,
                kind=envelope_pb2.ENVELOPE_KIND_LUCKY,
                pay_method=envelope_pb2.PAY_METHOD_BALANCE),
                metadata=Client.bearer(senders[j % len(senders)]), timeout=CALL_TIMEOUT_S)
            ids.append(env.envelope_id)
    return ids


def prepare(target: str, data_dir: Path, out_dir: Path, *, senders: int = 8,
            envelopes: int = 50, shares: int = 100, grabbers: int = 101) -> dict[str, Path]:
    """Funds, sends and writes ``<name>.ready.json`` for every template; returns their paths."""
    ring = tickets.KeyRing.load_or_create(data_dir)
    mint = lambda u: tickets.mint(ring, u, ["pay", "grab", "read"], 3600)[0]  # noqa: E731
    sender_tickets = [mint(f"ghz-s{i}") for i in range(senders)]
    # Every grabber may grab every envelope once: grabbers >= shares keeps them all real.
    grabbers = coprime_above(max(grabbers, shares), envelopes)
    grabber_tickets = [mint(f"ghz-u{i}") for i in range(grabbers)]
    ids = asyncio.run(_fund_and_send(target, sender_tickets, envelopes, shares))
    grab = load_template("grab")
    request_id = grab["data"][0]["request_id"]
    configs = {
        "grab": fill(grab, target, [{"envelope_id": e, "request_id": request_id} for e in ids],
                     grabber_tickets),
        "send": fill(load_template("send"), target, None, sender_tickets),
        "balance": fill(load_template("balance"), target, None,
                        sender_tickets + grabber_tickets),
    }
    # Real grabs only: no more calls than distinct (user, envelope) pairs with a share left.
    configs["grab"]["total"] = min(configs["grab"]["total"], envelopes * shares)
    paths = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        path = out_dir / f"{name}.ready.json"
        path.write_text(json.dumps(config, indent=1))
        path.chmod(0o600)  # tickets
        paths[name] = path
    return paths


def _ok_counts(metrics_port: int) -> dict[str, float]:
    """OK answers by method from the worker's metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    counts: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("hongbao_rpc_requests_total{") and 'code="OK"' in line:
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _metrics_port(log_path: Path) -> int:
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            if entry.get("event") == "metrics_serving":
                return int(entry["port"])
    raise RuntimeError(f"no metrics line in {log_path}")


def _ghz_figures(report: dict) -> dict:
    lat = {d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or ()}
    return {"calls": report.get("count", 0), "rps": round(report.get("rps", 0.0)),
            "p50_ms": round(lat.get(50, float("nan")), 2),
            "p99_ms": round(lat.get(99, float("nan")), 2),
            "codes": report.get("statusCodeDistribution", {})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="write the ready configs here (tickets in them)")
    args = ap.parse_args(argv)
    ghz = os.environ.get("GHZ")
    if not ghz or not Path(ghz).exists():
        reason = ("skipped: ghz is in no package registry here; set GHZ=/path/to/ghz "
                  "(ghz v0.115.0 or later) to run it")
        print(reason)
        return {"skipped": reason}
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-ghz-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        bank = banksim_proc(root / "bank", log_path=root / "bank.log")
        stack.callback(bank.stop)
        bank.start()
        log_path = root / "gateway.log"
        config = root / "gateway.toml"
        # ghz's sends come from a few senders, far above the per-user limit by design.
        config.write_text("user_rate_per_s = 0\n")
        gw = gateway_proc(root / "gw", "--metrics-port", "0", "--config", str(config),
                          bank=bank.target, log_path=log_path)
        stack.callback(gw.stop)
        gw.start()
        paths = prepare(gw.target, root / "gw", args.keep or root / "configs")
        port = _metrics_port(log_path)
        for name in TEMPLATES:
            call = json.loads(paths[name].read_text())["call"]
            method = "/" + call
            before = _ok_counts(port).get(method, 0.0)
            done = subprocess.run([ghz, "--config", str(paths[name]), "--format", "json"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0 and not done.stdout.strip():
                raise RuntimeError(f"ghz {name}: {done.stderr.strip()[:500]}")
            fig = _ghz_figures(json.loads(done.stdout))
            fig["server_ok"] = int(_ok_counts(port).get(method, 0.0) - before)
            figures[name] = fig
            print(f"{name:8} {fig['calls']:>7} calls {fig['rps']:>7} req/s "
                  f"p50 {fig['p50_ms']} ms p99 {fig['p99_ms']} ms server OK {fig['server_ok']} "
                  f"codes {fig['codes']}", flush=True)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
