"""One client connection: a non-blocking socket, its h11 state machine and its output buffer.

The worker's event loop reads request heads into it; a request thread reads the body and writes
the response through it; whatever the client has not taken when the guest is done stays in
``out`` for the loop to finish. Nothing here blocks.
"""

from __future__ import annotations

import email.utils
import fcntl
import socket
import struct
import termios
import time
from http import HTTPStatus
from typing import Any, Callable, Optional

import h11

from .request_head import BadRequest, Limits, check_head, protocol_error, skip_empty_lines

RECV_SIZE = 64 * 1024
# Response bytes held for a client that has not taken them yet: beyond this the guest waits
# (each connection's share of memory is bounded; the kernel's socket buffer comes on top).
OUT_HIGH_WATER = 256 * 1024
# Smaller writes collect in ``out`` until a flush; bigger ones go to the socket at once.
DIRECT_SEND = 16 * 1024


class ClientGone(Exception):
    """The client closed the connection (or it broke) before a request head was complete."""


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

    def deadline(self) -> Optional[float]:
        return None if self._window is None else self._window + self.grace

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
    closing) or a request thread ("request")."""

    def __init__(self, sock: socket.socket, peer: Any, limits: Limits) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.state = "head"
        self.out = bytearray()
        self.must_close = False  # the next response announces `Connection: close`
        self.broken = False  # close after this response: its framing can't be trusted
        self.requests = 0  # answered on this connection
        self.request: Optional[h11.Request] = None  # the head a request thread is to serve
        now = time.monotonic()
        self.head_started: Optional[float] = now  # a new connection's head is due from accept
        self.idle_since = now
        self.received = 0  # bytes read from the client
        self.sent = 0  # bytes the socket accepted from us
        self.reading = MinDataRate(limits.min_data_rate, limits.data_rate_grace, lambda: self.received)
        self.writing = MinDataRate(limits.min_data_rate, limits.data_rate_grace, self.delivered)
        self._head = bytearray()  # the raw bytes of the head being read
        self._skipped = 0  # empty lines before it

    # -- reading
    def receive(self) -> Optional[bool]:
        """Feed h11 what the socket has now: True if something came, None if nothing did,
        False when the client closed (or the connection broke)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        self.received += len(data)
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

    def read_head(self, receive: bool = True) -> Optional[h11.Request]:
        """The next request head if it is complete (reading what the socket has, unless
        ``receive`` is false), else None. Raises BadRequest, or ClientGone."""
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
            check_head(event, head, self.limits)
            self.head_started = None
            return event

    # -- writing: small writes collect in ``out`` until ``flush``; big ones go out at once
    def send(self, event: Any) -> None:
        """Frame an h11 event into the output. A Data event's bytes are not copied on the way:
        a big one goes to the socket at once, and only what it does not take is kept."""
        parts = self.h11.send_with_data_passthrough(event)
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

    def send_response_head(self, response: h11.Response, head_only: bool) -> None:
        """Like ``send``; for a HEAD request without a length, no framing header at all.

        h11 announces the chunked framing a GET would have had; hyper (and so `wasmtime
        serve`) announces none, and a HEAD response has no body to frame either way.
        """
        data = self.h11.send(response)
        if head_only and data:
            data = data.replace(b"\r\nTransfer-Encoding: chunked\r\n", b"\r\n", 1)
        self.out += data

    def _send(self, buffers: list[Any]) -> int:
        try:
            sent = self.sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            return 0
        self.sent += sent
        return sent

    def delivered(self) -> int:
        """Bytes the client has acknowledged: what the socket accepted minus what its send
        queue still holds (bytes merely queued in our kernel are no sign of a reader)."""
        try:
            queued = struct.unpack("i", fcntl.ioctl(self.fd, termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            queued = 0
        return self.sent - queued

    def flush(self) -> bool:
        """Send what the socket takes now; True once nothing is left. OSError if it broke."""
        if self.out:
            sent = self._send([self.out])
            if sent:
                del self.out[:sent]
        return not self.out

    @property
    def partial_head(self) -> bool:
        """Have bytes of a request head arrived that do not make a whole head yet?"""
        return bool(self._head)

    def room(self) -> int:
        """How much more output the connection holds before its writer must wait."""
        return max(0, OUT_HIGH_WATER - len(self.out))

    def send_error(self, status: int, reason: str) -> None:
        """A plain-text error response, then close: the request's framing can't be trusted."""
        self.broken = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE, h11.ERROR):
            self.out += raw_error(status, f"{reason}\n".encode())

    def finish_cycle(self) -> bool:
        """After a response: is the connection ready for the next request?"""
        if self.broken or self.h11.our_state is not h11.DONE:
            return False
        try:
            while self.h11.their_state is h11.SEND_BODY:  # body the guest left unread
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    if not self.receive():
                        return False  # not here yet: not worth waiting for
                elif not isinstance(event, (h11.Data, h11.EndOfMessage)):
                    return False
            if self.h11.their_state is not h11.DONE:
                return False
            self.h11.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError):
            return False
        self.requests += 1
        pipelined = bytes(self.h11.trailing_data[0])
        if pipelined[:1] in (b"\r", b"\n"):  # empty lines before the next request line
            # h11 cannot drop bytes it holds: a fresh parser gets what follows them.
            self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
            pipelined = skip_empty_lines(pipelined)
            if pipelined:  # (receiving b"" would mean the client closed)
                self.h11.receive_data(pipelined)
        self._head = bytearray(pipelined)
        self.head_started = time.monotonic() if self._head else None
        self.idle_since = time.monotonic()
        self.reading.reset()
        self.writing.reset()
        return True

    def close(self) -> None:
        self.sock.close()


def raw_error(status: int, body: bytes) -> bytes:
    """An error response written past h11, whose state machine may already be in ERROR."""
    reason = reason_phrase(status).decode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\ndate: {http_date()}\r\n\r\n"
            ).encode() + body


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (none for a code without one)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def http_date() -> str:
    return email.utils.formatdate(usegmt=True)
