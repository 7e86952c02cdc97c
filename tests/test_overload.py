"""One worker overloaded for real: h2load floods the wallet home (P2) and the
notification stream (P3) while a client keeps sending envelopes (P0).

The flood is h2load (Debian's nghttp2-client, which ``make test`` installs when it is
missing) with prebuilt gRPC frames: it does not honour the admission level, so the
server has to shed it itself. The test checks that P3 and P2 are shed or degraded
before any P0 call is refused, that P0 sends keep >= 90 % success, and that the level
is back to full admission within 5 s of the flood stopping.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import grpc
import pytest

from gateway.client import Client
from gateway.qos.controller import MAX_LEVEL
from hongbao.v1 import admin_pb2, envelope_pb2
from tests.conftest import run
from tests.test_gateway import top_up

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None,
                                reason="h2load missing (make test installs nghttp2-client)")

FLOOD_S = 8.0
EMPTY_FRAME = b"\x00\x00\x00\x00\x00"  # a gRPC frame holding an empty message


def h2load(target: str, ticket: str, method: str, frame_file, *, clients: int, streams: int,
           duration_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["h2load", "-D", str(int(duration_s)), "-c", str(clients), "-m", str(streams),
         "-d", str(frame_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-H", f"authorization: Bearer {ticket}", f"http://{target}{method}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def p0_sender(c: Client, meta, stop: asyncio.Event, outcomes: list,
                    tag: str = "p0") -> None:
    """One 1-fen envelope every 20 ms, each with a 2 s deadline: (time, code)."""
    i = 0
    while not stop.is_set():
        i += 1
        t = time.monotonic()
        try:
            await c.envelopes.SendEnvelope(envelope_pb2.SendEnvelopeRequest(
                request_id=f"{tag}-{i}", total_fen=1, count=1,
                kind=envelope_pb2.ENVELOPE_KIND_LUCKY),
                metadata=meta, timeout=2.0)
            outcomes.append((t, "OK"))
        except grpc.aio.AioRpcError as err:
            outcomes.append((t, err.code().name))
        await asyncio.sleep(max(0.0, 0.02 - (time.monotonic() - t)))


async def watch_status(c: Client, meta, until: asyncio.Event, rows: list) -> None:
    """GetQosStatus every 100 ms: (time, level, {tier: rejected})."""
    while not until.is_set():
        q = await c.admin.GetQosStatus(admin_pb2.GetQosStatusRequest(), metadata=meta,
                                       timeout=5.0)
        rows.append((time.monotonic(), q.admission.level, {t.tier: t.rejected for t in q.tiers},
                     {d.name: d.served for d in q.degradations}))
        await asyncio.sleep(0.1)


def test_an_overloaded_worker_sheds_p3_and_p2_first_and_keeps_p0(stack, tmp_path):
    frame = tmp_path / "empty.bin"
    frame.write_bytes(EMPTY_FRAME)
    flooder = stack.ticket("flood", scopes=("read",))

    async def scenario(attempt: int):
        async with Client(stack.target) as c, Client(stack.target) as ops:
            sender = stack.meta("p0")
            if attempt == 0:
                await top_up(c, sender, 1_000_000)
            admin = stack.meta("ops", scopes=("admin",))
            stop, done = asyncio.Event(), asyncio.Event()
            outcomes: list = []
            rows: list = []
            tasks = [asyncio.create_task(p0_sender(c, sender, stop, outcomes, f"p0-{attempt}")),
                     asyncio.create_task(watch_status(ops, admin, done, rows))]
            floods = [h2load(stack.target, flooder, m, frame, clients=2, streams=64,
                             duration_s=FLOOD_S) for m in (
                "/hongbao.v1.WalletService/GetBalance",
                "/hongbao.v1.WalletService/ListTransactions",
                "/hongbao.v1.NotificationService/WatchNotifications")]
            try:
                await asyncio.sleep(FLOOD_S)
                reports = [(await asyncio.to_thread(f.communicate, timeout=30))[0]
                           for f in floods]
                flood_end = time.monotonic()
                stop.set()
                await tasks[0]
                for _ in range(100):  # until full admission, at most 10 s
                    if rows and rows[-1][0] > flood_end and rows[-1][1] == MAX_LEVEL:
                        break
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                done.set()
                for f in floods:
                    if f.poll() is None:
                        f.kill()
                        f.wait()
                await asyncio.gather(*tasks, return_exceptions=True)
            return outcomes, rows, flood_end, reports

    # On a shared 2-core machine a flood once left the worker unsaturated in a CI run
    # (nothing shed, level never lowered): the flood then runs a second time, and
    # h2load's own counts go into the message if that one does not overload it either.
    for attempt in range(2):
        outcomes, rows, flood_end, reports = run(scenario(attempt))
        sent = [line for r in reports for line in r.splitlines() if line.startswith("requests:")]
        lower = [t for t, _, rej, served in rows
                 if rej.get("P3", 0) + rej.get("P2", 0) > 0 or any(served.values())]
        if lower:
            break
    ok = sum(1 for _, code in outcomes if code == "OK")
    assert len(outcomes) >= 50 and ok / len(outcomes) >= 0.90, (ok, len(outcomes))
    assert lower, ("nothing was shed or degraded: the flood did not overload the worker", sent,
                   rows[::10])
    refused_p0 = [t for t, _, rej, _ in rows if rej.get("P0", 0) > 0]
    assert not refused_p0 or refused_p0[0] >= lower[0]
    back = [t for t, level, _, _ in rows if t > flood_end and level == MAX_LEVEL]
    assert back and back[0] - flood_end <= 5.0, rows[-5:]
