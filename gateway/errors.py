"""One error hierarchy for the gateway and the one boundary that maps it to gRPC.

Domain code (ledger, services, tickets) raises a ``GatewayError`` subclass; it
knows nothing about gRPC. Servicers and interceptors turn one into a status
with a ``google.rpc.ErrorInfo`` detail through :func:`abort`, so every client
gets a machine-readable reason as well as a code. Each class carries its code
as a class attribute (the asyncpg way); the reason is per instance.
"""

from __future__ import annotations

import collections
from typing import ClassVar, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "hongbao.gateway"


class GatewayError(Exception):
    """An operating error reported to the caller; never a programmer error."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    # The ErrorInfo domain: who refused (the bank simulator has its own).
    domain: ClassVar[str] = DOMAIN

    def __init__(self, reason: str, message: str = "", **metadata: str) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GatewayError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, reason: str, message: str = "", retry_after_ms: int = 0,
                 **metadata: str) -> None:
        super().__init__(reason, message, **metadata)
        self.retry_after_ms = retry_after_ms


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, reason: str, message: str = "", retry_after_ms: int = 0,
                 **metadata: str) -> None:
        super().__init__(reason, message, **metadata)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")),
              grpc.Status):
    pass


def to_status(err: GatewayError) -> grpc.Status:
    """The rich status for ``err``: code, message and one ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=err.domain,
                                       metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=[detail]
    )
    return rpc_status.to_status(status)


def trailing_metadata(err: GatewayError) -> tuple[tuple[str, str], ...]:
    """Extra trailers: the standard retry pushback for shed requests and for a SET that
    is down or a slot that moved (UNAVAILABLE ``SET_DOWN``, ``WRONG_SLOT``)."""
    if isinstance(err, (ResourceExhausted, Unavailable)) and err.retry_after_ms > 0:
        return (("grpc-retry-pushback-ms", str(err.retry_after_ms)),)
    return ()


def rich_status(err: GatewayError) -> grpc.Status:
    """What ``abort_with_status`` needs for ``err``: its status and its extra trailers."""
    status = to_status(err)
    extra = trailing_metadata(err)
    if extra:
        # abort_with_status replaces the call's trailers with the status's own,
        # so the pushback must travel inside the status.
        status = _Status(status.code, status.details,
                         tuple(status.trailing_metadata) + extra)
    return status


def with_trailers(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    """``status`` with ``extra`` appended to its trailing metadata."""
    return _Status(status.code, status.details, (*status.trailing_metadata, *extra))


async def abort(context: grpc.aio.ServicerContext, err: GatewayError) -> NoReturn:
    """Ends the call with ``err`` mapped to its status (raises, never returns)."""
    status = rich_status(err)
    # abort_with_status supersedes the trailers set so far (the admission level among
    # them): carry them over.
    kept = context.trailing_metadata() if hasattr(context, "trailing_metadata") else None
    if kept:
        status = with_trailers(status, tuple(kept))
    # grpc-stubs 1.53 predates ServicerContext.abort_with_status, which grpcio has.
    await context.abort_with_status(status)  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def reason_of(rpc_error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failed call, for clients and tests."""
    info = error_info_of(rpc_error)
    return None if info is None else info.reason


def metadata_of(rpc_error: grpc.RpcError) -> dict[str, str]:
    """The ErrorInfo metadata of a failed call (e.g. ``other_cards`` of BANK_CIRCUIT_OPEN)."""
    info = error_info_of(rpc_error)
    return {} if info is None else dict(info.metadata)


def error_info_of(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(rpc_error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
