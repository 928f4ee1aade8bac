"""The worker's HTTP server: event loops that own the connections (HTTP/1.1 here, HTTP/2's
sessions in ``http2``) and drive the guests.

A worker runs ``threads`` loops (the main thread's and one thread each for the others); each
owns the connections it accepted. A loop accepts from the shared listening sockets, reads
request heads into h11 (each within the header timeout), starts the guest call of each complete
request, and runs guest calls until they return or wait: a waiting guest costs no thread, the
loop watches the sockets and deadline it waits for and runs it again when one is ready. Then it
finishes what the client was slow to take, keeps the connection for its next request, or
closes politely. Wasm runs with the GIL released, so a worker's loops run guests in parallel.

Admission: a worker holds at most ``max_in_flight`` guest calls (each loop its share); a
complete request beyond that waits its turn, in order, with its connection (never a 500 for a
full pool). A loop listens while it has room under its shares.

Balance: every loop of every worker watches the same listening sockets, and the kernel wakes
one that is idle when a connection comes. A loop that already holds connections, or has guests
ready to run, leaves a new one to the others for a moment that grows with its load (at most
``ACCEPT_DELAY_MAX``) and takes it if it is still there then: so connections go to the least
loaded loop, and none waits for a moment of idleness that may not come.

A graceful stop accepts what is already in the backlog, then stops listening; requests already
on a connection or arriving on it are answered with ``Connection: close``; idle connections are
closed after the keep-alive timeout; all of it bounded by the graceful timeout.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import socket
import threading
import time
from collections import deque
from typing import Callable, Optional

from ..loop import CLOSED, IN, OUT, Loop, Timer
from ..wasi.io import READABLE, WRITABLE
from .connection import ClientGone, Connection
from .handler import Client, GuestCall, GuestHandler
from .http2 import Http2Settings, Session, Stream
from .request_head import BadRequest, Limits, RequestHead
from .tls import TlsContext, looks_like_plain_http

log = logging.getLogger("wasisup.server")

SWEEP_INTERVAL = 0.25  # how often deadlines are checked (head, keep-alive, slow clients)
# How long a loop leaves a new connection to the others: per connection it holds, if it has
# guests ready to run, and at most.
ACCEPT_DELAY_PER_CONNECTION = 0.001
ACCEPT_DELAY_BUSY = 0.005
ACCEPT_DELAY_MAX = 0.010
ACCEPT_BATCH = 8  # connections a loop takes at once when they waited for it
CLOSE_DRAIN_TIME = 2.0  # reading and dropping what a client still sends after we close
TICK_INTERVAL = 1.0
MAX_WAIT = 1.0  # the longest a loop sleeps without looking at its stop flag


class Server:
    """Serves HTTP/1.1 on already-bound listening sockets until ``stop``."""

    def __init__(self, listeners: list[socket.socket], handler: GuestHandler, threads: int = 1,
                 limits: Limits = Limits(), worker_connections: int = 1000,
                 max_in_flight: int = 1000, on_tick: Optional[Callable[[], None]] = None,
                 on_idle: Optional[Callable[[], None]] = None,
                 on_sweep: Optional[Callable[[], None]] = None, workers: int = 1,
                 tls: Optional[TlsContext] = None, http2: Optional[Http2Settings] = None,
                 h2c: bool = False) -> None:
        self.listeners = listeners
        self.tls = tls  # the listeners speak HTTPS
        self.http2 = http2  # HTTP/2 is served: chosen by ALPN over TLS, ...
        self.h2c = h2c and http2 is not None and tls is None  # ... or by its preface (h2c)
        self.alone = workers * threads == 1  # no other loop to leave connections to
        self.handler = handler
        self.limits = limits
        self.on_tick = on_tick  # the first loop calls it every second (the worker's heartbeat)
        self.on_idle = on_idle  # a loop calls it when a request is done and it has nothing to do
        self.on_sweep = on_sweep  # each loop calls it every SWEEP_INTERVAL
        self.stopping = False
        self.drain_deadline = math.inf
        self._listening = threads  # loops still listening (the last one closes the sockets)
        self._lock = threading.Lock()
        self.loops = [ServerLoop(self, math.ceil(worker_connections / threads),
                                 math.ceil(max_in_flight / threads)) for _ in range(threads)]

    def stop(self) -> None:
        """Stop accepting; answer what is on open connections; then return from ``serve``
        (safe from a signal handler or another thread)."""
        self.stopping = True
        for loop in self.loops:
            loop.loop.wake()

    def serve(self, graceful_timeout: float = 30.0) -> None:
        self.graceful_timeout = graceful_timeout
        for sock in self.listeners:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # The kernel holds a connection until its first bytes arrive: a client that
                # connects and says nothing costs no slot, and one that does is accepted with
                # its head.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                max(1, int(self.limits.header_timeout)))
        others = [threading.Thread(target=loop.run, name=f"wasisup-loop-{i}", daemon=True)
                  for i, loop in enumerate(self.loops[1:], 1)]
        for thread in others:
            thread.start()
        self.loops[0].run(self.on_tick)
        for thread in others:
            thread.join()

    def queued(self) -> int:
        """Requests waiting for admission, in every loop."""
        return sum(len(loop.queued) for loop in self.loops)

    def start_drain(self) -> None:
        """The first loop to see the stop sets the deadline every loop drains by."""
        with self._lock:
            if self.drain_deadline == math.inf:
                self.drain_deadline = time.monotonic() + self.graceful_timeout

    def stopped_listening(self) -> bool:
        """A loop no longer watches the listeners: True for the last one (it closes them)."""
        with self._lock:
            self._listening -= 1
            return self._listening == 0


class ServerLoop:
    """One loop's connections, guest calls and admission queue."""

    def __init__(self, server: Server, max_connections: int, max_calls: int) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.max_connections = max_connections
        self.max_calls = max_calls
        self.loop = Loop()
        self.connections: dict[int, Connection] = {}
        self.sessions: dict[Connection, Session] = {}  # the HTTP/2 connections
        self.calls: dict[Client, GuestCall] = {}  # in flight
        self.queued: deque[tuple[Client, RequestHead]] = deque()  # waiting for admission
        self._waits: dict[GuestCall, _Wait] = {}  # what each suspended call waits for
        self._accepting = False
        self._deferred_at = -math.inf  # when the loop last left a new connection to the others
        self._listen_after = 0.0  # ... and until when
        self._draining = False
        self._idle_work = False  # a request ended since the loop last had nothing to do

    # -- the loop
    def run(self, on_tick: Optional[Callable[[], None]] = None) -> None:
        loop, server = self.loop, self.server
        loop.call_at(time.monotonic() + SWEEP_INTERVAL, self._sweep)
        if on_tick is not None:
            self._tick(on_tick)
        self._update_accepting()
        while True:
            if server.stopping and not self._draining:
                self._start_drain()
            if self._draining and (not self.connections
                                   or time.monotonic() > server.drain_deadline):
                break
            if not loop.busy and self._idle_work and not self._draining:
                self._idle_work = False
                self._run_hook(server.on_idle)
            loop.run_once(MAX_WAIT)  # (at once while a guest is ready to run)
            self._update_accepting()
        self._shutdown()

    def _tick(self, on_tick: Callable[[], None]) -> None:
        self._run_hook(on_tick)
        self.loop.call_at(time.monotonic() + TICK_INTERVAL, lambda: self._tick(on_tick))

    @staticmethod
    def _run_hook(hook: Optional[Callable[[], None]]) -> None:
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("%s failed", getattr(hook, "__qualname__", hook))

    # -- accepting
    def _accept(self, listener: socket.socket, events: int) -> None:
        """Take new connections, unless this loop should leave them to a less loaded one for a
        while first (it stops listening meanwhile). An idle loop takes one at a time (the
        listener stays readable while more wait, and the next may be for another loop); one
        back from leaving them takes a few (they waited for it)."""
        now = time.monotonic()
        delay = self._accept_delay()
        if delay and now - self._deferred_at > 2 * ACCEPT_DELAY_MAX:  # (not just back from one)
            self._deferred_at, self._listen_after = now, now + delay
            self.loop.call_at(self._listen_after, self._update_accepting)
            return
        for _ in range(ACCEPT_BATCH if delay else 1):
            if not self._can_accept():
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            self._open(sock, peer)

    def _open(self, sock: socket.socket, peer: object) -> None:
        """A new connection: its TLS handshake or its first request head (which often
        arrives with it)."""
        sock.setblocking(False)
        tls = self.server.tls
        if tls is None:
            self._read_head(self._adopt(sock, peer))
        elif looks_like_plain_http(sock):
            self._refuse(self._adopt(sock, peer), 400,
                         "this port speaks HTTPS: plain HTTP was sent to it")
        else:
            try:
                wrapped = tls.wrap(sock)
            except (OSError, ValueError):
                sock.close()
                return
            self._handshake(self._adopt(wrapped, peer))

    def _adopt(self, sock: socket.socket, peer: object) -> Connection:
        conn = Connection(sock, peer, self.limits)
        self.connections[conn.fd] = conn
        if self._draining:
            conn.must_close = True
        return conn

    def _handshake(self, conn: Connection) -> None:
        try:
            done = conn.handshake()
        except ClientGone as exc:
            log.debug("%s: %s", conn.peer, exc)
            if self.handler.metrics is not None:
                self.handler.metrics.tls_handshake_failures.inc()
            self._close(conn)
            return
        if not done:
            self._watch(conn, IN if conn.tls_wants & READABLE else OUT)
        elif self.server.http2 is not None and conn.sock.selected_alpn_protocol() == "h2":
            self._start_http2(conn)
        else:
            self._read_head(conn)

    def _start_http2(self, conn: Connection) -> None:
        session = Session(conn, self.loop, self.server.http2, self.max_calls, self._dispatch,
                          self._end_http2, self.handler.metrics)
        self.sessions[conn] = session
        if self._draining:
            session.go_away()
        session.start()

    def _end_http2(self, conn: Connection) -> None:
        if self.sessions.pop(conn, None) is not None:  # (not if the loop closed it already)
            self._flush(conn)

    def _accept_delay(self) -> float:
        if self.server.alone:
            return 0.0
        delay = len(self.connections) * ACCEPT_DELAY_PER_CONNECTION
        return min(ACCEPT_DELAY_MAX, delay + (ACCEPT_DELAY_BUSY if self.loop.busy else 0.0))

    def _can_accept(self) -> bool:
        return not (self.server.stopping or len(self.connections) >= self.max_connections
                    or len(self.calls) >= self.max_calls or time.monotonic() < self._listen_after)

    def _update_accepting(self) -> None:
        if self._can_accept() != self._accepting:
            self._accepting = not self._accepting
            for listener in self.server.listeners:
                if self._accepting:
                    self.loop.listen(listener.fileno(), functools.partial(self._accept, listener))
                else:
                    self.loop.forget(listener.fileno())

    # -- connections the loop holds: heads, flushes, lingering closes
    def _watch(self, conn: Connection, events: int) -> None:
        self.loop.watch(conn.fd, events, functools.partial(self._on_event, conn))

    def _on_event(self, conn: Connection, events: int) -> None:
        if conn.state == "head":
            self._read_head(conn)
        elif conn.state == "handshake":
            self._handshake(conn)
        elif conn.state == "flush":
            self._flush(conn)
        elif conn.state == "linger":
            self._linger(conn)

    def _read_head(self, conn: Connection) -> None:
        if self.server.h2c and not conn.requests and not conn.partial_head:
            prior_knowledge = conn.opens_with_preface()
            if prior_knowledge is None:
                self._watch(conn, IN)
                return
            if prior_knowledge:
                self._start_http2(conn)
                return
        try:
            request = conn.read_head()
        except BadRequest as exc:
            self._refuse(conn, exc.status, exc.reason)
            return
        except ClientGone:
            self._close(conn)
            return
        if request is None:
            self._watch(conn, IN)
        else:
            self._dispatch(conn, request)

    def _refuse(self, conn: Connection, status: int, reason: str) -> None:
        conn.send_error(status, reason)
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what is left of a response; then the next request, or a polite close."""
        conn.state = "flush"
        try:
            done = conn.flush()
        except OSError:
            self._close(conn)
            return
        if not done:
            conn.writing.waiting(time.monotonic())
            self._watch(conn, OUT)
        elif not conn.finish_cycle():
            self._start_linger(conn)
        else:
            conn.state = "head"  # between requests: a pipelined head may already be here
            self._read_head(conn)

    def _start_linger(self, conn: Connection) -> None:
        """Close the sending side, then drop what the client still sends for a while: closing
        with unread input would reset the connection and could destroy our last response."""
        try:
            conn.close_write()
        except OSError:
            self._close(conn)
            return
        conn.state = "linger"
        conn.idle_since = time.monotonic()
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    self._close(conn)
                    return
        except (BlockingIOError, InterruptedError):
            self._watch(conn, IN)
        except OSError:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        self.sessions.pop(conn, None)
        if self.connections.pop(conn.fd, None) is conn:
            self.loop.forget(conn.fd)
            conn.close()

    def _sweep(self) -> None:
        """Enforce the deadlines of the connections the loop holds."""
        now = time.monotonic()
        self.loop.call_at(now + SWEEP_INTERVAL, self._sweep)
        self._run_hook(self.server.on_sweep)
        for conn in list(self.connections.values()):
            state = conn.state
            if state in ("head", "handshake"):  # (a handshake is due within the head's time)
                if conn.head_started is not None:
                    if now - conn.head_started > self.limits.header_timeout:
                        if conn.partial_head:
                            self._refuse(conn, 408, "the request head did not arrive in time")
                        else:
                            self._close(conn)
                elif now - conn.idle_since > self.limits.keep_alive:
                    self._close(conn)
            elif state == "flush":
                if conn.writing.expired(now):
                    self._close(conn)
            elif state == "linger":
                if now - conn.idle_since > CLOSE_DRAIN_TIME:
                    self._close(conn)
            elif state == "h2":
                self.sessions[conn].sweep(now)

    # -- guest calls
    def _dispatch(self, conn: Client, request: RequestHead) -> None:
        """A complete request: its guest call starts next if the loop has room (after the
        work already waiting to run), else in turn."""
        conn.state = "request"
        if self.server.stopping:
            conn.must_close = True
        if len(self.calls) < self.max_calls:
            self._admit(conn, request)
        else:
            self.queued.append((conn, request))

    def _admit(self, conn: Client, request: RequestHead) -> None:
        if isinstance(conn, Stream) and conn.lost_reason:  # (reset while it waited)
            conn.session.finish(conn)
            return
        call = GuestCall(self.handler, conn, request)
        self.calls[conn] = call
        self.loop.call_soon(functools.partial(self._begin, call))

    def _begin(self, call: GuestCall) -> None:
        if call.start():
            self._step(call)
        else:
            self._ended(call)

    def _step(self, call: GuestCall) -> None:
        """Run the guest until it waits or returns."""
        if call.step():
            self._ended(call)
        elif call.guest.waiting:
            self._suspend(call)
        else:  # it yielded its turn (an epoch tick): the others run first
            self.loop.call_soon(functools.partial(self._step, call))

    def _suspend(self, call: GuestCall) -> None:
        """Watch what a guest waits for; the first of it ready runs the guest again. The
        client's connection is watched in any case: a client that leaves cancels the call."""
        interests, wake_at = call.waits()
        wanted: dict[int, int] = {call.conn.fd: 0}
        for fd, events in interests:
            wanted[fd] = wanted.get(fd, 0) | events
        previous = self._waits.get(call)
        wait = self._waits[call] = _Wait()
        for fd, events in wanted.items():
            mask = (IN if events & READABLE else 0) | (OUT if events & WRITABLE else 0)
            if fd == call.conn.fd:
                mask |= CLOSED
            wait.watchers[fd] = functools.partial(self._wake, call, wait, fd)
            self.loop.watch(fd, mask, wait.watchers[fd])
        if previous is not None:
            self._unwatch(previous)
        if call.conn.left(0):  # (an HTTP/2 stream reset before its guest came to wait)
            self.loop.signal(call.conn.fd, CLOSED)
        if wake_at is not None:
            wait.timer = self.loop.call_at(wake_at / 1e9,
                                           functools.partial(self._wake, call, wait, -1, 0))

    def _wake(self, call: GuestCall, wait: "_Wait", fd: int, events: int) -> None:
        if wait.done:  # (another of its sockets, or its deadline, came first)
            return
        wait.done = True
        if wait.timer is not None:
            wait.timer.cancel()
        if fd == call.conn.fd and call.conn.left(events) and not call.reads_body:
            call.cancel()
            self._ended(call)
            return
        self.loop.call_soon(functools.partial(self._step, call))

    def _ended(self, call: GuestCall) -> None:
        """A guest call is over: its connection goes on to the rest of the response, and the
        next request in line gets its place."""
        conn = call.conn
        del self.calls[conn]
        wait = self._waits.pop(call, None)
        if wait is not None:
            self._unwatch(wait, keep=conn.fd)
        self._idle_work = True
        if isinstance(conn, Stream):
            conn.session.finish(conn)
        else:
            self._flush(conn)
        while self.queued and len(self.calls) < self.max_calls:
            self._admit(*self.queued.popleft())

    def _unwatch(self, wait: "_Wait", keep: int = -1) -> None:
        """Stop watching the sockets of a wait that is over (those no other owner watches
        now: an upstream connection may since have gone to another call)."""
        for fd, watcher in wait.watchers.items():
            if fd != keep:
                self.loop.forget(fd, watcher)

    # -- stopping
    def _start_drain(self) -> None:
        """Stop listening, then take what is already in the backlog; the last loop to do so
        closes the listeners (a connection left in their backlog would be reset)."""
        self._draining = True
        self.server.start_drain()
        for conn in self.connections.values():
            conn.must_close = True
        for session in list(self.sessions.values()):
            session.go_away()
        if self._accepting:
            self._accepting = False
            for listener in self.server.listeners:
                self.loop.forget(listener.fileno())
        self._take_backlog()
        if self.server.stopped_listening():
            self._take_backlog()
            for listener in self.server.listeners:
                listener.close()

    def _take_backlog(self) -> None:
        for listener in self.server.listeners:
            while True:
                try:
                    sock, peer = listener.accept()
                except OSError:
                    break
                self._open(sock, peer)

    def _shutdown(self) -> None:
        for call in list(self.calls.values()):
            call.cancel()
        for conn in list(self.connections.values()):
            self._close(conn)
        self.loop.close()


class _Wait:
    """One suspension of a guest call: what watches its sockets, and its deadline's timer."""

    __slots__ = ("watchers", "timer", "done")

    def __init__(self) -> None:
        self.watchers: dict[int, Callable[[int], None]] = {}
        self.timer: Optional[Timer] = None
        self.done = False
