"""The worker's HTTP/1.1 server: h11 per connection, a fixed set of request threads.

Connections wait in a selector while idle (accepted, or kept alive between requests) and get a
thread only when they have something to read, so idle keep-alive clients cost no thread. A
thread reads one request, hands it to the handler (which runs the guest), and streams the
response back.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import select
import selectors
import socket
import threading
import time
from http import HTTPStatus
from typing import Callable, Optional

import h11

from .request_head import BadRequest, Limits, check_head, protocol_error, skip_empty_lines

log = logging.getLogger("wasisup.server")

RECV_SIZE = 64 * 1024
# How long a thread that just answered waits for the same client's next request before
# parking the connection: serving it on the same thread keeps the guest's caches warm.
LINGER = 0.001


class Connection:
    """One client connection: an h11 state machine over a blocking socket."""

    def __init__(self, sock: socket.socket, peer: object, limits: Limits) -> None:
        self.sock = sock
        self.peer = peer
        self.limits = limits
        self.max_head = (limits.request_line
                         + limits.request_fields * (limits.request_field_size + 2) + 4)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        self.idle_since = time.monotonic()
        self.must_close = False
        self.fresh = True  # no request read yet
        self._pending = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- reading
    def receive(self, block: bool = True) -> bool:
        """Feed h11 from the socket; False if nothing was available (non-blocking) ."""
        try:
            data = self.sock.recv(RECV_SIZE) if block else self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:  # reset, timeout: the client is gone
            data = b""
        self.h11.receive_data(data)
        return True

    def next_event(self, block: bool = True) -> object:
        """The next h11 event, reading from the socket as needed (h11.NEED_DATA if non-blocking)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if not self.receive(block) and not block:
                return h11.NEED_DATA

    def read_request(self) -> Optional[h11.Request]:
        """The next request, validated; None when the client closed between requests."""
        # The head as h11 parses it: what it buffered already (a pipelined request) and
        # what arrives now.
        received = bytearray(self.h11.trailing_data[0])
        skipped = 0
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise protocol_error(exc, bytes(received)) from None
            if event is h11.NEED_DATA:
                try:
                    data = self.sock.recv(RECV_SIZE)
                except OSError:
                    data = b""
                if data and not received:  # empty lines before the request line
                    kept = skip_empty_lines(data)
                    skipped += len(data) - len(kept)
                    if skipped > self.limits.request_line:
                        raise BadRequest(400, "too many empty lines before the request line")
                    if not kept:
                        continue
                    data = kept
                received += data
                if len(received) > self.limits.request_line and b"\n" not in received:
                    raise BadRequest(414, "request line too long")
                self.h11.receive_data(data)
                continue
            self.fresh = False
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise BadRequest(400, f"unexpected {type(event).__name__}")
            trailing = len(self.h11.trailing_data[0])
            check_head(event, bytes(received[:len(received) - trailing]), self.limits)
            return event

    # -- writing: output is held until ``flush`` so a small response leaves in one packet
    def send(self, event: object, flush: bool = False) -> None:
        data = self.h11.send(event)
        if data:
            self._pending += data
        if flush or len(self._pending) >= RECV_SIZE:
            self.flush()

    def send_response_head(self, response: h11.Response, head_only: bool) -> None:
        """Like ``send``; for a HEAD request without a length, no framing header at all.

        h11 announces the chunked framing a GET would have had; hyper (and so `wasmtime
        serve`) announces none, and a HEAD response has no body to frame either way.
        """
        data = self.h11.send(response)
        if head_only and data:
            data = data.replace(b"\r\nTransfer-Encoding: chunked\r\n", b"\r\n", 1)
        self._pending += data

    def flush(self) -> None:
        if self._pending:
            data, self._pending = self._pending, bytearray()
            self.sock.sendall(data)

    def send_error(self, status: int, reason: str) -> None:
        """A plain-text error response, then close: the request's framing can't be trusted."""
        self.must_close = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE, h11.ERROR):
            try:
                self.sock.sendall(_raw_error(status, f"{reason}\n".encode()))
            except OSError:
                pass

    def finish_cycle(self) -> bool:
        """After a response: ready for the next request on this connection?"""
        if self.must_close or self.h11.our_state is not h11.DONE:
            return False
        if self.h11.their_state is h11.SEND_BODY:
            if not self._drain_request_body():
                return False
        if self.h11.their_state is not h11.DONE:
            return False
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        pipelined = bytes(self.h11.trailing_data[0])
        if pipelined[:1] in (b"\r", b"\n"):  # empty lines before the next request line
            # h11 cannot drop bytes it holds: a fresh parser gets what follows them.
            self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
            next_request = skip_empty_lines(pipelined)
            if next_request:  # (receiving b"" would mean the client closed)
                self.h11.receive_data(next_request)
        self.idle_since = time.monotonic()
        return True

    def _drain_request_body(self, limit: int = 1024 * 1024) -> bool:
        """Read and drop what the guest left of the request body, if small."""
        drained = 0
        while drained <= limit:
            try:
                event = self.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                return False
        return False

    def has_pipelined_request(self) -> bool:
        return bool(self.h11.trailing_data[0])

    def next_request_soon(self, linger: float) -> bool:
        """Does the next request arrive within ``linger`` seconds (a busy keep-alive client)?"""
        ready, _, _ = select.select([self.sock], [], [], linger)
        return bool(ready)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _raw_error(status: int, body: bytes) -> bytes:
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


