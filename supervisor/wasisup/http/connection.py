"""One client connection: a non-blocking socket, h11 parsing its requests, the framing of its
responses, and its output buffer.

The worker's event loop reads request heads into it; the guest's call reads the body and writes
the response through it; whatever the client has not taken when the guest is done stays in
``out`` for the loop to finish. Its sockets are non-blocking: a call that cannot go on returns
what it did, and the loop waits for readiness.

h11 parses each request (one h11 state machine per request cycle). Responses are framed by hand
(``framing``).
"""

from __future__ import annotations

import email.utils
import fcntl
import os
import select
import socket
import ssl
import struct
import termios
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Callable, Optional

import h11

from ..loop import CLOSED
from ..wasi.io import READABLE, Interest, IoError, StreamClosed, StreamFailed
from .framing import chunk, field_lines, last_chunk
from .request_head import (BadRequest, Limits, RequestHead, check_head, clean_trailers,
                           protocol_error, skip_empty_lines)
from .tls import handshake_step

RECV_SIZE = 64 * 1024
# Response bytes held for a client that has not taken them yet: beyond this the guest waits
# (each connection's share of memory is bounded; the kernel's socket buffer comes on top).
OUT_HIGH_WATER = 256 * 1024
# Smaller writes collect in ``out`` until a flush; bigger ones go to the socket at once.
DIRECT_SEND = 16 * 1024
# Response bytes the kernel may hold that it has not sent yet (TCP_NOTSENT_LOWAT): enough to
# keep a fast client's pipe full, little for a client that stops reading.
UNSENT_LIMIT = 512 * 1024
SIOCOUTQNSD = 0x894B  # Linux: bytes in a socket's send queue not sent yet
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # how an HTTP/2 client opens (RFC 9113 3.4)


class ClientGone(Exception):
    """The client closed the connection (or it broke, or its TLS handshake failed) before a
    request head was complete."""


class MinDataRate:
    """While we wait on a client, it must move ``rate × grace`` bytes within every ``grace``
    seconds (Kestrel's minimum data rate), so a slow sender or reader cannot hold a request
    thread. ``progress`` counts the bytes the client has moved so far."""

    def __init__(self, rate: float, grace: float, progress: Callable[[], int]) -> None:
        self.quota = rate * grace
        self.grace = grace
        self.progress = progress
        self._window: Optional[float] = None  # when the current window started
        self._base = 0  # progress then

    def waiting(self, now: float) -> None:
        """We wait on the client from now, unless a window is already running."""
        if self._window is None and self.quota:
            self._window, self._base = now, self.progress()

    def deadline(self) -> Optional[int]:
        """When the current window ends, in monotonic ns (what a guest's waiter takes)."""
        return None if self._window is None else int((self._window + self.grace) * 1e9)

    def expired(self, now: float) -> bool:
        """Has the client moved too little in the window that ended? (If it moved enough, a
        new window starts.)"""
        if self._window is None or now <= self._window + self.grace:
            return False
        moved = self.progress()
        if moved - self._base < self.quota:
            return True
        self._window, self._base = now, moved
        return False

    def reset(self) -> None:
        self._window = None


class Connection:
    """A client connection; ``state`` says who has it: the loop ("head": reading a request
    head or idle between requests, "flush": sending what is left of a response, "linger":
    closing) or a guest call ("request")."""

    def __init__(self, sock: socket.socket, peer: Any, limits: Limits) -> None:
        sock.setblocking(False)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.tls_wants = READABLE  # what the TLS handshake waits for (READABLE or WRITABLE)
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if self._tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Writable only while little is queued unsent (see _send).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LIMIT)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.state = "handshake" if self.tls else "head"
        self.out = bytearray()
        self.must_close = False  # the next response announces `Connection: close`
        self.broken = False  # close after this response: its framing can't be trusted
        self.requests = 0  # answered on this connection
        self.request_head: Optional[RequestHead] = None  # the request being answered
        now = time.monotonic()
        self.head_started: Optional[float] = now  # a new connection's head is due from accept
        self.idle_since = now
        self.received = 0  # bytes read from the client
        self.sent = 0  # bytes the socket accepted from us
        self._unsent_checked = 0  # ``sent`` when the kernel's unsent bytes were last looked at
        self.reading = MinDataRate(limits.min_data_rate, limits.data_rate_grace, lambda: self.received)
        self.writing = MinDataRate(limits.min_data_rate, limits.data_rate_grace, self.delivered)
        self._head = bytearray()  # the raw bytes of the head being read
        self._skipped = 0  # empty lines before it
        self._response = ResponseFraming()

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def left(self, events: int) -> bool:
        """Do these events on the socket say the client went away?"""
        return bool(events & CLOSED)

    def request_body(self, limit: int) -> "ClientBody":
        """The current request's body, for its guest call."""
        return ClientBody(self, limit)

    # -- TLS
    def handshake(self) -> bool:
        """Advance the TLS handshake: True once it is done, False while it waits (for
        ``tls_wants``). Raises ClientGone if it failed."""
        try:
            self.tls_wants = handshake_step(self.sock)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError) as exc:
            raise ClientGone(f"TLS handshake: {exc}") from None
        if self.tls_wants:
            return False
        self.state = "head"
        return True

    def close_write(self) -> None:
        """Send nothing more: over TLS a close_notify first (so the client can tell the end of
        a response from a cut connection), then the TCP FIN. OSError if it broke."""
        if self.tls:
            try:
                self.sock.unwrap()  # type: ignore[attr-defined]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # (sent; the client's own close_notify is not awaited)
            except (ssl.SSLError, ValueError):
                pass  # (no TLS session to close: the FIN alone)
        self.sock.shutdown(socket.SHUT_WR)

    # -- reading
    def recv(self) -> Optional[bytes]:
        """What the socket has now: bytes, None if nothing came, b"" when the client closed
        (or the connection broke)."""
        try:
            data = self.sock.recv(RECV_SIZE)
            if self.tls:  # (TLS hands out a record at a time: what it decrypted goes too)
                while self.sock.pending() and len(data) < RECV_SIZE:  # type: ignore[attr-defined]
                    data += self.sock.recv(RECV_SIZE - len(data))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError:  # (ssl.SSLZeroReturnError too: a clean TLS close)
            data = b""
        self.received += len(data)
        return data

    def opens_with_preface(self) -> Optional[bool]:
        """Does the client open with HTTP/2's connection preface (prior knowledge, h2c)? None
        while the bytes that came so far do not tell yet. Nothing is consumed."""
        try:
            first = self.sock.recv(len(H2_PREFACE), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        if first == H2_PREFACE:
            return True
        return None if first and H2_PREFACE.startswith(first) else False

    def receive(self) -> Optional[bool]:
        """Feed h11 what the socket has now: True if something came, None if nothing did,
        False when the client closed (or the connection broke)."""
        data = self.recv()
        if data is None:
            return None
        if self.h11.their_state is h11.IDLE:
            if not self._head:  # RFC 9112 2.2: empty lines before a request line are ignored
                kept = skip_empty_lines(data)
                self._skipped += len(data) - len(kept)
                if self._skipped > self.limits.request_line:
                    raise BadRequest(400, "too many empty lines before the request line")
                if data and not kept:
                    return True
                data = kept
            self._head += data
        self.h11.receive_data(data)
        return bool(data)

    def read_head(self, receive: bool = True) -> Optional[RequestHead]:
        """The next request head if it is complete (reading what the socket has, unless
        ``receive`` is false), else None. Raises BadRequest, or ClientGone."""
        if receive and not self._head and self.receive() is None:
            return None  # (nothing buffered, nothing came: no use asking h11)
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise protocol_error(exc, bytes(self._head)) from None
            if event is h11.NEED_DATA:
                if len(self._head) > self.limits.request_line and b"\n" not in self._head:
                    raise BadRequest(414, "request line too long")
                if not receive:
                    return None
                got = self.receive()
                if got is None:
                    return None
                if got and self.head_started is None:
                    self.head_started = time.monotonic()
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone()
            if not isinstance(event, h11.Request):
                raise BadRequest(400, f"unexpected {type(event).__name__}")
            trailing = len(self.h11.trailing_data[0])
            head = bytes(self._head[:len(self._head) - trailing])
            self._head, self._skipped = bytearray(), 0
            request = check_head(event, head, self.limits)
            self.head_started = None
            self.request_head = request
            return request

    # -- the response
    @property
    def responded(self) -> bool:
        """Has a response head been written for the current request?"""
        return self._response.started

    def continue_if_expected(self) -> None:
        """Answer `Expect: 100-continue` before the guest's first read of the body."""
        if (self.h11.they_are_waiting_for_100_continue and not self._response.started
                and not self._response.continued):
            self._response.continued = True
            self.out += b"HTTP/1.1 100 Continue\r\n\r\n"

    def start_response(self, status: int, headers: list[tuple[str, bytes]]) -> None:
        """Write a response head. A body is framed by the content-length it declares, else
        chunked (HTTP/1.1) or by closing the connection (HTTP/1.0); none follows for HEAD, 204
        and 304. Raises ValueError for a response HTTP/1.1 cannot carry."""
        request = self.request_head
        keep_alive = not self.must_close and request.keep_alive
        self.out += self._response.start(status, headers, request.method == b"HEAD",
                                         request.http_version == b"1.1", keep_alive)

    def send_body(self, data: bytes | memoryview) -> None:
        """Frame body bytes. They are not copied on the way: a big piece goes to the socket at
        once, and only what it does not take is kept."""
        self._write(self._response.frame(data))

    def takes_pipe(self) -> bool:
        """Can body bytes come from a pipe (``send_body_from_pipe``)? Not when chunked, nor
        over TLS (the bytes must be encrypted on the way)."""
        return self._response.raw and not self.tls

    def send_body_from_pipe(self, pipe: int, count: int) -> None:
        """Like ``send_body`` for ``count`` bytes waiting in ``pipe``: they go to the socket
        inside the kernel. What it does not take now is read into the output, so the pipe is
        left empty."""
        self._response.account(count)
        moved = 0
        if self.out:  # what waits there (the head, typically) goes first, the body right behind
            self.flush(socket.MSG_MORE)
        if not self.out and self._may_send():
            try:
                moved = os.splice(pipe, self.fd, count, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                pass
            self.sent += moved
        while moved < count:
            chunk = os.read(pipe, count - moved)
            self.out += chunk
            moved += len(chunk)

    def end_response(self, trailers: list[tuple[str, bytes]] = ()) -> bool:
        """End the body (with trailers, if chunked); False if it was shorter than declared."""
        tail, complete = self._response.end(trailers)
        self.out += tail
        if not complete:
            self.broken = True
        return complete

    def _write(self, parts: list[Any]) -> None:
        if sum(map(len, parts)) < DIRECT_SEND:
            for part in parts:
                self.out += part
            return
        if self.out:
            parts.insert(0, self.out)
            self.out = bytearray()
        sent = self._send(parts)
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
            else:
                self.out += memoryview(part)[sent:]
                sent = 0

    def _may_send(self) -> bool:
        """Every ``UNSENT_LIMIT`` bytes, more wait while the kernel already queues that many
        the client has not made room for: it would take MBs for a client that reads nothing,
        and a slow reader is found out only once it stops."""
        if self._tcp and self.sent - self._unsent_checked >= UNSENT_LIMIT:
            if _send_queue(self.fd, SIOCOUTQNSD) >= UNSENT_LIMIT:
                if _hung_up(self.fd):  # (after a reset the count stays what it was)
                    raise ConnectionResetError("the client reset the connection")
                return False
            self._unsent_checked = self.sent
        return True

    def _send(self, buffers: list[Any], flags: int = 0) -> int:
        """Send what the socket takes now (see ``_may_send``)."""
        if not self._may_send():
            return 0
        try:
            if self.tls:  # (no sendmsg, no flags over TLS)
                sent = self.sock.send(b"".join(buffers))
            else:
                sent = self.sock.sendmsg(buffers, [], flags)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        self.sent += sent
        return sent

    def delivered(self) -> int:
        """Bytes the client has acknowledged: what the socket accepted minus what its send
        queue still holds (bytes merely queued in our kernel are no sign of a reader)."""
        return self.sent - _send_queue(self.fd, termios.TIOCOUTQ)

    def flush(self, flags: int = 0) -> bool:
        """Send what the socket takes now; True once nothing is left. OSError if it broke.
        (``socket.MSG_MORE``: more follows at once, so the kernel may hold these bytes back
        to share a segment with it.)"""
        if self.out:
            sent = self._send([self.out], flags)
            if sent:
                del self.out[:sent]
        return not self.out

    @property
    def partial_head(self) -> bool:
        """Have bytes of a request head arrived that do not make a whole head yet?"""
        return bool(self._head)

    def discard_output(self) -> None:
        """Drop what the client has not taken (it is being cut off)."""
        self.out.clear()

    def room(self) -> int:
        """How much more output the connection holds before its writer must wait."""
        return max(0, OUT_HIGH_WATER - len(self.out))

    def send_error(self, status: int, reason: str) -> None:
        """A plain-text error response, then close: the request's framing can't be trusted."""
        self.broken = True
        if not self._response.started:
            self._response.started = True
            self.out += raw_error(status, f"{reason}\n".encode())

    def finish_cycle(self) -> bool:
        """After a response: is the connection ready for the next request?"""
        if self.broken or not (self._response.done and self._response.keep_alive):
            return False
        try:
            while self.h11.their_state is h11.SEND_BODY:  # body the guest left unread
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    if not self.receive():
                        return False  # not here yet: not worth waiting for
                elif not isinstance(event, (h11.Data, h11.EndOfMessage)):
                    return False
        except h11.RemoteProtocolError:
            return False
        if self.h11.their_state is not h11.DONE:
            return False
        pipelined, closed = self.h11.trailing_data
        pipelined = skip_empty_lines(pipelined)  # empty lines before the next request line
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        if pipelined:
            self.h11.receive_data(pipelined)
        if closed:
            self.h11.receive_data(b"")
        self._head = bytearray(pipelined)
        self._response = ResponseFraming()
        self.requests += 1
        self.head_started = time.monotonic() if self._head else None
        self.idle_since = time.monotonic()
        self.reading.reset()
        self.writing.reset()
        return True

    def close(self) -> None:
        self.sock.close()


class ClientBody:
    """The request body as a byte source for the guest, read from the connection on demand
    (so the guest gets back-pressure); a client too slow to send it is cut off."""

    def __init__(self, conn: Connection, limit: int) -> None:
        self.conn = conn
        self.limit = limit
        self.received = 0
        self.fault: Optional[tuple[int, str]] = None  # what the client got wrong: (status, reason)
        self._chunks: deque[bytes] = deque()
        self._done = conn.h11.their_state is not h11.SEND_BODY
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None
        self._error: Optional[IoError] = None

    def _pull(self) -> None:
        """Move whatever body bytes are available now into the buffer, without blocking."""
        conn = self.conn
        if not self._chunks:
            conn.continue_if_expected()
            self._flush()
        while not (self._chunks or self._done or self._error):
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(400, f"malformed request body: {exc}", "HTTP-protocol-error")
                return
            if event is h11.NEED_DATA:
                if not conn.receive():
                    self._check_rate()
                    return
            elif isinstance(event, h11.Data):
                self.received += len(event.data)
                if self.limit and self.received > self.limit:
                    self._fail(413, "request body too large",
                               ("HTTP-request-body-size", self.received))
                    return
                self._chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self._trailers = clean_trailers(event.headers.raw_items()) or None
            else:  # ConnectionClosed: the client went away mid-body
                self._fail(0, "", "HTTP-request-body-size",
                           "client closed the connection before the body ended")

    def _check_rate(self) -> None:
        if self.conn.reading.expired(time.monotonic()):
            self._fail(408, "the request body arrived too slowly", "HTTP-request-body-size")

    def _flush(self) -> None:
        try:
            self.conn.flush()
        except OSError:
            self.conn.broken = True

    def _fail(self, status: int, reason: str, code: Any, message: str = "") -> None:
        self.conn.broken = True
        if status:
            self.fault = (status, reason)
        self._error = IoError(message or reason, code)

    def ready(self) -> bool:
        self._pull()
        return bool(self._chunks) or self._done or self._error is not None

    def interest(self) -> Interest:
        self.conn.reading.waiting(time.monotonic())
        return self.conn.fd, READABLE

    @property
    def deadline(self) -> Optional[int]:
        return self.conn.reading.deadline()

    def read(self, size: int) -> bytes:
        self._pull()
        if self._chunks:
            return take(self._chunks, size)
        if self._error is not None:
            raise StreamFailed(self._error)
        if self._done:
            raise StreamClosed()
        return b""

    def trailers(self) -> Optional[list[tuple[bytes, bytes]]]:
        return self._trailers

    def close(self) -> None:
        """The guest is done with the body; the server drains or closes what is left."""


def take(chunks: deque[bytes], size: int) -> bytes:
    """The next bytes of a non-empty queue of chunks, at most ``size`` of them."""
    chunk = chunks.popleft()
    if len(chunk) > size:
        chunks.appendleft(chunk[size:])
        chunk = chunk[:size]
    return chunk


def _send_queue(fd: int, request: int) -> int:
    """A count of the socket's send queue (TIOCOUTQ: not yet acknowledged; SIOCOUTQNSD: not
    yet sent); 0 if the socket cannot tell."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]
    except OSError:
        return 0


def _hung_up(fd: int) -> bool:
    """Has the connection failed or been closed by the peer (nothing sent will arrive)?"""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


class ResponseFraming:
    """How one response's body is delimited on the wire, and whether the connection survives it."""

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self.continued = False  # a 100 Continue went out
        self.keep_alive = True
        self._left: Optional[int] = None  # bytes a content-length still expects
        self._chunked = False
        self._no_body = False

    def start(self, status: int, headers: list[tuple[str, bytes]], head_only: bool,
              http11: bool, keep_alive: bool) -> bytes:
        if status < 200:
            raise ValueError(f"status {status} is not a final response")
        length = declared_length(headers)
        self._no_body = head_only or status in (204, 304)
        framing: list[tuple[str, bytes]] = []
        if length is not None:
            self._left = 0 if self._no_body else length
        elif not self._no_body:
            if http11:
                self._chunked = True
                framing.append(("transfer-encoding", b"chunked"))
            else:
                keep_alive = False  # the end of the body is the end of the connection
        if not keep_alive:
            framing.append(("connection", b"close"))
        self.keep_alive = keep_alive
        self.started = True
        return (b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
                + field_lines(headers + framing) + b"\r\n")

    @property
    def raw(self) -> bool:
        """Do body bytes go on the wire as they are (content-length or close-delimited)?"""
        return not (self._chunked or self._no_body)

    def frame(self, data: bytes | memoryview) -> list[Any]:
        if self._no_body or not data:
            return []
        if self._chunked:
            return chunk(data)
        self.account(len(data))
        return [data]

    def account(self, count: int) -> None:
        """Count ``count`` raw body bytes against the content-length."""
        if self._left is not None:
            if count > self._left:
                raise ValueError("more body than the response's content-length")
            self._left -= count

    def end(self, trailers: list[tuple[str, bytes]]) -> tuple[bytes, bool]:
        self.done = True
        if self._chunked:
            return last_chunk(trailers), True
        return b"", not self._left


def declared_length(headers: list[tuple[str, bytes]]) -> Optional[int]:
    """A response's content-length, if it declares one. ValueError unless it is one number."""
    lengths = {value for name, value in headers if name == "content-length"}
    if len(lengths) > 1 or lengths and not next(iter(lengths)).isdigit():
        raise ValueError("the content-length is not one decimal number")
    return int(next(iter(lengths))) if lengths else None


def raw_error(status: int, body: bytes) -> bytes:
    """An error response written past h11, whose state machine may already be in ERROR."""
    reason = reason_phrase(status).decode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\ndate: {http_date().decode()}\r\n\r\n"
            ).encode() + body


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (none for a code without one)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def http_date() -> bytes:
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, email.utils.formatdate(now, usegmt=True).encode()]
    return _date[1]


_date: list = [0, b""]
