"""Request ids and the access log: one JSON line per call.

Each call gets a request id: the caller's ``x-request-id`` when well formed (1..64 of
``[A-Za-z0-9._:-]``), else a fresh one. It is bound with ``structlog.contextvars``
inside the handler's own task, so every line the servicer logs carries it, and it is
echoed to the caller in the initial metadata. When the call ends one line records
``method``, ``code``, ``duration_ms``, ``request_id``, ``user`` when a ticket was
verified, and ``reason`` when the auth interceptor refused the call (with structlog
configured by :func:`configure_logging`, which merges bound context into every line).
Tickets, keys and metadata values other than the request id are never logged.

Install it outermost, before the auth interceptor, so refused calls are logged too::

    grpc.aio.server(interceptors=[LoggingInterceptor(), AuthInterceptor(keyring), ...])

Handlers are async in this gateway. Sync ones (run by grpc in a thread pool) are
supported, with two gaps: their line has no ``user`` (the claims live in the pool
thread) and their code is OK unless they raise.

``access_log=False`` drops the per-call line but keeps the request id binding and echo.

The access line does not go through structlog's processor chain when
:func:`configure_logging` set JSON lines at level info or below: :class:`AccessLog`
renders the same fields (``event``, ``level``, ``timestamp`` included) with one
``json.dumps`` and buffers the lines, writing them every 100 ms or 64 KiB, whichever
comes first, and when the worker stops. Measured in a pinned worker, the structlog line
with its write per call cost more CPU than the rest of a GetBalance's Python layer
(bench/RESULTS.md). The price of the buffer: a worker killed with ``kill -9`` loses at
most the last 100 ms of access lines, never a payment (the ledger is durable on its
own), and access lines may reach the stream up to 100 ms after other log lines of the
same moment (their timestamps say when each happened).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json as jsonlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import grpc
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from gateway.transport.interceptors._plumbing import (
    ASYNC,
    ASYNC_GEN,
    Behaviour,
    behaviour_kind,
    behaviour_of,
    code_of,
    code_of_exception,
    metadata_of,
    method_of,
    structlog_var,
    with_behaviour,
)
from gateway.transport.interceptors.auth import current_claims

__all__ = ["REQUEST_ID_HEADER", "AccessLog", "LoggingInterceptor", "configure_logging",
           "flush_access_log", "new_request_id"]

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Field names whose values must never reach a log line, whoever tries to log them:
# anything named like a ticket, key, secret, token, password or authorization
# (``issuer_key``, ``x-hongbao-issuer-key``, ``api_token``, ``Authorization``...).
_SECRET_NAME = re.compile(r"ticket|key|secret|token|passw|authoriz|bearer|credential",
                          re.IGNORECASE)
# Names that match the pattern but hold no secret; the access line's fields never match.
_NOT_SECRET = frozenset({"kid", "key_id"})
_secret_names: dict[str, bool] = {}

# Set directly on every call rather than through bind_contextvars (see structlog_var).
_REQUEST_ID_VAR = structlog_var("request_id")

_REASON_VAR = structlog_var("reason")

_UNIMPLEMENTED = "UNIMPLEMENTED"


# -- request ids ---------------------------------------------------------------------------


class _RequestIds:
    """A random per-process prefix and a counter: unique, and far cheaper than uuid4."""

    def __init__(self) -> None:
        self.reseed()
        # A forked child must not repeat its parent's ids.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(6) + "-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_ids = _RequestIds()


def new_request_id() -> str:
    """A fresh request id, unique across processes."""
    return _ids.next()


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return _ids.next()


# -- the interceptor -----------------------------------------------------------------------


# Writes the access line of a call: (method, request_id, start_ns, code).
_AccessLine = Callable[[str, str, int, str], None]
# The initial metadata echoing the request id, or None when not echoing.
_Echo = tuple[tuple[str, str], ...] | None


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id to every call and logs one line when it ends."""

    def __init__(
        self,
        *,
        access_log: bool = True,
        echo_request_id: bool = True,
        logger: Any = None,
    ) -> None:
        self._access_log = access_log
        self._echo = echo_request_id
        self._log = logger if logger is not None else AccessLog()

    async def intercept_service(  # type: ignore[override]  # may return None, as grpc allows
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = method_of(handler_call_details)
        request_id = _request_id(metadata_of(handler_call_details))
        if handler is None:
            # grpc answers UNIMPLEMENTED itself, with no handler to wrap: log it here.
            if self._access_log:
                self._log.info(
                    "rpc", method=method, code=_UNIMPLEMENTED, duration_ms=0.0,
                    request_id=request_id,
                )
            return None
        return with_behaviour(handler, self._wrap(behaviour_of(handler), method, request_id,
                                                  handler.response_streaming))

    def _wrap(
        self, fn: Behaviour, method: str, request_id: str, streaming: bool
    ) -> Behaviour:
        """``fn`` binding ``request_id``, echoing it, and logging the call when it ends."""
        echo: _Echo = ((REQUEST_ID_HEADER, request_id),) if self._echo else None
        access = self._access_line if self._access_log else None
        kind = behaviour_kind(fn)
        if kind is ASYNC:
            if access is None:
                return _async_quiet(fn, request_id, echo)
            return _async_logged(fn, method, request_id, echo, access)
        if kind is ASYNC_GEN:
            return _async_gen_logged(fn, method, request_id, echo, access)
        return _sync_logged(fn, method, request_id, echo, access, streaming)

    def _access_line(self, method: str, request_id: str, start_ns: int, code: str) -> None:
        duration_ms = round((time.perf_counter_ns() - start_ns) / 1e6, 3)
        verified = current_claims.get()
        if verified is None:
            self._log.info("rpc", method=method, code=code, duration_ms=duration_ms,
                           request_id=request_id)
        else:
            self._log.info("rpc", method=method, code=code, duration_ms=duration_ms,
                           request_id=request_id, user=verified.subject)


# -- the wrapped behaviours, one per way grpc runs a handler --------------------------------


def _async_quiet(fn: Behaviour, request_id: str, echo: _Echo) -> Behaviour:
    """An awaited handler with no access line: bind and echo the request id only."""

    async def wrapped(request: Any, context: Any) -> Any:
        _REQUEST_ID_VAR.set(request_id)
        if echo is not None:
            await context.send_initial_metadata(echo)
        return await fn(request, context)

    return wrapped


def _async_logged(
    fn: Behaviour, method: str, request_id: str, echo: _Echo, access: _AccessLine
) -> Behaviour:
    """An awaited handler (unary response) with its access line."""

    async def wrapped(request: Any, context: Any) -> Any:
        _REQUEST_ID_VAR.set(request_id)
        start_ns = time.perf_counter_ns()
        code = None
        try:
            if echo is not None:
                await context.send_initial_metadata(echo)
            return await fn(request, context)
        except BaseException as exc:
            code = code_of_exception(context, exc)
            raise
        finally:
            access(method, request_id, start_ns, code or code_of(context))

    return wrapped


def _async_gen_logged(
    fn: Behaviour, method: str, request_id: str, echo: _Echo, access: _AccessLine | None
) -> Behaviour:
    """An async generator (server stream) with its access line, if any, when it ends."""

    async def wrapped(request: Any, context: Any) -> Any:
        _REQUEST_ID_VAR.set(request_id)
        start_ns = time.perf_counter_ns()
        code = None
        try:
            if echo is not None:
                await context.send_initial_metadata(echo)
            async for response in fn(request, context):
                yield response
        except BaseException as exc:
            code = code_of_exception(context, exc)
            raise
        finally:
            if access is not None:
                access(method, request_id, start_ns, code or code_of(context))

    return wrapped


def _sync_logged(
    fn: Behaviour, method: str, request_id: str, echo: _Echo, access: _AccessLine | None,
    streaming: bool,
) -> Behaviour:
    """A sync handler, run in grpc's thread pool, with its access line, if any."""

    def wrapped(request: Any, context: Any) -> Any:
        # Pool threads keep their context from call to call: bind, then always unbind.
        token = _REQUEST_ID_VAR.set(request_id)
        start_ns = time.perf_counter_ns()
        try:
            if echo is not None:
                context.send_initial_metadata(echo)
            result = fn(request, context)
        except BaseException as exc:
            if access is not None:
                access(method, request_id, start_ns, code_of_exception(context, exc))
            raise
        finally:
            _REQUEST_ID_VAR.reset(token)
        if streaming:
            return _LoggedIterator(result, access, method, request_id, start_ns, context)
        if access is not None:
            access(method, request_id, start_ns, code_of(context))
        return result

    return wrapped


class _LoggedIterator:
    """A sync response stream that writes the access line when it ends."""

    __slots__ = ("_access", "_context", "_it", "_method", "_request_id", "_start_ns")

    def __init__(self, iterable: Any, access: _AccessLine | None, method: str,
                 request_id: str, start_ns: int, context: Any) -> None:
        self._it: Iterator[Any] = iter(iterable)
        self._access = access
        self._method = method
        self._request_id = request_id
        self._start_ns = start_ns
        self._context = context

    def __iter__(self) -> _LoggedIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise

    def _end(self, exc: BaseException | None) -> None:
        if self._access is None:
            return
        code = code_of(self._context) if exc is None else code_of_exception(self._context, exc)
        self._access(self._method, self._request_id, self._start_ns, code)


# -- the access line's own writer -----------------------------------------------------------


class _Sink:
    """Where :func:`configure_logging` sends lines, and whether access lines may skip structlog."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # None: sys.stderr at the time of writing
        self.fast = True                  # JSON lines at level info or below
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)
        os.register_at_fork(before=self.flush)

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            full = self._size >= FLUSH_BYTES
            timed = self._timer_loop is not None and not self._timer_loop.is_closed()
        if full:
            self.flush()
            return
        if timed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread (a sync handler): write now
            self.flush()
            return
        with self._lock:
            if self._timer_loop is None or self._timer_loop.is_closed():
                self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)
                self._timer_loop = loop

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
            timer, self._timer, self._timer_loop = self._timer, None, None
        if timer is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be gone
                timer.cancel()
        if not lines:
            return
        stream = self.stream or sys.stderr
        try:
            stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the lines are dropped
            pass


# Access lines wait at most this long, or until this many bytes are waiting.
FLUSH_INTERVAL_S = 0.1
FLUSH_BYTES = 64 * 1024

_sink = _Sink()


def flush_access_log() -> None:
    """Writes the access lines still buffered (the server does it when it stops)."""
    _sink.flush()


class AccessLog:
    """The access line: the fields structlog would render, by one ``json.dumps``, buffered.

    Falls back to structlog (console text, or a level above info) when
    :func:`configure_logging` set something other than JSON lines at info.
    """

    __slots__ = ("_sec", "_stamp", "_structlog")

    def __init__(self) -> None:
        self._structlog = structlog.get_logger("gateway.access")
        self._sec = -1
        self._stamp = ""

    def info(self, event: str, **fields: Any) -> None:
        if not _sink.fast:
            self._structlog.info(event, **fields)
            return
        reason = _REASON_VAR.get()
        if reason is not None and reason is not Ellipsis:  # structlog's "unset"
            fields.setdefault("reason", reason)
        fields["event"] = event
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        _sink.add(jsonlib.dumps(fields) + "\n")

    def _timestamp(self) -> str:
        """structlog's ``TimeStamper(fmt="iso", utc=True)`` text, its seconds cached."""
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((now - sec) * 1e6):06d}Z"


# -- configuration -------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """True for a field name like a ticket, key, secret, token or authorization."""
    known = _secret_names.get(name)
    if known is None:
        known = name not in _NOT_SECRET and _SECRET_NAME.search(name) is not None
        if len(_secret_names) < 4096:
            _secret_names[name] = known
    return known


def _drop_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key in event_dict:
        if is_secret_name(key):
            event_dict[key] = "[redacted]"
    return event_dict


def _add_user(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    verified = current_claims.get()
    if verified is not None:
        event_dict.setdefault("user", verified.subject)
    return event_dict


def configure_logging(level: str = "info", json: bool = True, stream: TextIO | None = None) -> None:
    """Sets up structlog: one JSON object per line (or console text) on stderr.

    Lines carry the bound request id and the caller's user id when known. ``stream``
    defaults to stderr, leaving stdout to commands' own output.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    _sink.flush()
    _sink.stream = stream
    _sink.fast = json and numeric <= logging.INFO
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_user,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())  # renders exceptions itself
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )

