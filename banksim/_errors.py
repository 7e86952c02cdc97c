"""The bank's error hierarchy and the one boundary that maps it to gRPC.

Domain code raises a ``BankError`` subclass (its status code is a class
attribute, its reason per instance); the servicers end the call with
:func:`abort`: the code, the message as details and one ``google.rpc.ErrorInfo``
in ``grpc-status-details-bin``. That is the gateway's wire format too, so one
``reason_of`` reads both; only the domain differs, so a log says who refused.
The simulator is a separate system and shares no code with the gateway.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "banksim"


class BankError(Exception):
    """An operating error reported to the caller; never a programmer error."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str = "", **metadata: str) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(BankError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(BankError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(BankError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(BankError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BankError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_status(err: BankError) -> grpc.Status:
    """The rich status for ``err``: code, message and one ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=[detail]
    )
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: BankError) -> NoReturn:
    """Ends the call with ``err`` mapped to its status (raises, never returns)."""
    # grpc-stubs 1.53 leaves abort_with_status off grpc.aio.ServicerContext; grpcio has it.
    await context.abort_with_status(to_status(err))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover
