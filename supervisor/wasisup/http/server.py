"""The worker's HTTP/1.1 server: one event loop owns every socket that is not being served,
a fixed set of request threads run the guest.

The loop (the worker's main thread) accepts connections — only while a request thread is free
and the worker is under ``worker_connections``, so the rest wait in the shared backlog for a
worker that can serve them — reads request heads into h11 until one is complete (within the
header timeout), holds kept-alive connections between requests, finishes responses the client
was slow to take, and closes politely. A request thread gets a connection with a complete head,
runs the guest (which does its own I/O, see ``wasisup.wasi.io``), then hands the connection
back by re-arming it in epoll, or serves the next request itself if the client already sent it.

A graceful stop accepts what is already in the backlog, then closes the listeners; requests
already on a connection or arriving on it are answered with ``Connection: close``; idle
connections are closed after the keep-alive timeout; all of it bounded by the graceful timeout.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import select
import socket
import threading
import time
from typing import Callable, Optional

from .connection import ClientGone, Connection
from .request_head import BadRequest, Limits, RequestHead

log = logging.getLogger("wasisup.server")

IN, OUT = select.EPOLLIN, select.EPOLLOUT
ONESHOT = select.EPOLLONESHOT
SWEEP_INTERVAL = 0.25  # how often deadlines are checked (head, keep-alive, slow clients)
OVERFLOW_ACCEPT_INTERVAL = 0.2  # see Server._overflow_turn
# How long a request thread with nothing else to do waits for the same client's next request
# before handing the connection back to the loop: a busy keep-alive client is then served
# without a trip through the loop and another thread.
NEXT_REQUEST_WAIT = 0.001
CLOSE_DRAIN_TIME = 2.0  # reading and dropping what a client still sends after we close
TICK_INTERVAL = 1.0

Handler = Callable[[Connection, RequestHead], None]


class Server:
    """Serves HTTP/1.1 on already-bound listening sockets until ``stop``."""

    def __init__(self, listeners: list[socket.socket], handler: Handler, threads: int = 4,
                 limits: Limits = Limits(), worker_connections: int = 1000,
                 on_tick: Optional[Callable[[], None]] = None,
                 on_idle: Optional[Callable[[], None]] = None) -> None:
        self.listeners = {sock.fileno(): sock for sock in listeners}
        self.handler = handler
        self.threads = threads
        self.limits = limits
        self.worker_connections = worker_connections
        self.on_tick = on_tick  # the loop calls it every second (the worker's heartbeat)
        self.on_idle = on_idle  # a request thread calls it before it waits for work
        self.connections: dict[int, Connection] = {}
        self._epoll = select.epoll()
        self._jobs: queue.SimpleQueue[Optional[Connection]] = queue.SimpleQueue()
        self._busy = 0  # connections queued for or held by a request thread
        self._busy_lock = threading.Lock()
        self._accepting = False
        self._saturated_since = math.inf  # every request thread busy since (inf: not so)
        self._last_overflow = 0.0  # when a connection was last taken while saturated
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._drain_deadline = 0.0

    def stop(self) -> None:
        """Stop accepting; answer what is on open connections; then return from ``serve``
        (safe from a signal handler or another thread)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the loop
    def serve(self, graceful_timeout: float = 30.0) -> None:
        for sock in self.listeners.values():
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # The kernel holds a connection until its first bytes arrive: a client that
                # connects and says nothing costs no slot, and one that does is accepted with
                # its head, so a worker knows at once that a thread is taken.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                max(1, int(self.limits.header_timeout)))
        self._epoll.register(self._wake_r, IN)
        self._set_accepting(True)
        workers = [threading.Thread(target=self._work, name=f"wasisup-req-{i}", daemon=True)
                   for i in range(self.threads)]
        for thread in workers:
            thread.start()
        next_sweep = next_tick = time.monotonic()
        draining = False
        while True:
            if self._stopping and not draining:
                draining = True
                self._drain_deadline = time.monotonic() + graceful_timeout
                self._start_drain()
            if draining and (not self.connections and self._busy == 0
                             or time.monotonic() > self._drain_deadline):
                break
            wake_by = min(next_sweep, next_tick)
            if not self._accepting:  # (when it is, a new connection wakes the loop anyway)
                wake_by = min(wake_by, self._overflow_turn())
            timeout = max(0.0, wake_by - time.monotonic())
            for fd, events in self._epoll.poll(timeout):
                if fd in self.listeners:
                    self._accept(self.listeners[fd])
                elif fd == self._wake_r:
                    self._drain_wakeups()
                else:
                    conn = self.connections.get(fd)
                    if conn is not None:
                        self._on_event(conn, events)
            self._update_accepting()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self._sweep(now)
            if now >= next_tick:
                next_tick = now + TICK_INTERVAL
                if self.on_tick is not None:
                    self.on_tick()
        self._shutdown(workers)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        """Accept while a request thread is free: the others stay in the shared backlog, for
        a worker that can serve them (or for this one's overflow turn)."""
        while self._can_accept():
            if self._busy >= self.threads:
                self._last_overflow = time.monotonic()
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            conn = Connection(sock, peer, self.limits)
            self.connections[conn.fd] = conn
            self._epoll.register(conn.fd, IN | ONESHOT)
            self._read_head(conn)  # the head often arrives with the connection

    def _can_accept(self) -> bool:
        if self._stopping or len(self.connections) >= self.worker_connections:
            return False
        return self._busy < self.threads or time.monotonic() >= self._overflow_turn()

    def _overflow_turn(self) -> float:
        """When a worker whose threads are all busy may take one more connection anyway.

        A worker with a free thread takes a new connection at once. When every worker is busy
        (keep-alive clients keep them so), a connection in the backlog would otherwise wait
        for a moment no worker happens to be full, which under steady load may not come: so a
        busy worker takes one after it has been busy for a while, one per such while.
        """
        return max(self._saturated_since, self._last_overflow) + OVERFLOW_ACCEPT_INTERVAL

    def _update_accepting(self) -> None:
        if self._busy < self.threads:
            self._saturated_since = math.inf
        elif self._saturated_since == math.inf:
            self._saturated_since = time.monotonic()
        if self._can_accept() != self._accepting:
            self._set_accepting(not self._accepting)

    def _set_accepting(self, accepting: bool) -> None:
        for fd in self.listeners:
            if accepting:
                self._epoll.register(fd, IN)
            else:
                self._epoll.unregister(fd)
        self._accepting = accepting

    def _on_event(self, conn: Connection, events: int) -> None:
        if conn.state == "head":
            self._read_head(conn)
        elif conn.state == "flush":
            self._flush(conn)
        elif conn.state == "linger":
            self._linger(conn)

    def _read_head(self, conn: Connection) -> None:
        try:
            request = conn.read_head()
        except BadRequest as exc:
            self._refuse(conn, exc.status, exc.reason)
            return
        except ClientGone:
            self._close(conn)
            return
        if request is None:
            self._arm(conn, IN)
        else:
            self._dispatch(conn, request)

    def _dispatch(self, conn: Connection, request: RequestHead) -> None:
        conn.state = "request"
        conn.request = request
        with self._busy_lock:
            self._busy += 1
        self._jobs.put(conn)

    def _refuse(self, conn: Connection, status: int, reason: str) -> None:
        conn.send_error(status, reason)
        self._finish(conn, keep=False)

    def _flush(self, conn: Connection) -> None:
        try:
            done = conn.flush()
        except OSError:
            self._close(conn)
            return
        if not done:
            conn.writing.waiting(time.monotonic())
            self._arm(conn, OUT)
        elif not conn.finish_cycle():
            self._start_linger(conn)
        else:
            self._await_next(conn)

    def _await_next(self, conn: Connection) -> None:
        """Between requests: a pipelined head may already be here, else wait for one."""
        conn.state = "head"
        self._read_head(conn)

    def _start_linger(self, conn: Connection) -> None:
        """Close the sending side, then drop what the client still sends for a while: closing
        with unread input would reset the connection and could destroy our last response."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
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
            self._arm(conn, IN)
        except OSError:
            self._close(conn)

    def _arm(self, conn: Connection, events: int) -> None:
        try:
            self._epoll.modify(conn.fd, events | ONESHOT)
        except OSError:  # closed meanwhile
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        if self.connections.pop(conn.fd, None) is conn:
            conn.close()
            if not self._accepting and not self._stopping:
                self._wake()

    def _sweep(self, now: float) -> None:
        """Enforce the deadlines of connections the loop holds."""
        for conn in list(self.connections.values()):
            state = conn.state
            if state == "head":
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

    # -- request threads
    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            try:
                self._serve(conn)
            except Exception:
                log.exception("connection from %s failed", conn.peer)
                self._close(conn)
            try:
                if self.on_idle is not None:
                    self.on_idle()
            except Exception:
                log.exception("preparing for the next request failed")
            finally:
                with self._busy_lock:
                    self._busy -= 1
                    wake = not self._accepting or self._stopping
                if wake:
                    self._wake()

    def _serve(self, conn: Connection) -> None:
        """Serve the connection's request, and the next ones while the client has sent them."""
        request = conn.request
        while request is not None:
            conn.request = None
            if self._stopping:
                conn.must_close = True
            try:
                self.handler(conn, request)
            except BadRequest as exc:
                conn.send_error(exc.status, exc.reason)
            try:
                done = conn.flush()
            except OSError:
                self._close(conn)
                return
            keep = done and conn.finish_cycle()
            if not done:
                self._finish(conn, keep=None)
                return
            if not keep:
                self._finish(conn, keep=False)
                return
            try:
                request = conn.read_head(receive=False)  # pipelined, already read
                if request is None and self._jobs.empty() and conn.readable_within(NEXT_REQUEST_WAIT):
                    request = conn.read_head()  # a busy client's next request: serve it here
            except BadRequest as exc:
                conn.send_error(exc.status, exc.reason)
                self._finish(conn, keep=False)
                return
            except ClientGone:
                self._close(conn)
                return
        self._finish(conn, keep=True)

    def _finish(self, conn: Connection, keep: Optional[bool]) -> None:
        """Hand a connection to the loop: to finish sending (``keep`` None), to wait for the
        next request (True) or to close (False)."""
        if conn.out:
            conn.state = "flush"
            conn.writing.waiting(time.monotonic())
            self._arm(conn, OUT)
        elif keep:
            conn.state = "head"
            self._arm(conn, IN)
        else:
            self._start_linger(conn)

    # -- stopping
    def _start_drain(self) -> None:
        """Take what is already in the backlog, then close the listeners."""
        for listener in self.listeners.values():
            while True:
                try:
                    sock, peer = listener.accept()
                except OSError:
                    break
                conn = Connection(sock, peer, self.limits)
                self.connections[conn.fd] = conn
                self._epoll.register(conn.fd, IN | ONESHOT)
        if self._accepting:
            self._set_accepting(False)
        for listener in self.listeners.values():
            listener.close()
        for conn in list(self.connections.values()):
            conn.must_close = True

    def _shutdown(self, workers: list[threading.Thread]) -> None:
        for _ in workers:
            self._jobs.put(None)
        deadline = max(self._drain_deadline, time.monotonic() + 0.1)
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self.connections.values()):
            if conn.state != "request":
                self._close(conn)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
