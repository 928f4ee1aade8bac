"""wasi:http/types and wasi:http/outgoing-handler: fields, requests, responses and bodies.

The guest call of each request (``wasisup.http.handler.GuestCall``) builds an
``IncomingRequest`` and a ``ResponseOutparam``; the outbound client (``wasisup.http.client``) turns an
``OutgoingRequest`` into a ``FutureIncomingResponse``. Bodies meet those two through small
transport objects, so this module holds the WASI semantics and none of the sockets.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Protocol

from ..http.outbound_policy import Refused, check_path_with_query, parse_authority
from .abi import Err, Interface, Ok, Resource
from .io import (
    WRITE_BUDGET, ByteSource, InputStream, Interest, IoError, OutputStream, Pollable, Readiness,
    StreamClosed, StreamFailed, Waiter,
)

# Headers a guest may neither set nor see: they belong to the connection, not the message
# (wasmtime-wasi-http's DEFAULT_FORBIDDEN_HEADERS).
FORBIDDEN_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "transfer-encoding", "upgrade", "host", "http2-settings",
})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_METHODS = ("get", "head", "post", "put", "delete", "connect", "options", "trace", "patch")


def method_case(wire: str) -> Any:
    """``GET`` -> ``"get"``; an extension method -> ``("other", name)``."""
    lower = wire.lower()
    return lower if lower in _METHODS and wire.isupper() else ("other", wire)


def method_wire(case: Any) -> str:
    return case.upper() if isinstance(case, str) else case[1]


def scheme_wire(case: Any) -> str:
    return case.lower() if isinstance(case, str) else case[1]


def scheme_case(wire: str) -> Any:
    return {"http": "HTTP", "https": "HTTPS"}.get(wire, ("other", wire))


# --------------------------------------------------------------------------------------------
# Fields


class Fields(Resource):
    """wasi:http fields (also headers and trailers): names lower-cased, values as bytes."""

    def __init__(self, entries: Optional[dict[str, list[bytes]]] = None,
                 immutable: bool = False) -> None:
        self._entries = entries if entries is not None else {}
        self.immutable = immutable

    @classmethod
    def from_pairs(cls, pairs: list[tuple[bytes, bytes]], immutable: bool = True,
                   strip_forbidden: bool = True) -> "Fields":
        """Fields from the wire (already validated by the HTTP parser)."""
        entries: dict[str, list[bytes]] = {}
        for raw_name, value in pairs:
            name = raw_name.decode("latin-1").lower()
            if strip_forbidden and name in FORBIDDEN_HEADERS:
                continue
            entries.setdefault(name, []).append(value)
        return cls(entries, immutable)

    def pairs(self) -> list[tuple[str, bytes]]:
        return [(name, value) for name, values in self._entries.items() for value in values]

    def first(self, name: str) -> Optional[bytes]:
        values = self._entries.get(name)
        return values[0] if values else None

    def view(self) -> "Fields":
        """An immutable handle on the same entries (what ``headers()`` hands out)."""
        return Fields(self._entries, immutable=True)

    def _mutable(self) -> None:
        if self.immutable:
            raise Err("immutable")

    # -- WIT
    @staticmethod
    def new(store: Any) -> "Fields":
        return Fields()

    @staticmethod
    def from_list(store: Any, entries: list[tuple[str, bytes]]) -> "Fields":
        fields = Fields()
        for name, value in entries:
            fields._entries.setdefault(_settable_name(name), []).append(_checked_value(value))
        return fields

    def get(self, name: str) -> list[bytes]:
        return list(self._entries.get(name.lower(), ()))

    def has(self, name: str) -> bool:
        return name.lower() in self._entries

    # Checks run in wasmtime's order: name, forbidden, then immutability and values.
    def set(self, name: str, values: list[bytes]) -> None:
        key = _settable_name(name)
        self._mutable()
        checked = [_checked_value(v) for v in values]
        if checked:
            self._entries[key] = checked
        else:
            self._entries.pop(key, None)

    def delete(self, name: str) -> None:
        key = _settable_name(name)
        self._mutable()
        self._entries.pop(key, None)

    def append(self, name: str, value: bytes) -> None:
        key = _settable_name(name)
        checked = _checked_value(value)
        self._mutable()
        self._entries.setdefault(key, []).append(checked)

    def entries(self) -> list[tuple[str, bytes]]:
        return self.pairs()

    def clone(self) -> "Fields":
        return Fields({name: list(values) for name, values in self._entries.items()})


def _settable_name(name: str) -> str:
    raw = name.encode("utf-8", "replace")
    if not _TOKEN.match(raw):
        raise Err("invalid-syntax")
    lower = name.lower()
    if lower in FORBIDDEN_HEADERS:
        raise Err("forbidden")
    return lower


def _checked_value(value: bytes) -> bytes:
    if _BAD_VALUE.search(value):
        raise Err("invalid-syntax")
    return value


def _content_length(headers: Fields) -> Optional[int]:
    raw = headers.first("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Bodies


class BodySource(ByteSource, Protocol):
    """A body arriving from the network: bytes, then (maybe) trailers."""

    def trailers(self) -> Optional[list[tuple[bytes, bytes]]]:
        """The trailers, once the body has ended (None if there were none)."""


class Transport(Protocol):
    """Where an outgoing body goes once its message has been sent (the client connection, or
    an upstream exchange). Like a ``ByteSink``, it may offer ``interest()`` and ``deadline``,
    and ``takes_pipe()`` with ``write_from_pipe(pipe, count)``."""

    def ready(self) -> bool: ...

    def capacity(self, limit: int) -> int: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def finish(self, trailers: Optional[Fields]) -> None: ...

    def abort(self) -> None: ...


class BodySink:
    """The guest's end of an outgoing body: held in memory until its message is sent, then
    handed to the transport. Enforces a ``content-length`` the guest declared."""

    def __init__(self, content_length: Optional[int], size_error: str) -> None:
        self.content_length = content_length
        self.size_error = size_error  # HTTP-request-body-size or HTTP-response-body-size
        self.written = 0
        self.transport: Optional[Transport] = None
        self._held: list[bytes] = []
        self._held_size = 0
        self.error: Optional[IoError] = None

    def attach(self, transport: Transport) -> None:
        self.transport = transport
        held, self._held, self._held_size = self._held, [], 0
        for chunk in held:
            transport.write(chunk)

    def ready(self) -> bool:
        if self.transport is not None:
            return self.transport.ready()
        return self._held_size < WRITE_BUDGET

    def interest(self) -> Optional[Interest]:
        hint = getattr(self.transport, "interest", None)
        return hint() if hint else None

    @property
    def deadline(self) -> Optional[int]:
        return getattr(self.transport, "deadline", None)

    def capacity(self, limit: int) -> int:
        if self.error is not None:
            raise StreamFailed(self.error)
        if self.transport is not None:
            return self.transport.capacity(limit)
        return max(0, min(limit, WRITE_BUDGET - self._held_size))

    def write(self, data: bytes | memoryview) -> None:
        self._count(len(data))
        if self.transport is not None:
            self.transport.write(data)
        else:
            self._held.append(bytes(data))
            self._held_size += len(data)

    def takes_pipe(self) -> bool:
        takes_pipe = getattr(self.transport, "takes_pipe", None)
        return takes_pipe is not None and takes_pipe()

    def write_from_pipe(self, pipe: int, count: int) -> None:
        self._count(count)
        self.transport.write_from_pipe(pipe, count)  # type: ignore[union-attr]

    def _count(self, size: int) -> None:
        self.written += size
        if self.content_length is not None and self.written > self.content_length:
            self.error = IoError(f"body exceeds its content-length of {self.content_length}",
                                 (self.size_error, self.written))
            raise StreamFailed(self.error)

    def flush(self) -> None:
        pass


class IncomingBody(Resource):
    """wasi:http incoming-body, of a request from the client or a response from upstream."""

    def __init__(self, source: BodySource, waiter: Waiter) -> None:
        self.source = source
        self.waiter = waiter
        self._streamed = False

    def stream(self) -> InputStream:
        if self._streamed:
            raise Err()
        self._streamed = True
        return InputStream(self.source, self.waiter)

    @staticmethod
    def finish(store: Any, body: "IncomingBody") -> "FutureTrailers":
        return FutureTrailers(body.source, body.waiter)

    def drop(self) -> None:
        if not self._streamed:
            self.source.close()


class FutureTrailers(Resource):
    """wasi:http future-trailers: ready once the rest of the body has been read (and dropped)."""

    def __init__(self, source: BodySource, waiter: Waiter) -> None:
        self.source = source
        self.waiter = waiter
        self._outcome: Any = None
        self._taken = False

    def ready(self) -> bool:
        if self._outcome is None:
            try:
                while self.source.read(WRITE_BUDGET):
                    pass
            except StreamClosed:
                trailers = self.source.trailers()
                self._outcome = Ok(Fields.from_pairs(trailers) if trailers else None)
            except StreamFailed as exc:
                self._outcome = Err(exc.error.http_error_code or ("internal-error", exc.error.message))
        return self._outcome is not None

    def interest(self) -> Optional[Interest]:
        hint = getattr(self.source, "interest", None)
        return hint() if hint else None

    @property
    def deadline(self) -> Optional[int]:
        return getattr(self.source, "deadline", None)

    def subscribe(self) -> Pollable:
        return Pollable(self, self.waiter)

    def get(self) -> Any:
        if self._taken:
            return Err()
        if not self.ready():
            return None
        self._taken = True
        return Ok(self._outcome)


class OutgoingBody(Resource):
    """wasi:http outgoing-body: what the guest writes for a request it sends or its response."""

    def __init__(self, sink: BodySink, waiter: Waiter) -> None:
        self.sink = sink
        self.waiter = waiter
        self._stream_taken = False
        self.state = "open"  # then "finished" (by the guest) or "aborted" (dropped unfinished)
        self.trailers: Optional[Fields] = None

    def write(self) -> OutputStream:
        if self._stream_taken:
            raise Err()
        self._stream_taken = True
        return OutputStream(self.sink, self.waiter)

    @staticmethod
    def finish(store: Any, body: "OutgoingBody", trailers: Optional[Fields]) -> None:
        sink = body.sink
        error = sink.error.http_error_code if sink.error is not None else None
        if error is None and sink.content_length is not None and sink.written != sink.content_length:
            error = (sink.size_error, sink.written)
        if error is not None:
            body.abort()
            raise Err(error)
        body.state, body.trailers = "finished", trailers
        if sink.transport is not None:
            sink.transport.finish(trailers)

    def abort(self) -> None:
        self.state = "aborted"
        if self.sink.transport is not None:
            self.sink.transport.abort()

    def drop(self) -> None:
        if self.state == "open":
            self.abort()


def attach_body(body: OutgoingBody, transport: Transport) -> None:
    """Connect a body to the transport of its now-sent message, catching up on its state."""
    body.sink.attach(transport)
    if body.state == "aborted":
        transport.abort()
    elif body.state == "finished":
        transport.finish(body.trailers)


# --------------------------------------------------------------------------------------------
# Requests and responses


class IncomingMessage(Resource):
    """What incoming requests and responses share: immutable headers and a body taken once."""

    def __init__(self, headers: Fields, body: BodySource, waiter: Waiter) -> None:
        self._headers = headers
        self._body: Optional[IncomingBody] = IncomingBody(body, waiter)

    def headers(self) -> Fields:
        return self._headers.view()

    def consume(self) -> IncomingBody:
        body, self._body = self._body, None
        if body is None:
            raise Err()
        return body

    def drop(self) -> None:
        if self._body is not None:
            self._body.source.close()


class IncomingRequest(IncomingMessage):
    """wasi:http incoming-request: a request from the client, built by the server."""

    def __init__(self, method: str, path_with_query: str, scheme: str, authority: Optional[str],
                 headers: Fields, body: BodySource, waiter: Waiter) -> None:
        super().__init__(headers, body, waiter)
        self._method = method_case(method)
        self._path_with_query = path_with_query
        self._scheme = scheme_case(scheme)
        self._authority = authority

    def method(self) -> Any:
        return self._method

    def path_with_query(self) -> Optional[str]:
        return self._path_with_query

    def scheme(self) -> Any:
        return self._scheme

    def authority(self) -> Optional[str]:
        return self._authority


class OutgoingMessage(Resource):
    """What outgoing requests and responses share: headers and a body taken once."""

    size_error = ""

    def __init__(self, headers: Fields, waiter: Waiter) -> None:
        headers.immutable = True
        self.header_fields = headers
        self.waiter = waiter
        self.outgoing_body: Optional[OutgoingBody] = None

    def headers(self) -> Fields:
        return self.header_fields.view()

    def body(self) -> OutgoingBody:
        if self.outgoing_body is not None:
            raise Err()
        sink = BodySink(_content_length(self.header_fields), self.size_error)
        self.outgoing_body = OutgoingBody(sink, self.waiter)
        return self.outgoing_body


class OutgoingRequest(OutgoingMessage):
    """wasi:http outgoing-request: a request the guest sends upstream."""

    size_error = "HTTP-request-body-size"

    def __init__(self, headers: Fields, waiter: Waiter) -> None:
        super().__init__(headers, waiter)
        self._method: Any = "get"
        self._path_with_query: Optional[str] = None
        self._scheme: Any = None
        self._authority: Optional[str] = None

    @staticmethod
    def new(store: Any, headers: Fields) -> "OutgoingRequest":
        return OutgoingRequest(headers, store.waiter)

    def method(self) -> Any:
        return self._method

    def set_method(self, method: Any) -> None:
        if isinstance(method, tuple) and not _TOKEN.match(method[1].encode()):
            raise Err()
        self._method = method

    def path_with_query(self) -> Optional[str]:
        return self._path_with_query

    def set_path_with_query(self, path: Optional[str]) -> None:
        if path is not None:
            try:
                check_path_with_query(path)
            except Refused:
                raise Err() from None
        self._path_with_query = path

    def scheme(self) -> Any:
        return self._scheme

    def set_scheme(self, scheme: Any) -> None:
        if isinstance(scheme, tuple) and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme[1]):
            raise Err()
        self._scheme = scheme

    def authority(self) -> Optional[str]:
        return self._authority

    def set_authority(self, authority: Optional[str]) -> None:
        if authority is not None:
            try:
                parse_authority(authority)
            except Refused:
                raise Err() from None
        self._authority = authority


class OutgoingResponse(OutgoingMessage):
    """wasi:http outgoing-response: the guest's answer."""

    size_error = "HTTP-response-body-size"

    def __init__(self, headers: Fields, waiter: Waiter) -> None:
        super().__init__(headers, waiter)
        self.status = 200

    @staticmethod
    def new(store: Any, headers: Fields) -> "OutgoingResponse":
        return OutgoingResponse(headers, store.waiter)

    def status_code(self) -> int:
        return self.status

    def set_status_code(self, status: int) -> None:
        if not 100 <= status <= 999:
            raise Err()
        self.status = status


class ResponseOutparam(Resource):
    """wasi:http response-outparam: hands the guest's response (or error) to the server."""

    def __init__(self, deliver: Callable[[Any], None]) -> None:
        self.deliver = deliver

    @staticmethod
    def set(store: Any, param: "ResponseOutparam", response: Any) -> None:
        param.deliver(response)


class RequestOptions(Resource):
    """wasi:http request-options: the guest's timeouts, in nanoseconds."""

    def __init__(self) -> None:
        self.connect: Optional[int] = None
        self.first_byte: Optional[int] = None
        self.between_bytes: Optional[int] = None

    @staticmethod
    def new(store: Any) -> "RequestOptions":
        return RequestOptions()

    def connect_timeout(self) -> Optional[int]:
        return self.connect

    def set_connect_timeout(self, duration: Optional[int]) -> None:
        self.connect = duration

    def first_byte_timeout(self) -> Optional[int]:
        return self.first_byte

    def set_first_byte_timeout(self, duration: Optional[int]) -> None:
        self.first_byte = duration

    def between_bytes_timeout(self) -> Optional[int]:
        return self.between_bytes

    def set_between_bytes_timeout(self, duration: Optional[int]) -> None:
        self.between_bytes = duration


class IncomingResponse(IncomingMessage):
    """wasi:http incoming-response: what upstream answered an outbound request."""

    def __init__(self, status: int, headers: Fields, body: BodySource, waiter: Waiter) -> None:
        super().__init__(headers, body, waiter)
        self._status = status

    def status(self) -> int:
        return self._status


class ResponseSource(Readiness, Protocol):
    """What answers an outbound request: ready (making progress) once the response head
    arrived or the exchange failed. Like any source it may offer ``interest()`` and
    ``deadline``."""

    def outcome(self) -> Any:
        """The ``IncomingResponse``, or ``Err(error-code)``; only once ready."""

    def cancel(self) -> None:
        """The guest dropped the future before taking the response."""


class FutureIncomingResponse(Resource):
    """wasi:http future-incoming-response."""

    def __init__(self, source: ResponseSource, waiter: Waiter) -> None:
        self.source = source
        self.waiter = waiter
        self._taken = False

    def subscribe(self) -> Pollable:
        return Pollable(self.source, self.waiter)

    def get(self) -> Any:
        if self._taken:
            return Err()
        if not self.source.ready():
            return None
        self._taken = True
        outcome = self.source.outcome()
        return Ok(outcome if isinstance(outcome, Err) else Ok(outcome))

    def drop(self) -> None:
        if not self._taken:
            self.source.cancel()


def http_error_code(store: Any, err: IoError) -> Any:
    return err.http_error_code


def handle_outgoing(store: Any, request: OutgoingRequest,
                    options: Optional[RequestOptions]) -> FutureIncomingResponse:
    return store.outbound.send(request, options or RequestOptions(), store.waiter, store.trace)


INTERFACES = [
    Interface("wasi:http/types", resources={
        "fields": Fields, "incoming-request": IncomingRequest, "outgoing-request": OutgoingRequest,
        "request-options": RequestOptions, "response-outparam": ResponseOutparam,
        "incoming-response": IncomingResponse, "incoming-body": IncomingBody,
        "future-trailers": FutureTrailers, "outgoing-response": OutgoingResponse,
        "outgoing-body": OutgoingBody, "future-incoming-response": FutureIncomingResponse,
    }, functions={
        "[constructor]fields": Fields.new,
        "[static]fields.from-list": Fields.from_list,
        "[method]fields.get": Fields.get,
        "[method]fields.has": Fields.has,
        "[method]fields.set": Fields.set,
        "[method]fields.delete": Fields.delete,
        "[method]fields.append": Fields.append,
        "[method]fields.entries": Fields.entries,
        "[method]fields.clone": Fields.clone,
        "[method]incoming-request.method": IncomingRequest.method,
        "[method]incoming-request.path-with-query": IncomingRequest.path_with_query,
        "[method]incoming-request.scheme": IncomingRequest.scheme,
        "[method]incoming-request.authority": IncomingRequest.authority,
        "[method]incoming-request.headers": IncomingRequest.headers,
        "[method]incoming-request.consume": IncomingRequest.consume,
        "[constructor]outgoing-request": OutgoingRequest.new,
        "[method]outgoing-request.body": OutgoingRequest.body,
        "[method]outgoing-request.method": OutgoingRequest.method,
        "[method]outgoing-request.set-method": OutgoingRequest.set_method,
        "[method]outgoing-request.path-with-query": OutgoingRequest.path_with_query,
        "[method]outgoing-request.set-path-with-query": OutgoingRequest.set_path_with_query,
        "[method]outgoing-request.scheme": OutgoingRequest.scheme,
        "[method]outgoing-request.set-scheme": OutgoingRequest.set_scheme,
        "[method]outgoing-request.authority": OutgoingRequest.authority,
        "[method]outgoing-request.set-authority": OutgoingRequest.set_authority,
        "[method]outgoing-request.headers": OutgoingRequest.headers,
        "[constructor]request-options": RequestOptions.new,
        "[method]request-options.connect-timeout": RequestOptions.connect_timeout,
        "[method]request-options.set-connect-timeout": RequestOptions.set_connect_timeout,
        "[method]request-options.first-byte-timeout": RequestOptions.first_byte_timeout,
        "[method]request-options.set-first-byte-timeout": RequestOptions.set_first_byte_timeout,
        "[method]request-options.between-bytes-timeout": RequestOptions.between_bytes_timeout,
        "[method]request-options.set-between-bytes-timeout":
            RequestOptions.set_between_bytes_timeout,
        "[static]response-outparam.set": ResponseOutparam.set,
        "[method]incoming-response.status": IncomingResponse.status,
        "[method]incoming-response.headers": IncomingResponse.headers,
        "[method]incoming-response.consume": IncomingResponse.consume,
        "[method]incoming-body.stream": IncomingBody.stream,
        "[static]incoming-body.finish": IncomingBody.finish,
        "[method]future-trailers.subscribe": FutureTrailers.subscribe,
        "[method]future-trailers.get": FutureTrailers.get,
        "[constructor]outgoing-response": OutgoingResponse.new,
        "[method]outgoing-response.status-code": OutgoingResponse.status_code,
        "[method]outgoing-response.set-status-code": OutgoingResponse.set_status_code,
        "[method]outgoing-response.headers": OutgoingResponse.headers,
        "[method]outgoing-response.body": OutgoingResponse.body,
        "[method]outgoing-body.write": OutgoingBody.write,
        "[static]outgoing-body.finish": OutgoingBody.finish,
        "[method]future-incoming-response.subscribe": FutureIncomingResponse.subscribe,
        "[method]future-incoming-response.get": FutureIncomingResponse.get,
        "http-error-code": http_error_code,
    }),
    Interface("wasi:http/outgoing-handler", functions={"handle": handle_outgoing}),
]
