"""Balance first: AUTO payments covered by the wallet make no bank call at all.

Starts the bank simulator and the gateway (real processes, loopback), tops up
users' wallets, then sends envelopes with PAY_METHOD_AUTO and a card_id, and
counts the orders the bank has before and after (GetStats). Then the same
envelopes by CARD for contrast.

    python bench/bench_balance_first.py [--users 100] [--sends 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from gateway.client import Client
from gateway.errors import reason_of
from gateway.ops.procs import banksim_proc, gateway_proc
from gateway.payments.bank import BankClient
from gateway.security import tickets
from hongbao.v1 import envelope_pb2, wallet_pb2


async def _orders(bank_target: str) -> int:
    bank = BankClient(bank_target, timeout_s=5)
    try:
        return (await bank.stats()).orders
    finally:
        await bank.close()


async def _scenario(gw: str, bank: str, data_dir: Path, users: int, sends: int) -> dict:
    ring = tickets.KeyRing.load_or_create(data_dir)
    metas = [Client.bearer(tickets.mint(ring, f"u{i}", ["pay"], 3600)[0]) for i in range(users)]
    async with Client(gw) as c:
        topped = await asyncio.gather(*(c.wallet.TopUp(wallet_pb2.TopUpRequest(
            request_id="t", card_id=f"icbc-{i}", amount_fen=100_000), metadata=m)
            for i, m in enumerate(metas)), return_exceptions=True)
        top_up_refused = _refusals(topped)

        async def send_all(method: int, tag: str) -> tuple[int, float, set]:
            before = await _orders(bank)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(c.envelopes.SendEnvelope(
                envelope_pb2.SendEnvelopeRequest(
                    request_id=f"{tag}{j}", total_fen=1_000, count=10,
                    kind=envelope_pb2.ENVELOPE_KIND_LUCKY, pay_method=method,
                    card_id=f"icbc-{i}"), metadata=m)
                for i, m in enumerate(metas) for j in range(sends)), return_exceptions=True)
            seconds = time.perf_counter() - t0
            paid_via = {r.paid_via for r in results if not isinstance(r, BaseException)}
            return (await _orders(bank)) - before, seconds, paid_via, _refusals(results)

        auto = await send_all(envelope_pb2.PAY_METHOD_AUTO, "a")
        card = await send_all(envelope_pb2.PAY_METHOD_CARD, "c")
    return {"payments": users * sends, "auto_bank_calls": auto[0], "auto_s": auto[1],
            "auto_paid_via": sorted(envelope_pb2.PayMethod.Name(v) for v in auto[2]),
            "auto_refused": auto[3], "card_bank_calls": card[0], "card_s": card[1],
            "card_refused": card[3], "top_up_refused": top_up_refused}


def _refusals(results: list) -> dict[str, int]:
    """Refused calls by reason (a busy bank refused by the butler is a figure, not a crash);
    anything but a gRPC refusal is re-raised."""
    counts: Counter[str] = Counter()
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError):
            counts[reason_of(r) or r.code().name] += 1
        elif isinstance(r, BaseException):
            raise r
    return dict(counts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--sends", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmp:
        root = Path(tmp)
        bank = banksim_proc(root / "bank", log_path=root / "bank.log")
        gw = gateway_proc(root / "gw", log_path=root / "gw.log")
        try:
            bank.start()
            gw.cmd += ["--bank", bank.target]
            gw.start()
            r = asyncio.run(_scenario(gw.target, bank.target, root / "gw", args.users,
                                      args.sends))
        finally:
            gw.stop()
            bank.stop()
    print(f"{r['payments']} envelopes with PAY_METHOD_AUTO, wallets covering them: "
          f"{r['auto_bank_calls']} bank calls (paid via {', '.join(r['auto_paid_via'])}), "
          f"{r['payments'] / r['auto_s']:,.0f}/s")
    print(f"{r['payments']} envelopes with PAY_METHOD_CARD: {r['card_bank_calls']} bank calls, "
          f"{r['payments'] / r['card_s']:,.0f}/s")
    for phase in ("top_up", "auto", "card"):
        if r[f"{phase}_refused"]:
            print(f"  {phase} refused: " + ", ".join(f"{k}={v}" for k, v in
                                                     sorted(r[f"{phase}_refused"].items())))
    met = r["auto_bank_calls"] == 0
    print(f"  [{'met' if met else 'NOT met'}] AUTO with balances covering the amounts makes "
          f"zero bank calls")
    return r


if __name__ == "__main__":
    main()
