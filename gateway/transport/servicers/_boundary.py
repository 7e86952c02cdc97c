"""The one place where domain errors become gRPC statuses, and bytes become requests.

A request body that is not a valid message of its type (bad wire format, or a string
field that is not UTF-8) must end the call with INVALID_ARGUMENT ``BAD_MESSAGE`` and a
reason. grpc's own handling of a deserializer that raises is to answer UNKNOWN with
the exception's text (unary calls), or to leave a server stream hanging until its
deadline, so the deserializers installed by :func:`register` never raise: they
return an :class:`Undecodable`, and :func:`maps_errors` turns it into the status
before the servicer sees it (for BatchGrab, when the stream reaches it).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from gateway import errors
from gateway.transport.interceptors._plumbing import HANDLER_FACTORIES
from gateway.transport.interceptors.auth import claims


class Undecodable:
    """A request body that did not decode; stands in for the message."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail

    def error(self) -> errors.GatewayError:
        return errors.InvalidArgument("BAD_MESSAGE", self.detail)


def decoder(message_class: Any):
    """``message_class.FromString`` that returns an :class:`Undecodable` instead of raising."""
    from_string = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError as exc:
            cause = exc.__cause__ or exc.__context__
            why = str(cause) if cause is not None else str(exc)
            return Undecodable(f"the request is not a valid {name}: {why}"[:300])

    return decode


def register(server: Any, service: ServiceDescriptor, servicer: Any) -> None:
    """What ``add_<Service>Servicer_to_server`` does, with :func:`decoder` deserializers."""
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        factory = HANDLER_FACTORIES[method.client_streaming, method.server_streaming]
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=decoder(request),
                                        response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


async def _checked(requests):
    """A request stream that raises the BAD_MESSAGE error at the first undecodable body."""
    async for request in requests:
        if type(request) is Undecodable:
            raise request.error()
        yield request


def maps_errors(method):
    """Wraps a servicer method so a GatewayError ends the call with its status and reason."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                if type(request) is Undecodable:
                    raise request.error()
                if hasattr(request, "__aiter__"):  # a client stream (BatchGrab)
                    request = _checked(request)
                async for item in method(self, request, context):
                    yield item
            except errors.GatewayError as err:
                await errors.abort(context, err)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            if type(request) is Undecodable:
                raise request.error()
            return await method(self, request, context)
        except errors.GatewayError as err:
            await errors.abort(context, err)
    return unary


def limited_subject(limits: Any) -> str:
    """:func:`subject`, after taking one of that user's tokens from ``limits`` (a
    ``UserRateLimiter``): the calls that move money or grab start with this."""
    user = claims().subject
    limits.check(user)
    return user


def subject() -> str:
    """The caller: always the verified ticket's subject, never a request field."""
    return claims().subject
