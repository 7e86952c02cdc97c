"""ClusterService: the slot map this SET holds, for clients that route by it (no ticket)."""

from __future__ import annotations

from collections.abc import Callable

from gateway.cluster.slotmap import SlotMap
from gateway.domain.keys import SLOTS
from gateway.transport.servicers._boundary import maps_errors
from hongbao.v1 import cluster_pb2 as pb
from hongbao.v1 import cluster_pb2_grpc


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, name: str, current: Callable[[], SlotMap]) -> None:
        self._name = name
        self._current = current

    @maps_errors
    async def GetClusterMap(self, request, context):
        m = self._current()
        sets = [pb.ClusterSet(name=name, address=address, addresses=m.groups[name],
                              runs=[pb.SlotRun(first=a, last=b) for a, b in m.runs(name)])
                for name, address in m.addresses.items()]
        return pb.GetClusterMapResponse(version=m.version, slots=SLOTS, sets=sets,
                                        answered_by=self._name)
