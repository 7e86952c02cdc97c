"""A plain-text metrics page (Prometheus exposition format) on loopback.

Hand-written and small on purpose: the QoS work replaces it with
prometheus-client. Each scrape reads the counters fresh.
"""

from __future__ import annotations

import asyncio

from gateway.transport.app import App

_READ_TIMEOUT_S = 5


async def _body(app: App) -> bytes:
    stats = await app.gateway.operations.ledger_stats()
    credit = app.credit
    return ("\n".join([
        f"hongbao_writer_queue_depth {stats.queue_depth}",
        f"hongbao_writer_batches_total {stats.batches}",
        f"hongbao_writer_requests_total {stats.requests}",
        f"hongbao_writer_batch_size_max {stats.batch_size_max}",
        f"hongbao_writer_apply_seconds_total {stats.apply_s_total:.6f}",
        f"hongbao_writer_commit_seconds_total {stats.commit_s_total:.6f}",
        f"hongbao_gate_envelopes {len(app.gateway.grabbing.gate)}",
        f"hongbao_credit_applied_total {credit.applied if credit else 0}",
        f"hongbao_credit_backlog {stats.credit_backlog}",
    ]) + "\n").encode()


async def serve_metrics(port: int, app: App) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            body = await _body(app)
            stream.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await stream.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            stream.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)
