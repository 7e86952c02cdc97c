"""``hongbao reconcile``: the conservation checks on a ledger directory, and the bank's view;
with ``--cluster FILE``, the same over every SET of a cluster and the credit stream.

The checks themselves are ``gateway.domain.audit`` (on one consistent
snapshot, so this can run beside a live gateway),
``gateway.payments.crosscheck`` (against the bank simulator's own ledger) and
``gateway.cluster.reconcile`` (the SETs and the stream together); this module
reaches them: a ledger directory, the bank, the SETs over gRPC, NATS.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from gateway.client import Client
from gateway.domain.audit import Report, audit
from gateway.domain.reads import Direction, InterSetCredit, InterSetCredits
from gateway.ledger import LmdbSnapshot
from gateway.payments.bank import BankBusy, BankClient, BankUnclear
from gateway.payments.crosscheck import cross_check_bank
from hongbao.v1 import admin_pb2

if TYPE_CHECKING:
    from gateway.cluster.config import ClusterConfig
    from gateway.cluster.reconcile import ClusterReport, SetAudit, SetUnreachable

# gateway.cluster (and nats-py with it) is imported where the cluster reconcile runs, not
# here: `hongbao reconcile --data-dir` stays as it was, importing nothing of cluster mode.


def reconcile_dir(data_dir: Path, bank_target: str | None = None,
                  bank_credentials: grpc.ChannelCredentials | None = None) -> Report:
    """Audits the ledger in ``data_dir`` (read-only) and, given a bank, cross-checks it."""
    snapshot = LmdbSnapshot(data_dir)
    try:
        report = snapshot.read(audit)
    finally:
        snapshot.close()
    if bank_target:
        async def check() -> None:
            bank = BankClient(bank_target, timeout_s=10, credentials=bank_credentials)
            try:
                await cross_check_bank(report, bank)
            finally:
                await bank.close()
        asyncio.run(check())
    return report


# -- hongbao reconcile --cluster FILE ---------------------------------------------------

SET_CALL_TIMEOUT_S = 120.0  # an audit reads a SET's whole journal
MAX_LISTED_CREDITS = 20_000_000  # a listing longer than this is not a SET's answer
NATS_CONNECT_TIMEOUT_S = 5.0


class ClusterReconcileError(Exception):
    """The reconcile could not start (no cluster file, NATS unreachable, no slot map, a
    stream that cannot be read): one line, exit status 2."""


class GrpcSet:
    """One SET reached over gRPC (``SetSource``): AdminService/Reconcile and
    ListInterSetCredits, with an admin ticket.

    Over the network and not by opening the SET's LMDB: in a real deployment the SETs
    live on other hosts, and their own process answers from one consistent snapshot.
    """

    def __init__(self, name: str, address: str, ticket: str,
                 timeout_s: float = SET_CALL_TIMEOUT_S) -> None:
        self.name = name
        self.address = address
        self._client = Client(address)
        self._meta = Client.bearer(ticket)
        self._timeout_s = timeout_s

    async def audit(self) -> SetAudit:
        from gateway.cluster.reconcile import SetAudit, SetUnreachable

        try:
            resp = await self._client.admin.Reconcile(
                admin_pb2.ReconcileRequest(skip_bank_cross_check=True), metadata=self._meta,
                timeout=self._timeout_s)
            report = json.loads(resp.report_json)
            return SetAudit(resp.balanced, list(resp.discrepancies), report["totals"],
                            report.get("in_flight", []))
        except grpc.aio.AioRpcError as err:
            raise self._failed("Reconcile", err) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SetUnreachable(f"SET {self.name} at {self.address} answered Reconcile "
                                 f"with a report that does not read: {exc!r}") from None

    async def listing(self) -> InterSetCredits:
        from gateway.cluster.reconcile import SetUnreachable

        credits: list[InterSetCredit] = []
        balances: dict[str, int] = {}
        try:
            async for chunk in self._client.admin.ListInterSetCredits(
                    admin_pb2.ListInterSetCreditsRequest(), metadata=self._meta,
                    timeout=self._timeout_s):
                credits.extend(InterSetCredit(c.peer_set, Direction(c.direction),
                                              c.transfer_id, c.amount_fen, c.in_outbox)
                               for c in chunk.credits)
                balances.update(chunk.interset_fen)
                if len(credits) > MAX_LISTED_CREDITS:
                    raise ValueError(f"more than {MAX_LISTED_CREDITS} credits")
        except grpc.aio.AioRpcError as err:
            raise self._failed("ListInterSetCredits", err) from None
        except ValueError as exc:   # a direction this reconcile does not know, or too many
            raise SetUnreachable(f"SET {self.name} at {self.address} answered "
                                 f"ListInterSetCredits with nonsense: {exc}") from None
        return InterSetCredits(credits, balances)

    def _failed(self, method: str, err: grpc.aio.AioRpcError) -> SetUnreachable:
        from gateway.cluster.reconcile import SetUnreachable

        code = err.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return SetUnreachable(f"SET {self.name} at {self.address} unreachable: "
                                  f"{code.name}: {err.details()}")
        return SetUnreachable(f"SET {self.name} at {self.address} refused {method}: "
                              f"{code.name}: {err.details()}")

    async def close(self) -> None:
        await self._client.close()


def reconcile_cluster(cluster_file: Path, ticket: str, bank_target: str | None = None,
                      bank_credentials: grpc.ChannelCredentials | None = None
                      ) -> ClusterReport:
    """The cluster reconcile (``gateway.cluster.reconcile``) of the SETs in the slot map
    that the cluster file's NATS servers hold, and with a bank, its cross-check over all
    SETs. Raises ClusterReconcileError when it cannot start."""
    from gateway.cluster.config import ClusterConfig, ClusterFileError

    try:
        config = ClusterConfig.load(cluster_file)
    except ClusterFileError as exc:
        raise ClusterReconcileError(str(exc)) from None
    return asyncio.run(_reconcile_cluster(config, ticket, bank_target, bank_credentials))


async def _reconcile_cluster(config: ClusterConfig, ticket: str, bank_target: str | None,
                             bank_credentials: grpc.ChannelCredentials | None
                             ) -> ClusterReport:
    import nats
    from nats.errors import Error as NatsError

    from gateway.cluster import mapstore
    from gateway.cluster.reconcile import check, gather, read_stream
    from gateway.cluster.slotmap import MapError

    async def quiet(_exc: Exception) -> None:   # reported once, below
        return None

    servers = ",".join(config.nats)
    try:
        nc = await nats.connect(servers=list(config.nats), error_cb=quiet,
                                connect_timeout=NATS_CONNECT_TIMEOUT_S,
                                allow_reconnect=False, max_reconnect_attempts=1)
    except (TimeoutError, NatsError, OSError) as exc:
        raise ClusterReconcileError(f"cannot reach NATS at {servers}: {exc!r}") from None
    sources: list[GrpcSet] = []
    try:
        js = nc.jetstream(timeout=10.0)
        slotmap, _revision = await mapstore.load(js)
        sources = [GrpcSet(name, await _first_group_up(slotmap.groups[name]), ticket)
                   for name in slotmap.addresses]
        gathered = await gather(list(sources), lambda: read_stream(js))
    except MapError as exc:
        raise ClusterReconcileError(str(exc)) from None
    except (TimeoutError, NatsError) as exc:
        raise ClusterReconcileError(f"JetStream at {servers} did not answer: {exc!r} "
                                    "(while a node is lost, leaders take a few seconds "
                                    "to elect: try again)") from None
    finally:
        for source in sources:
            await source.close()
        await nc.close()
    report = check(gathered)
    if bank_target:
        await _cross_check_bank_over_sets(report, bank_target, bank_credentials)
    return report


async def _first_group_up(addresses: tuple[str, ...], timeout_s: float = 1.0) -> str:
    """The first of a SET's gateway groups (IDCs) whose health check answers SERVING; the
    first group when none does (it is then reported unreachable, by that address). Both
    groups of a SET serve one ledger, so either gives the same books."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return address
    return addresses[0]


async def _cross_check_bank_over_sets(report: ClusterReport, bank_target: str,
                                      credentials: grpc.ChannelCredentials | None) -> None:
    """One bank holds the money of every SET: its merchant balance must equal what all
    the SETs' clearing accounts say came in, plus the in-flight payments of all SETs the
    bank settled. The same check as one SET's (``cross_check_bank``), on the sums. A SET
    that could not be read leaves the sum short, and is already a discrepancy."""
    combined = Report(totals={"clearing_in_fen": report.totals["clearing_in_fen"],
                              "channel_in_fen": report.totals.get("channel_in_fen", {})},
                      in_flight=report.in_flight_payments)
    bank = BankClient(bank_target, timeout_s=10, credentials=credentials)
    try:
        await cross_check_bank(combined, bank)
    except (BankUnclear, BankBusy) as exc:
        report.bad(f"the bank at {bank_target} did not answer: {exc}")
        return
    finally:
        await bank.close()
    report.bank = combined.bank
    report.discrepancies.extend(combined.discrepancies)
