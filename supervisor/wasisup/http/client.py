"""Outbound HTTP for guests (wasi:http/outgoing-handler), on the guest's own thread.

``OutboundClient.send`` checks a guest's request and starts an ``Exchange``: one HTTP/1.1
request/response over a pooled (or new) non-blocking upstream connection. An exchange has no
thread of its own: it advances whenever the guest looks at it (polls the response future,
writes the request body, reads the response body) or is about to sleep, and it tells the
guest's ``poll`` which socket and deadline to sleep on. The request is framed by hand
(``framing``); llhttp parses the response head and chunked bodies (``response_parser``); a body
with a content-length is read straight from the socket, so a splice moves it in large pieces.
A connection whose exchange ended cleanly goes back to the pool. Failures become the wasi:http
``error-code`` wasmtime would give the guest.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from ..metrics import ORIGINS_PER_WORKER, method_label
from ..tracing import Exporter, Trace, new_span_id
from ..wasi.abi import Err
from ..wasi.http import (
    Fields, FutureIncomingResponse, IncomingResponse, OutgoingRequest, RequestOptions,
    attach_body, method_wire, scheme_wire,
)
from ..wasi.io import READABLE, WRITABLE, Interest, IoError, StreamClosed, StreamFailed, Waiter
from .framing import chunk, field_lines, last_chunk
from .outbound_policy import OutboundPolicy, Refused, Target, parse_target
from .pool import ConnectFailed, Pool, UpstreamConnection
from .response_parser import ResponseParser, UpstreamHead, UpstreamProtocolError

log = logging.getLogger("wasisup.outbound")

DEFAULT_TIMEOUT_NS = 600 * 10**9  # wasmtime's default for every request-options timeout
RECV_SIZE = 256 * 1024
# While the head is awaited, reads are small: what follows it is better left in the socket for
# the body to be read straight into a splice's buffer than copied through the parser.
HEAD_RECV_SIZE = 16 * 1024
# Request body the exchange holds before the guest must wait for the upstream to take it.
SEND_BUFFER = 256 * 1024
# A request whose framed bytes fit in this much is kept until the response starts, so it can
# be replayed once on a new connection if a pooled one turns out to be closed.
REPLAY_LIMIT = 64 * 1024


class OutboundClient:
    """Sends guest requests where ``policy`` allows, to exactly the host and port it checked."""

    def __init__(self, policy: OutboundPolicy = OutboundPolicy(), pool: Optional[Pool] = None,
                 metrics: Any = None, exporter: Optional[Exporter] = None) -> None:
        self.policy = policy
        self.pool = pool or Pool()
        self.metrics = metrics
        self.exporter = exporter
        self._origins: set[str] = set()  # those with a label of their own

    def send(self, request: OutgoingRequest, options: RequestOptions, waiter: Waiter,
             trace: Optional[Trace] = None) -> FutureIncomingResponse:
        """wasi:http/outgoing-handler.handle: check the request now, then start the exchange
        (in a span of ``trace``, the inbound request's, if given)."""
        target = None
        try:
            target = parse_target(scheme_wire(request.scheme() or "HTTPS"), request.authority())
            self.policy.check(target)
        except Refused as exc:
            self.ended(method_wire(request.method()), target, 0.0, error=exc.error_code)
            raise Err(exc.error_code) from None
        exchange = Exchange(self, target, request, options, waiter, trace)
        return FutureIncomingResponse(exchange.head, waiter)

    # -- what exchanges report
    def ended(self, method: str, target: Optional[Target], seconds: float, status: int = 0,
              error: Any = None, trace: Optional[Trace] = None, span_id: str = "",
              path: str = "") -> None:
        """An outbound request got its response head (``status``) or failed (``error``, the
        wasi:http error-code) after ``seconds``."""
        error_type = _code_name(error) if error is not None else ""
        if self.metrics is not None:
            self.metrics.child(self.metrics.outbound_duration, method_label(method),
                               self._origin(target), str(status) if status else "",
                               error_type).observe(seconds)
        if self.exporter is not None and trace is not None and target is not None:
            self.exporter.client_span(trace, span_id, seconds, method, target, path, status,
                                      error_type)

    def body_failed(self, target: Target, code: Any) -> None:
        if self.metrics is not None:
            self.metrics.outbound_body_errors.labels(self._origin(target), _code_name(code)).inc()

    def _origin(self, target: Optional[Target]) -> str:
        """The origin label: scheme://host:port for the first ORIGINS_PER_WORKER, then "other"."""
        if target is None:
            return "other"
        host = f"[{target.host}]" if ":" in target.host else target.host
        origin = f"{target.scheme}://{host}:{target.port}"
        if origin not in self._origins:
            if len(self._origins) >= ORIGINS_PER_WORKER:
                return "other"
            self._origins.add(origin)
        return origin

    def close(self) -> None:
        self.pool.close()


def _code_name(code: Any) -> str:
    """The case of a wasi:http error-code (without its payload)."""
    return code if isinstance(code, str) else code[0]


def _with_trace_fields(headers: list[tuple[str, bytes]], trace: Trace,
                       span_id: str) -> list[tuple[str, bytes]]:
    """The guest's headers with the trace's: its traceparent always, its tracestate unless the
    guest set one."""
    guest_state = any(name == "tracestate" for name, _ in headers)
    return [*((name, value) for name, value in headers if name != "traceparent"),
            *((name, value) for name, value in trace.outbound_fields(span_id)
              if name == "traceparent" or not guest_state)]


def _ns(value: Optional[int]) -> int:
    return value if value is not None else DEFAULT_TIMEOUT_NS


class Exchange:
    """One outbound request and its response, advanced by whoever looks at it.

    The guest sees it through three views: ``head`` (its future's source), ``request_body``
    (the transport of the request's outgoing-body) and ``response_body`` (the source of the
    response's incoming-body).
    """

    def __init__(self, client: OutboundClient, target: Target, request: OutgoingRequest,
                 options: RequestOptions, waiter: Waiter, trace: Optional[Trace] = None) -> None:
        self.client = client
        self.pool = pool = client.pool
        self.target = target
        self.waiter = waiter
        self.method = method_wire(request.method())
        self._target = request.path_with_query() or "/"
        self._headers = request.header_fields.pairs()
        self.trace, self.span_id = trace, ""
        if trace is not None:
            self.span_id = new_span_id()
            self._headers = _with_trace_fields(self._headers, trace, self.span_id)
        self._connect_ns = _ns(options.connect)
        self._first_byte_ns = _ns(options.first_byte)
        self._between_bytes_ns = _ns(options.between_bytes)
        self._started = self._began = time.monotonic_ns()  # (the former is a replay's)
        self.conn: Optional[UpstreamConnection] = None
        self._connected_at = 0
        self._parser = ResponseParser()
        self.error: Any = None  # the error-code the exchange failed with
        # the request
        self._head_sent = False
        self._request_done = False  # every byte of the request is framed
        self._held = bytearray()  # body written before the head went out
        self._chunked = False
        self._out = bytearray()  # framed, not yet sent
        self._replay: Optional[bytearray] = bytearray()  # all framed bytes, while replayable
        self.body_state = "none"  # the guest's body: -> "open" -> "finished" | "aborted"
        self._body_length = 0
        self._trailers: Optional[Fields] = None
        # the response
        self.response: Optional[IncomingResponse] = None
        self._received_any = False
        self._keep_alive = False
        self._until_close = False  # the body ends when the upstream closes the connection
        self._raw_left: Optional[int] = None  # bytes of a content-length body still to read
        self.buffer = bytearray()
        self.eof = False
        self.body_error: Optional[IoError] = None
        self.response_trailers: Optional[list[tuple[bytes, bytes]]] = None
        self._last_progress = 0

        self.head = ResponseHead(self)
        self.request_body = RequestBody(self)
        self.response_body = ResponseBody(self)
        try:
            self.conn = pool.connect(target)
        except ConnectFailed as exc:
            self.fail(exc.code, str(exc))
            return
        if self.conn.open:
            self._connected_at = self._started
        if request.outgoing_body is not None:
            self.body_state = "open"
            attach_body(request.outgoing_body, self.request_body)
        waiter.before_sleep.append(self.flush)

    # -- the request
    def _frame(self, *parts: bytes | memoryview) -> None:
        for data in parts:
            self._out += data
            if self._replay is not None:
                if len(self._replay) + len(data) <= REPLAY_LIMIT:
                    self._replay += data
                else:
                    self._replay = None

    def _frame_head(self) -> None:
        """The head, once the body is known or big enough: a finished body goes with a
        content-length (none when empty), one still being written is chunked."""
        self._head_sent = True
        headers = [("host", self.target.authority.encode()), *self._headers]
        declared = any(name == "content-length" for name, _ in self._headers)
        if self.body_state in ("open", "aborted") and not declared:
            headers.append(("transfer-encoding", b"chunked"))
            self._chunked = True
        elif self.body_state == "finished" and not declared and self._body_length:
            headers.append(("content-length", b"%d" % self._body_length))
        self._frame(b"%s %s HTTP/1.1\r\n" % (self.method.encode(), self._target.encode()),
                    field_lines(headers), b"\r\n")
        held, self._held = self._held, bytearray()
        if held:
            self._frame_body(held)
        if self.body_state in ("none", "finished"):
            self._frame_end()

    def _frame_body(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self._chunked:
            self._frame(*chunk(data))
        else:
            self._frame(data)

    def _frame_end(self) -> None:
        self._request_done = True
        if self._chunked:
            self._frame(last_chunk(self._trailers.pairs() if self._trailers is not None else []))

    def write_body(self, data: bytes | memoryview) -> None:
        self._body_length += len(data)
        if self._head_sent:
            self._frame_body(data)
        else:
            self._held += data
        self.advance(send_head=len(self._held) >= SEND_BUFFER)

    def finish_body(self, trailers: Optional[Fields]) -> None:
        self.body_state, self._trailers = "finished", trailers
        if self._head_sent:
            self._frame_end()
        self.advance(send_head=True)

    def abort_body(self) -> None:
        """The guest dropped the body unfinished: the request must fail, not end short."""
        self.body_state = "aborted"
        if self.response is None:
            self.fail(("internal-error", "the guest dropped the request body without finishing it"))
        else:
            self.discard()

    def unsent(self) -> int:
        return len(self._out) + len(self._held)

    # -- progress
    def flush(self) -> None:
        """The guest is about to sleep: put the request on the wire as far as it goes."""
        self.advance(send_head=True)

    def advance(self, send_head: bool = True) -> None:
        """Do whatever I/O is possible now, without blocking; fail on a passed deadline."""
        if self.error is not None or self.conn is None:
            return
        try:
            if not self._connected_at:
                if not self.conn.establish():
                    if time.monotonic_ns() - self._started > self._connect_ns:
                        self.fail("connection-timeout")
                    return
                self._connected_at = time.monotonic_ns()
            if not self._head_sent and (send_head or self.body_state != "open"):
                self._frame_head()
            while self._out:
                sent = self.conn.send(memoryview(self._out))
                if not sent:
                    break
                del self._out[:sent]
            if self.response is None and self._head_sent:
                self._receive_head()
        except ConnectFailed as exc:
            self.fail(exc.code, str(exc))
        except OSError as exc:
            self._broken(exc)
        if self._request_done and not self._out or self.error is not None:
            self._stop_flushing()

    def _receive_head(self) -> None:
        while self.response is None and self.error is None:
            if not self._receive():
                if (self.conn is not None and self._connected_at
                        and time.monotonic_ns() - self._connected_at > self._first_byte_ns):
                    self.fail("connection-read-timeout")
                return  # (or a replay on a new connection started)

    def _receive(self) -> bool:
        """Parse what the socket has now; False if nothing was there (or the exchange ended)."""
        data = self.conn.recv(HEAD_RECV_SIZE if self.response is None else RECV_SIZE)
        if data is None:
            return False
        if not data:
            self._upstream_closed()
            return False
        self._received_any = True
        try:
            self._parser.feed(data)
            broken = None
        except UpstreamProtocolError as exc:
            broken = exc  # (a head that came whole before the break is still the answer)
        if self.response is None and self._parser.head is not None and self.error is None:
            self._start_response(self._parser.head)
        self._take_parsed_body()
        if broken is None:
            return True
        if self.response is None:
            self.fail("HTTP-protocol-error", str(broken))
        else:
            self._body_failed(f"the upstream's response body is malformed: {broken}")
        return False

    def _upstream_closed(self) -> None:
        if self.response is None:
            if not self._received_any and self._may_replay():
                self._replay_on_new_connection()
            else:
                self.fail("HTTP-protocol-error", "the upstream closed the connection without a "
                          "complete response head")
        elif self._until_close:
            self.eof = True
            self.discard()
        else:
            self._body_failed("the upstream closed the connection before the body ended")

    def _take_parsed_body(self) -> None:
        """Move the body bytes the parser read into the body buffer (chunked, or until close)."""
        parser = self._parser
        if self.response is None or self._raw_left is not None or self.eof:
            return
        if parser.body:
            self.buffer += parser.body
            parser.body.clear()
            self._last_progress = time.monotonic_ns()
        if parser.complete:
            self.eof = True
            self.response_trailers = parser.trailers or None
            if parser.extra:
                self._keep_alive = False
            self.release_if_done()

    def _start_response(self, head: UpstreamHead) -> None:
        self._replay = None
        framing = _framing_fields(head.fields)
        parser = self._parser
        leftover = bytes(parser.body)  # body bytes that came with the head
        parser.body.clear()
        self._keep_alive = head.http_version == "1.1" and b"close" not in framing["connection"]
        coding, length = framing["transfer-encoding"], framing["content-length"]
        if self.method == "HEAD" or head.status in (101, 204, 304):
            self.eof = True
            if leftover or parser.extra or head.status == 101:  # not a plain HTTP/1.1 ending
                self._keep_alive = False
        else:
            if coding:
                self._until_close = coding.rpartition(b",")[2].strip() != b"chunked"
            elif length:
                if parser.extra:  # more bytes than it declared (hyper fails these too)
                    self.fail("HTTP-protocol-error", "more bytes than the declared content-length")
                    return
                self._raw_left = int(length) - len(leftover)
                self.eof = self._raw_left == 0
            else:
                self._until_close = True
            if self._until_close or coding and length:  # the latter: a suspect message
                self._keep_alive = False
            self.buffer += leftover
        self._last_progress = time.monotonic_ns()
        fields = head.fields
        if coding and length:  # RFC 9112 6.3: the coding frames the body; its length is void
            fields = [(name, value) for name, value in fields if name.lower() != b"content-length"]
        self.response = IncomingResponse(head.status, Fields.from_pairs(fields),
                                         self.response_body, self.waiter)
        self._ended(status=head.status)
        self.release_if_done()

    # -- the response body
    def take(self, size: int) -> bytes:
        """Up to ``size`` body bytes available now (b"" if none yet)."""
        if not self.buffer:
            self._fill()
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        if chunk:
            self._last_progress = time.monotonic_ns()
            self.release_if_done()
        return chunk

    def _raw(self) -> bool:
        """Do the next body bytes come straight from the socket (known length, none buffered)?"""
        return not self.buffer and bool(self._raw_left) and self.conn is not None

    def take_into(self, view: memoryview) -> int:
        """Like ``take``, straight into ``view`` when the body comes raw from the socket."""
        if not self._raw():
            chunk = self.take(len(view))
            view[:len(chunk)] = chunk
            return len(chunk)
        return self._read_raw(self.conn.recv_into, view[:self._raw_left])

    def can_splice(self) -> bool:
        """Can the next body bytes go socket -> pipe in the kernel (raw, and no TLS)?"""
        return self._raw() and self.conn.plain

    def splice_into(self, pipe: int, size: int) -> int:
        """Like ``take_into``, into ``pipe`` without passing through Python (see can_splice)."""
        return self._read_raw(self.conn.splice_into, pipe, min(size, self._raw_left))

    def _read_raw(self, read: Any, *args: Any) -> int:
        try:
            count = read(*args)
        except OSError as exc:
            self._body_failed(f"reading the upstream response failed: {exc}")
            return 0
        if count is None:
            self._check_between_bytes()
            return 0
        if count == 0:
            self._body_failed("the upstream closed the connection before the body ended")
            return 0
        self._raw_left -= count
        self.eof = self._raw_left == 0
        self._last_progress = time.monotonic_ns()
        self.release_if_done()
        return count

    def _fill(self) -> None:
        """Move what the socket has into the body buffer."""
        if self.eof or self.body_error is not None or self.conn is None:
            return
        if self._raw_left is not None:
            data = self.conn.recv(min(RECV_SIZE, self._raw_left)) if self._raw_left else b""
            if data is None:
                self._check_between_bytes()
            elif not data:
                self._body_failed("the upstream closed the connection before the body ended")
            else:
                self._raw_left -= len(data)
                self.eof = self._raw_left == 0
                self.buffer += data
            return
        try:
            while not self.buffer and not self.eof and self.body_error is None:
                if not self._receive():
                    if self.body_error is None and not self.eof:
                        self._check_between_bytes()
                    return
        except OSError as exc:
            self._body_failed(f"reading the upstream response failed: {exc}")

    def body_available(self) -> bool:
        if not self.buffer:
            self._fill()
        return bool(self.buffer) or self.eof or self.body_error is not None

    def _check_between_bytes(self) -> None:
        if time.monotonic_ns() - self._last_progress > self._between_bytes_ns:
            self._body_failed("no bytes from the upstream within the between-bytes timeout",
                              "connection-read-timeout")

    def _body_failed(self, message: str, code: Any = "HTTP-response-incomplete") -> None:
        self.body_error = IoError(message, code)
        self.client.body_failed(self.target, code)
        self.discard()

    # -- what the guest's poll sleeps on
    def interest(self) -> Optional[Interest]:
        if self.conn is None or self.error is not None:
            return None
        if not self._connected_at:
            return self.conn.fileno(), self.conn.wants()
        events = WRITABLE if self._out else 0
        if self.response is None or not self.eof:
            events |= READABLE
        return self.conn.fileno(), events

    @property
    def deadline(self) -> Optional[int]:
        if self.conn is None or self.error is not None:
            return None
        if not self._connected_at:
            return self._started + self._connect_ns
        if self.response is None:
            return self._connected_at + self._first_byte_ns
        return self._last_progress + self._between_bytes_ns

    # -- endings
    def _may_replay(self) -> bool:
        """A pooled connection the upstream had closed: nothing was answered, and every byte
        of the request is still at hand."""
        return (self.conn is not None and self.conn.reused and self._replay is not None
                and self.body_state in ("none", "finished") and not self._received_any)

    def _replay_on_new_connection(self) -> None:
        replay = bytes(self._replay)
        self.discard()
        self._started = time.monotonic_ns()
        self._connected_at = 0
        try:
            self.conn = self.pool.connect_new(self.target)
        except ConnectFailed as exc:
            self.fail(exc.code, str(exc))
            return
        if self.conn.open:
            self._connected_at = self._started
        self._out = bytearray(replay)

    def _broken(self, exc: OSError) -> None:
        if self._may_replay():
            self._replay_on_new_connection()
            return
        self.fail("connection-terminated" if self.response is None else "HTTP-response-incomplete",
                  str(exc))

    def fail(self, code: Any, detail: str = "") -> None:
        if self.error is None and self.response is None:
            log.debug("outbound %s %s failed: %s %s", self.method, self.target, code, detail)
            self.error = code
            self._ended(error=code)
        elif self.response is not None and self.body_error is None and not self.eof:
            self._body_failed(f"the upstream exchange failed: {detail or code}", code)
        self.discard()

    def _ended(self, status: int = 0, error: Any = None) -> None:
        self.client.ended(self.method, self.target, (time.monotonic_ns() - self._began) / 1e9,
                          status, error, self.trace, self.span_id, self._target)

    def discard(self) -> None:
        """Close the connection (it is not reusable) and stop working on this exchange."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._stop_flushing()

    def _stop_flushing(self) -> None:
        try:
            self.waiter.before_sleep.remove(self.flush)
        except ValueError:
            pass

    def release_if_done(self) -> None:
        """Return the connection to the pool once both messages are complete and consumed."""
        if (self.conn is not None and self.eof and not self.buffer and self._keep_alive
                and self._request_done and not self._out):
            conn, self.conn = self.conn, None
            self.pool.release(conn)
            self._stop_flushing()


def _framing_fields(fields: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The fields that frame a response, lower-cased, a repeated one joined with commas."""
    found = {"content-length": b"", "transfer-encoding": b"", "connection": b""}
    for raw_name, value in fields:
        name = raw_name.decode("latin-1").lower()
        if name in found:
            found[name] = (found[name] + b"," + value if found[name] else value).lower()
    return found


class ResponseHead:
    """The future's source: ready once the response head arrived or the exchange failed."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def ready(self) -> bool:
        self.exchange.advance()
        return self.exchange.response is not None or self.exchange.error is not None

    def interest(self) -> Optional[Interest]:
        return self.exchange.interest()

    @property
    def deadline(self) -> Optional[int]:
        return self.exchange.deadline

    def outcome(self) -> Any:
        exchange = self.exchange
        return exchange.response if exchange.response is not None else Err(exchange.error)

    def cancel(self) -> None:
        self.exchange.discard()


class RequestBody:
    """The transport of the request's outgoing-body."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def ready(self) -> bool:
        return self.exchange.error is not None or self.capacity(1) > 0

    def capacity(self, limit: int) -> int:
        exchange = self.exchange
        if exchange.error is not None:
            raise StreamFailed(IoError(f"the request failed: {exchange.error}", exchange.error))
        if exchange.unsent() >= SEND_BUFFER:
            exchange.advance()
        return max(0, min(limit, SEND_BUFFER - exchange.unsent()))

    def write(self, data: bytes | memoryview) -> None:
        self.exchange.write_body(data)

    def finish(self, trailers: Optional[Fields]) -> None:
        self.exchange.finish_body(trailers)

    def abort(self) -> None:
        self.exchange.abort_body()

    def interest(self) -> Optional[Interest]:
        return self.exchange.interest()

    @property
    def deadline(self) -> Optional[int]:
        return self.exchange.deadline


class ResponseBody:
    """The source of the response's incoming-body."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def ready(self) -> bool:
        return self.exchange.body_available()

    def read(self, size: int) -> bytes:
        chunk = self.exchange.take(size)
        return chunk or self._end_or_nothing()

    def read_into(self, view: memoryview) -> int:
        count = self.exchange.take_into(view)
        return count or len(self._end_or_nothing())

    def splice_into(self, pipe: int, size: int) -> Optional[int]:
        if not self.exchange.can_splice():
            return None
        count = self.exchange.splice_into(pipe, size)
        return count or len(self._end_or_nothing())

    def _end_or_nothing(self) -> bytes:
        exchange = self.exchange
        if exchange.body_error is not None:
            raise StreamFailed(exchange.body_error)
        if exchange.eof and not exchange.buffer:
            raise StreamClosed()
        return b""

    def trailers(self) -> Optional[list[tuple[bytes, bytes]]]:
        return self.exchange.response_trailers

    def close(self) -> None:
        """The guest dropped the body: a connection with unread bytes cannot be reused."""
        exchange = self.exchange
        if exchange.eof and not exchange.buffer:
            exchange.release_if_done()
        exchange.discard()

    def interest(self) -> Optional[Interest]:
        return self.exchange.interest()

    @property
    def deadline(self) -> Optional[int]:
        return self.exchange.deadline
