"""The one place where domain errors become gRPC statuses."""

from __future__ import annotations

import functools
import inspect

from gateway import errors
from gateway.transport.interceptors.auth import claims


def maps_errors(method):
    """Wraps a servicer method so a GatewayError ends the call with its status and reason."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.GatewayError as err:
                await errors.abort(context, err)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except errors.GatewayError as err:
            await errors.abort(context, err)
    return unary


def subject() -> str:
    """The caller: always the verified ticket's subject, never a request field."""
    return claims().subject