Handler = Callable[[Connection, h11.Request], None]


class Server:
    """Serves HTTP/1.1 on already-bound listening sockets until ``stop``.

    Leader/followers: the request threads take turns watching the selector; the one that sees
    a readable connection serves it itself (no hand-off to another thread) after passing the
    watch on. The calling thread only ticks (``on_tick``: the worker's heartbeat).
    """

    def __init__(self, listeners: list[socket.socket], handler: Handler, threads: int = 4,
                 limits: Limits = Limits(), on_tick: Optional[Callable[[], None]] = None) -> None:
        self.listeners = listeners
        self.handler = handler
        self.threads = threads
        self.limits = limits
        self.on_tick = on_tick
        self.selector = selectors.DefaultSelector()
        self._ready: list[Connection] = []
        self._watch = threading.Lock()  # held by the thread watching the selector
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._last_sweep = time.monotonic()
        self._in_flight = 0
        self._count = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """Stop accepting; finish in-flight requests; close idle connections (thread-safe)."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve(self, graceful_timeout: float = 30.0) -> None:
        for sock in self.listeners:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, "listener")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        threads = [threading.Thread(target=self._follow, name=f"wasisup-req-{i}", daemon=True)
                   for i in range(self.threads)]
        for thread in threads:
            thread.start()
        while not self._stopping.wait(1.0):
            if self.on_tick is not None:
                self.on_tick()
        self._drain(threads, graceful_timeout)

    def _follow(self) -> None:
        while not self._stopping.is_set():
            with self._watch:
                conn = self._next_ready()
            if conn is not None:
                self._serve_connection(conn)

    def _next_ready(self) -> Optional[Connection]:
        """Watch the selector until a connection has a request (accepting as they come)."""
        while not self._ready and not self._stopping.is_set():
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "listener":
                    self._accept(key.fileobj)
                elif key.data == "conn":
                    self.selector.unregister(key.fileobj)
                    self._ready.append(key.fileobj)
            if time.monotonic() - self._last_sweep > 1.0:
                self._close_idle(time.monotonic() - self.limits.keep_alive)
        if self._ready and not self._stopping.is_set():
            return self._ready.pop(0)
        return None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            sock.setblocking(True)
            sock.settimeout(self.limits.read_timeout)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(Connection(sock, peer, self.limits), selectors.EVENT_READ, "conn")

    def _close_idle(self, cutoff: float) -> None:
        self._last_sweep = time.monotonic()
        for key in list(self.selector.get_map().values()):
            conn = key.fileobj
            if isinstance(conn, Connection) and conn.idle_since < cutoff:
                self.selector.unregister(conn)
                conn.close()

    def _serve_connection(self, conn: Connection) -> None:
        """Serve requests on ``conn`` while it has them ready, then park it or close it."""
        with self._count:
            self._in_flight += 1
        keep = False
        try:
            while True:
                keep = self._serve_one(conn)
                if not keep or self._stopping.is_set():
                    break
                if conn.has_pipelined_request():  # already read: no readiness event will come
                    continue
                # Stay on this connection only while another thread watches the others and
                # none of them is waiting for a thread.
                if self._watch.locked() and not self._ready and conn.next_request_soon(LINGER):
                    continue
                break
        except Exception:
            log.exception("connection from %s failed", conn.peer)
            keep = False
        finally:
            with self._count:
                self._in_flight -= 1
        if keep and not self._stopping.is_set():
            # epoll registration is safe from any thread; the watcher sees it on its next select.
            self.selector.register(conn, selectors.EVENT_READ, "conn")
        else:
            conn.close()

    def _serve_one(self, conn: Connection) -> bool:
        try:
            request = conn.read_request()
        except BadRequest as exc:
            conn.send_error(exc.status, exc.reason)
            return False
        if request is None:
            return False
        if self._stopping.is_set():
            conn.must_close = True
        try:
            self.handler(conn, request)
        except BadRequest as exc:
            conn.send_error(exc.status, exc.reason)
            return False
        return conn.finish_cycle()

    def _drain(self, threads: list[threading.Thread], graceful_timeout: float) -> None:
        """Graceful stop: stop accepting, close idle kept-alive connections, answer requests
        that have arrived (or are arriving on just-accepted connections), finish in-flight
        ones."""
        deadline = time.monotonic() + graceful_timeout
        with self._watch:
            ready, self._ready = self._ready, []
            fresh = []
            for key in list(self.selector.get_map().values()):
                if key.data in ("listener", "conn"):
                    self.selector.unregister(key.fileobj)
                    if key.data == "conn" and key.fileobj.fresh:
                        fresh.append(key.fileobj)
                    else:
                        key.fileobj.close()
        # A client that just connected is about to send its request: give it a moment.
        first_request_by = min(deadline, time.monotonic() + self.limits.keep_alive)
        while fresh and time.monotonic() < first_request_by:
            readable, _, _ = select.select(fresh, [], [], first_request_by - time.monotonic())
            for conn in readable:
                fresh.remove(conn)
                ready.append(conn)
        for conn in fresh:
            conn.close()
        for conn in ready:
            self._serve_connection(conn)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
