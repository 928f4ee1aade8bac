"""HTTP/2 (RFC 9113): a client connection's streams, each a request for a guest call.

A ``Session`` owns a ``Connection`` whose TLS handshake chose ``h2`` by ALPN, or that opened
with the connection preface on a listener where h2c is on. It sits between the socket and h2's
state machine (sans-I/O, as h11 is), on the loop that accepted the connection: it reads frames,
hands each complete request head to the loop as a ``Stream``, feeds the stream's body, and puts
what the streams write on the wire within both peers' flow-control windows.

A ``Stream`` is what a guest call needs of its client (``GuestCall`` and ``ResponseWriter`` use
it as they use an HTTP/1.1 ``Connection``): the request body as a byte source, the response as
a sink. What a stream waits for is not a socket but news from the session (data, the end of the
body, a window opening, a reset), so its key is a loop signal the session raises.

Limits on HTTP/2's own attack surface: streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS,
at most the loop's admission limit), header lists (HPACK's decoded size, and the request limits
HTTP/1.1 has), CONTINUATION frames (h2 refuses a header block of more than 64), frames that cost
work but carry no request — SETTINGS, PING, PRIORITY, empty DATA, streams the client resets
(rapid reset, CVE-2023-44487) — from a budget that refills with time, past which the connection
gets a GOAWAY (ENHANCE_YOUR_CALM); while the client does not read what the session must send,
it reads nothing more from it.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ..loop import CLOSED, IN, OUT, Loop
from ..wasi.io import READABLE, Interest, IoError, StreamClosed, StreamFailed
from .connection import OUT_HIGH_WATER, Connection, MinDataRate, declared_length, take
from .request_head import (BadRequest, Limits, RequestHead, check_authority,
                           check_content_length, check_fields, clean_trailers, host_field)

log = logging.getLogger("wasisup.http2")

# The connection's receive window: what all of its streams' bodies may hold unread at once.
CONNECTION_WINDOW = 4 * 1024 * 1024
# Frames a client may send that cost work but carry no request (and streams it resets): at
# once, and per second after that.
FLOOD_BURST = 1000
FLOOD_RATE = 100.0
READ_BUDGET = 256 * 1024  # bytes read per turn, so one connection does not hold the loop
# Response fields that belong to an HTTP/1.1 connection, not to an HTTP/2 stream (RFC 9113 8.2.2).
CONNECTION_FIELDS = frozenset({"connection", "keep-alive", "proxy-connection",
                               "transfer-encoding", "upgrade", "te"})
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")


@dataclass(frozen=True)
class Http2Settings:
    """What the server advertises and allows on an HTTP/2 connection (gunicorn's names)."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384
    max_header_list_size: int = 65536


class Session:
    """One HTTP/2 connection on its loop, from the preface to the last frame."""

    def __init__(self, conn: Connection, loop: Loop, settings: Http2Settings, max_streams: int,
                 on_request: Callable[["Stream", RequestHead], None],
                 on_end: Callable[[Connection], None], metrics: Any = None) -> None:
        self.conn = conn
        self.metrics = metrics
        self.loop = loop
        self.limits = conn.limits
        self.on_request = on_request  # a stream's request head is complete
        self.on_end = on_end  # the session is over: the loop sends what is left and closes
        self.streams: dict[int, Stream] = {}  # those with a guest call, or a response to send
        self.blocked: set[Stream] = set()  # those waiting for a window or for room to write
        self.draining = False  # a GOAWAY went out: no new streams
        self.ended = False
        self._budget = float(FLOOD_BURST)
        self._refilled = time.monotonic()
        self._armed = 0
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        codes = h2.settings.SettingCodes
        self.h2.update_settings({  # (in force once the client acknowledges them, RFC 9113 6.5.3)
            codes.MAX_CONCURRENT_STREAMS: min(settings.max_concurrent_streams, max_streams),
            codes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            codes.MAX_FRAME_SIZE: settings.max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        })
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        conn.state = "h2"
        conn.idle_since = time.monotonic()

    def start(self) -> None:
        self._on_event(IN)

    # -- the socket
    def _on_event(self, events: int) -> None:
        self._armed = 0
        if events & (IN | CLOSED) and not self.ended:
            self._read()
        self.flush()

    def _read(self) -> None:
        conn, got = self.conn, 0
        while got < READ_BUDGET and len(conn.out) < OUT_HIGH_WATER and not self.ended:
            data = conn.recv()
            if data is None:
                return
            if not data:
                self._lost("the client closed the connection")
                return
            got += len(data)
            conn.out += self.h2.data_to_send()  # (h2 drops what it holds when a GOAWAY comes)
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:  # (h2 put a GOAWAY out)
                log.info("%s: HTTP/2 protocol error: %s", conn.peer, exc)
                self._count_goaway(exc.error_code)
                self._lost(f"HTTP/2 protocol error: {exc}")
                return
            for event in events:
                self._handle(event)

    def flush(self) -> None:
        """Put what h2 has ready on the wire; watch the socket for what comes next."""
        conn = self.conn
        data = self.h2.data_to_send()
        if data:
            conn.out += data
        was_full = len(conn.out) >= OUT_HIGH_WATER
        try:
            conn.flush()
        except OSError:
            self._lost("the connection broke")
        if self.ended:
            return
        if was_full and len(conn.out) < OUT_HIGH_WATER:
            self._signal_writers()
        if self.draining and not self.streams:
            self._end()
            return
        wanted = CLOSED | (IN if len(conn.out) < OUT_HIGH_WATER else 0) | (OUT if conn.out else 0)
        if conn.out:
            conn.writing.waiting(time.monotonic())
        else:
            conn.writing.reset()
        if wanted != self._armed:
            self._armed = wanted
            self.loop.watch(conn.fd, wanted, self._on_event)

    def room(self) -> int:
        return max(0, OUT_HIGH_WATER - len(self.conn.out))

    # -- what the client sent
    def _handle(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.trailers_received(clean_trailers(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.finished:
                self._spend()
                if self.metrics is not None:
                    self.metrics.http2_client_resets.inc()
                stream.lost("the client reset the stream")
                if stream.call_over:
                    self._forget(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_opened()
            else:
                self._signal_writers()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._spend()
            self._signal_writers()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code != ErrorCodes.NO_ERROR:
                self._lost(f"the client ended the connection ({event.error_code!r})")
                return
            # A graceful GOAWAY (a proxy draining its connections): no new streams, the open
            # ones are answered. h2 would send nothing more: its state machine is reopened.
            self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
            self.draining = True
        elif isinstance(event, (h2.events.PingReceived, h2.events.PriorityUpdated,
                                h2.events.UnknownFrameReceived)):
            self._spend()

    def _spend(self) -> None:
        """A frame that carries no request: from the budget, or the connection is a flood."""
        now = time.monotonic()
        self._budget = min(FLOOD_BURST, self._budget + (now - self._refilled) * FLOOD_RATE) - 1
        self._refilled = now
        if self._budget < 0 and not self.ended:
            log.warning("%s: too many HTTP/2 control frames or reset streams: GOAWAY",
                        self.conn.peer)
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._count_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            self._lost("a flood of HTTP/2 control frames or resets")

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.draining:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)  # (safe to retry)
            return
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        if event.stream_ended:
            stream.body.ended()
        try:
            head = request_head(event.headers, self.limits)
        except BadRequest as exc:
            stream.refuse(exc.status, exc.reason)
            return
        self.conn.requests += 1
        stream.request_head = head
        stream.body.expects_continue = any(
            name == b"expect" and value.lower() == b"100-continue" for name, value in head.fields)
        self.on_request(stream, head)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.call_over:  # (answered already: the bytes go unread)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if not event.data and not event.stream_ended:
            self._spend()
        padding = event.flow_controlled_length - len(event.data)
        if padding:
            self.h2.acknowledge_received_data(padding, event.stream_id)
        stream.body.received_data(event.data)
        if event.stream_ended:
            stream.body.ended()

    def _signal_writers(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for stream in blocked:
            stream.window_opened()

    # -- the streams' ends
    def finish(self, stream: "Stream") -> None:
        """A stream's guest call is over: the rest of its response goes out as the windows
        allow, then the stream is done; a body the guest left unread is refused."""
        stream.call_over = True
        self.loop.forget(stream.fd)
        unread = stream.body.unacknowledged()
        if unread:
            self.h2.acknowledge_received_data(unread, stream.stream_id)
        if stream.broken and not stream.finished:
            self.abort(stream)
        elif not stream.lost_reason:
            stream.push()
        if stream.finished or stream.lost_reason:
            self._forget(stream)
        self.flush()

    def stream_sent(self, stream: "Stream") -> None:
        """A stream's response went out whole: if the client is still sending a body nobody
        reads, tell it to stop (RFC 9113 8.1)."""
        if not stream.body.done:
            self._reset(stream.stream_id, ErrorCodes.NO_ERROR)
        if stream.call_over:
            self._forget(stream)

    def abort(self, stream: "Stream") -> None:
        """A response cut short: the client sees the stream reset, not a complete body."""
        if not stream.lost_reason:
            self._reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
            stream.lost("the response was cut short")

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass  # (closed on both sides already)

    def _forget(self, stream: "Stream") -> None:
        self.blocked.discard(stream)
        if self.streams.pop(stream.stream_id, None) is not None and not self.streams:
            self.conn.idle_since = time.monotonic()

    # -- the session's end
    def go_away(self) -> None:
        """A graceful stop: no new streams (a GOAWAY naming the last one taken); those open
        finish, then the connection closes. (Written past h2, whose state machine would stop
        the open streams too.)"""
        if self.draining or self.ended:
            return
        self.draining = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.conn.out += self.h2.data_to_send() + frame.serialize()  # (after h2's own frames)
        self._count_goaway(ErrorCodes.NO_ERROR)
        self.flush()

    def _count_goaway(self, code: int) -> None:
        if self.metrics is not None:
            try:
                name = ErrorCodes(code).name.lower()
            except ValueError:
                name = "unknown"
            self.metrics.child(self.metrics.http2_goaways, name).inc()

    def sweep(self, now: float) -> None:
        """The deadlines: a connection without streams is idle (for the keep-alive time, or
        the header timeout until its first request); output the client does not take."""
        if self.ended:
            return
        if self.conn.out and self.conn.writing.expired(now):
            self._lost("the client reads too slowly")
            return
        for stream in list(self.streams.values()):
            if stream.call_over and stream.writing.expired(now):
                log.info("%s: cutting off stream %d: its window stays shut", self.conn.peer,
                         stream.stream_id)
                self._reset(stream.stream_id, ErrorCodes.CANCEL)
                stream.lost("the client reads too slowly")
                self._forget(stream)
        if not self.streams:
            limit = self.limits.keep_alive if self.conn.requests else self.limits.header_timeout
            if now - self.conn.idle_since > limit:
                self.go_away()
        self.flush()

    def _lost(self, reason: str) -> None:
        """The connection is over: every stream's call learns it."""
        for stream in self.streams.values():
            stream.lost(reason)
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.conn.out += self.h2.data_to_send()
        self.conn.broken = True
        self.loop.forget(self.conn.fd)
        self.on_end(self.conn)


class Stream:
    """One request and its response on a session: what a guest call uses of its client."""

    def __init__(self, session: Session, stream_id: int) -> None:
        conn = session.conn
        self.session = session
        self.stream_id = stream_id
        self.fd = session.loop.new_signal()  # what the guest waits on (see module doc)
        self.peer = conn.peer
        self.scheme = conn.scheme
        self.limits = conn.limits
        self.state = "request"
        self.must_close = False  # (HTTP/1.1's; a stream has no connection of its own to close)
        self.broken = False
        self.responded = False
        self.call_over = False  # its guest call ended
        self.finished = False  # the response went out whole
        self.lost_reason = ""  # why the client will get no more of it (reset, connection lost)
        self.sent = 0  # response body bytes handed to h2
        self.writing = MinDataRate(self.limits.min_data_rate, self.limits.data_rate_grace,
                                   lambda: self.sent)
        self.body = StreamBody(self)
        self.request_head: Optional[RequestHead] = None
        self._head: Optional[list[tuple[bytes, bytes]]] = None  # waiting for a body or the end
        self._pending = bytearray()  # body bytes beyond the flow-control window
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None  # once pending is out
        self._ending = False
        self._left: Optional[int] = None  # what the content-length still expects
        self._no_body = False
        self._head_only = False

    # -- what the loop and the call ask of any client
    def left(self, events: int) -> bool:
        return bool(self.lost_reason)

    def lost(self, reason: str) -> None:
        """The client will take nothing more of this stream."""
        if not self.lost_reason:
            self.lost_reason = reason
            self._pending.clear()
            self.body.failed(reason)
        self.session.loop.signal(self.fd, CLOSED)

    def request_body(self, limit: int) -> "StreamBody":
        self.body.limit = limit
        return self.body

    def window_opened(self) -> None:
        if not self.call_over:
            self.session.loop.signal(self.fd, OUT)
        else:
            self.push()  # (the rest of a response whose call is over; once whole, stream_sent)

    # -- the response
    def start_response(self, status: int, headers: list[tuple[str, bytes]]) -> None:
        if status < 200:
            raise ValueError(f"status {status} is not a final response")
        self._left = declared_length(headers)
        self._head_only = self.request_head is not None and self.request_head.method == b"HEAD"
        self._no_body = self._head_only or status in (204, 304)
        if self._no_body and not self._head_only:
            self._left = 0
        self._head = [(b":status", b"%d" % status)] + [
            (name.encode(), value) for name, value in headers if name not in CONNECTION_FIELDS]
        self.responded = True

    def continue_if_expected(self) -> None:
        """Answer `Expect: 100-continue` before the guest's first read of the body."""
        if self.body.expects_continue and not self.responded:
            self.body.expects_continue = False
            self.session.h2.send_headers(self.stream_id, [(b":status", b"100")])
            self.session.flush()

    def room(self) -> int:
        if self.lost_reason:
            return OUT_HIGH_WATER  # (a write finds out)
        window = self.session.h2.local_flow_control_window(self.stream_id)
        room = min(window - len(self._pending), self.session.room())
        if room <= 0:
            self.session.blocked.add(self)
        return max(0, room)

    def send_body(self, data: bytes | memoryview) -> None:
        if self.lost_reason:
            raise ConnectionResetError(self.lost_reason)
        if self._no_body or not data:
            return
        if self._left is not None:
            if len(data) > self._left:
                raise ValueError("more body than the response's content-length")
            self._left -= len(data)
        self._pending += data
        if len(self._pending) >= self.session.h2.max_outbound_frame_size:
            self.push()  # (less waits for the end or a flush: one DATA frame may end the stream)

    def takes_pipe(self) -> bool:
        return False

    def end_response(self, trailers: list[tuple[str, bytes]] = ()) -> bool:
        """End the body (with trailers); False if it was shorter than declared."""
        if self._left and not self._head_only:
            return False
        self._ending = True
        self._trailers = [(name.encode(), value) for name, value in trailers] or None
        self.push()
        return True

    def push(self) -> None:
        """Hand h2 the head, what the windows allow of the body, and the end once the body
        is out."""
        if self.lost_reason or self.finished:
            return
        try:
            self._push(self.session.h2)
        except h2.exceptions.ProtocolError as exc:  # (the stream closed under it)
            self.lost(f"HTTP/2: {exc}")

    def _push(self, conn: h2.connection.H2Connection) -> None:
        if self._head is not None:
            ends = self._ending and not self._pending and self._trailers is None
            conn.send_headers(self.stream_id, self._head, end_stream=ends)
            self._head = None
            if ends:
                self._sent_whole()
                return
        while self._pending:
            size = min(len(self._pending), conn.local_flow_control_window(self.stream_id),
                       conn.max_outbound_frame_size)
            if size <= 0:
                self.writing.waiting(time.monotonic())
                self.session.blocked.add(self)
                return
            piece = bytes(self._pending[:size])
            del self._pending[:size]
            last = self._ending and not self._pending and self._trailers is None
            conn.send_data(self.stream_id, piece, end_stream=last)
            self.sent += size
            if last:
                self._sent_whole()
                return
        if self._ending:
            if self._trailers is not None:
                conn.send_headers(self.stream_id, self._trailers, end_stream=True)
            else:
                conn.end_stream(self.stream_id)
            self._sent_whole()

    def _sent_whole(self) -> None:
        self.finished = True
        if self.call_over:
            self.session.stream_sent(self)

    def flush(self) -> bool:
        self.push()
        self.session.flush()
        return not self._pending

    def discard_output(self) -> None:
        self._pending.clear()

    def refuse(self, status: int, reason: str) -> None:
        """Answer a request that is not served (a bad head) with a plain-text error."""
        body = f"{reason}\n".encode()
        self.call_over = True
        self.start_response(status, [("content-type", b"text/plain; charset=utf-8"),
                                     ("content-length", str(len(body)).encode())])
        self.send_body(body)
        self.end_response()


class StreamBody:
    """A stream's request body as a byte source for the guest: DATA frames the session hands
    over, each window's worth given back to the client as the guest reads it."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.limit = 0
        self.received = 0
        self.fault: Optional[tuple[int, str]] = None  # what the client got wrong: (status, reason)
        self.expects_continue = False  # a 100 Continue is due before the first read
        self.done = False  # the client sent all of it
        self._chunks: deque[bytes] = deque()
        self._unread = 0  # bytes received and not yet read (nor acknowledged)
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None
        self._error: Optional[IoError] = None
        limits = stream.limits
        self.reading = MinDataRate(limits.min_data_rate, limits.data_rate_grace,
                                   lambda: self.received)

    # -- from the session
    def received_data(self, data: bytes) -> None:
        self.received += len(data)
        self._unread += len(data)
        if self.limit and self.received > self.limit:
            self.fault = (413, "request body too large")
            self._error = IoError("request body too large", ("HTTP-request-body-size",
                                                             self.received))
        elif data:
            self._chunks.append(data)
        self.stream.session.loop.signal(self.stream.fd, IN)

    def trailers_received(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self._trailers = trailers or None

    def ended(self) -> None:
        self.done = True
        self.stream.session.loop.signal(self.stream.fd, IN)

    def failed(self, reason: str) -> None:
        if not self.done and self._error is None:
            self._error = IoError(reason, "HTTP-request-body-size")

    def unacknowledged(self) -> int:
        """Bytes received that the guest never read (the connection's window wants them)."""
        unread, self._unread = self._unread, 0
        self._chunks.clear()
        return unread

    # -- ByteSource, for the guest
    def ready(self) -> bool:
        self.stream.continue_if_expected()
        if not (self._chunks or self.done or self._error):
            if not self.reading.expired(time.monotonic()):
                return False
            self.fault = (408, "the request body arrived too slowly")
            self._error = IoError(self.fault[1], "HTTP-request-body-size")
        return True

    def interest(self) -> Interest:
        self.reading.waiting(time.monotonic())
        return self.stream.fd, READABLE

    @property
    def deadline(self) -> Optional[int]:
        return self.reading.deadline()

    def read(self, size: int) -> bytes:
        if self._chunks:
            chunk = take(self._chunks, size)
            self._unread -= len(chunk)
            self.stream.session.h2.acknowledge_received_data(len(chunk), self.stream.stream_id)
            if not self._chunks:
                self.reading.reset()
            return chunk
        if self._error is not None:
            raise StreamFailed(self._error)
        if self.done:
            raise StreamClosed()
        self.stream.continue_if_expected()
        return b""

    def trailers(self) -> Optional[list[tuple[bytes, bytes]]]:
        return self._trailers

    def close(self) -> None:
        """The guest is done with the body; what is left is acknowledged when the call ends."""


def request_head(headers: list[tuple[bytes, bytes]], limits: Limits) -> RequestHead:
    """A stream's request head (h2 checked the pseudo-headers' presence and form), if it may
    be served: the limits and rules HTTP/1.1 requests meet; else BadRequest."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        else:
            fields.append((name, value))
    check_fields(fields, limits)
    check_content_length([value for name, value in fields if name == b"content-length"], limits)
    method = pseudo[b":method"]
    authority = pseudo.get(b":authority") or host_field(fields)
    check_authority(authority)
    authority_text = authority.decode("ascii") if authority is not None else None
    if method == b"CONNECT":
        return RequestHead(method, authority or b"", b"2", fields, None, authority_text, True)
    path = pseudo[b":path"]
    if len(method) + len(path) + 10 > limits.request_line:
        raise BadRequest(414, "request line too long")
    if not _TARGET.match(path):
        raise BadRequest(400, "the :path has characters a request target cannot have")
    if path == b"*":
        if method != b"OPTIONS":
            raise BadRequest(400, "the * target is for OPTIONS only")
    elif not path.startswith(b"/"):
        raise BadRequest(400, "the :path must start with /")
    return RequestHead(method, path, b"2", fields, path.decode("ascii"), authority_text, True)
