"""The bank's error hierarchy: the gateway's, under the bank's own ErrorInfo domain.

Domain code raises a ``BankError`` subclass (its status code is a class
attribute, its reason per instance); the servicers turn it into a status with a
``google.rpc.ErrorInfo`` detail through the same boundary as the gateway
(:func:`gateway.errors.abort`), so one ``reason_of`` reads both. The domain
differs so a log says who refused.
"""

from __future__ import annotations

import grpc

from gateway import errors as _errors

DOMAIN = "banksim"
abort = _errors.abort
to_status = _errors.to_status


class BankError(_errors.GatewayError):
    """An operating error reported to the caller; never a programmer error."""

    domain = DOMAIN


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
