"""Upstream connections for guests' outbound requests: non-blocking sockets (TLS with SNI and
the system CA store for https) and a keep-alive pool shared by a worker's event loops.

Nothing here blocks a loop: a name is resolved on a resolver thread (``getaddrinfo`` blocks),
and it, the connect and the TLS handshake advance a step each time the guest's loop looks at
them, reporting what they wait for (``fileno`` and ``wants``).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from ..wasi.io import READABLE, WRITABLE
from .outbound_policy import Target
from .tls import handshake_step

# Kept per origin for reuse; more than this many idle connections to one origin are closed. A
# worker passes its cap on requests in flight: fewer would close connections a burst of answers
# hands back only to open them again for the next burst.
IDLE_PER_ORIGIN = 1000
# An idle pooled connection older than this is closed rather than reused (upstream servers
# close theirs too; nginx after 75 s, many after 5-15 s).
IDLE_TIMEOUT = 15.0


class ConnectFailed(Exception):
    """No connection could be made; ``code`` is the wasi:http error-code."""

    def __init__(self, code: object, detail: str) -> None:
        super().__init__(detail)
        self.code = code


DNS_ERROR = ("DNS-error", {"rcode": "address not available", "info-code": None})
RESOLVER_THREADS = 4  # names resolved at once, per worker
_resolver: Optional[ThreadPoolExecutor] = None  # made on first use, in the worker


class Resolution:
    """A name being resolved on a resolver thread; ``fileno`` turns readable when it is."""

    def __init__(self, target: Target) -> None:
        global _resolver
        if _resolver is None:
            _resolver = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="wasisup-dns")
        self.host = target.host
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._signalled = self._closed = False  # the pipe is closed once both are true
        self._future = _resolver.submit(socket.getaddrinfo, target.host, target.port,
                                        type=socket.SOCK_STREAM)
        self._future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:  # (on the resolver thread, or in close() when cancelled)
            self._signalled = True
            if self._closed:
                self._close_pipe()
            else:
                os.write(self._ready_w, b"x")

    def fileno(self) -> int:
        return self._ready_r

    def addresses(self) -> Optional[list[tuple]]:
        """The addresses once resolved (None while under way); ConnectFailed if it failed."""
        if not self._future.done():
            return None
        try:
            return self._future.result()
        except (OSError, UnicodeError) as exc:
            raise ConnectFailed(DNS_ERROR, f"resolving {self.host}: {exc}") from None

    def close(self) -> None:
        self._future.cancel()  # (a lookup not started yet is dropped: its _done runs now)
        with self._lock:
            self._closed = True
            if self._signalled:  # else _done closes the pipe when the lookup ends
                self._close_pipe()

    def _close_pipe(self) -> None:
        os.close(self._ready_r)
        os.close(self._ready_w)


class UpstreamConnection:
    """One non-blocking connection to an origin: its name resolved (unless it is an address),
    then TCP, then TLS for https."""

    def __init__(self, target: Target, tls: Optional[ssl.SSLContext],
                 addresses: Optional[list[tuple]] = None,
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.target = target
        self.reused = False
        self._on_close = on_close
        self._tls = tls
        self.sock: Optional[socket.socket] = None
        self._resolution: Optional[Resolution] = None
        if addresses is None:
            self._resolution = Resolution(target)
            self._phase, self._wants = "dns", READABLE  # -> "tcp" -> "tls" (https) -> "open"
        else:
            self._connect(addresses)

    def _connect(self, addresses: list[tuple]) -> None:
        self._addresses = addresses
        self.sock = self._start(addresses.pop(0))
        self._phase, self._wants = "tcp", WRITABLE

    def _start(self, address: tuple) -> socket.socket:
        family, kind, proto, _, sockaddr = address
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(sockaddr)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            raise ConnectFailed(_connect_code(error), f"connect: {errno.errorcode.get(error, error)}")
        return sock

    def fileno(self) -> int:
        return self.sock.fileno() if self._resolution is None else self._resolution.fileno()

    @property
    def open(self) -> bool:
        return self._phase == "open"

    def wants(self) -> int:
        """What the socket must become before the next step: READABLE and/or WRITABLE."""
        return self._wants

    def establish(self) -> bool:
        """Advance the name's resolution, the TCP connect and the TLS handshake; True once
        the connection is usable."""
        if self._resolution is not None:
            addresses = self._resolution.addresses()
            if addresses is None:
                return False
            self._resolution.close()
            self._resolution = None
            self._connect(addresses)
        if self._phase == "tcp":
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == 0 and not _writable_now(self.sock):
                return False
            if error:
                self.sock.close()
                if not self._addresses:
                    raise ConnectFailed(_connect_code(error), f"connect: {errno.errorcode.get(error, error)}")
                self.sock = self._start(self._addresses.pop(0))
                return False
            if self._tls is None:
                self._phase = "open"
                return True
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.target.host,
                                              do_handshake_on_connect=False)
            self._phase = "tls"
        try:
            self._wants = handshake_step(self.sock)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError) as exc:
            raise ConnectFailed("TLS-protocol-error", f"TLS handshake: {exc}") from None
        if self._wants:
            return False
        self._phase = "open"
        return True

    def send(self, data: memoryview) -> int:
        """Send what the socket takes now (0 if none); OSError if the connection broke."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def recv(self, size: int) -> Optional[bytes]:
        """Up to ``size`` bytes available now (b"": the peer closed), or None if none are."""
        try:
            return self.sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLZeroReturnError:
            return b""

    def recv_into(self, view: memoryview) -> Optional[int]:
        """Bytes read now into ``view`` (0: the peer closed), or None if none are available."""
        try:
            return self.sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLZeroReturnError:
            return 0

    @property
    def plain(self) -> bool:
        """Bytes arrive as sent (no TLS): the kernel can move them on without us reading them."""
        return not isinstance(self.sock, ssl.SSLSocket)

    def splice_into(self, pipe: int, size: int) -> Optional[int]:
        """Move up to ``size`` bytes from the (plain) socket into ``pipe`` inside the kernel:
        the count (0: the peer closed), or None if none are available."""
        try:
            return os.splice(self.sock.fileno(), pipe, size, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return None

    def buffered(self) -> bool:
        """TLS may hold decrypted bytes the socket no longer signals as readable."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def close(self) -> None:
        if self._resolution is not None:
            self._resolution.close()
            self._resolution = None
        if self.sock is not None:
            self.sock.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def _writable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), WRITABLE)
    return bool(poller.poll(0))


def _connect_code(error: int) -> object:
    if error == errno.ECONNREFUSED:
        return "connection-refused"
    if error in (errno.ETIMEDOUT,):
        return "connection-timeout"
    if error in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return "destination-unavailable"
    return ("internal-error", f"connect: {errno.errorcode.get(error, error)}")


class Pool:
    """Idle keep-alive connections per origin, shared by a worker's threads."""

    def __init__(self, idle_per_origin: int = IDLE_PER_ORIGIN, idle_timeout: float = IDLE_TIMEOUT,
                 metrics: Any = None) -> None:
        self.idle_per_origin = idle_per_origin
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self._idle: dict[tuple[str, str, int], list[tuple[UpstreamConnection, float]]] = {}
        self._lock = threading.Lock()
        self._tls: Optional[ssl.SSLContext] = None
        self.open = 0  # connections open now, in use or idle

    @property
    def idle(self) -> int:
        """Connections kept for reuse now."""
        return sum(map(len, list(self._idle.values())))

    def connect(self, target: Target) -> UpstreamConnection:
        """A pooled connection to ``target`` if a live one is idle, else a new one (connecting)."""
        return self._checkout(target) or self.connect_new(target)

    def connect_new(self, target: Target) -> UpstreamConnection:
        """A new connection to ``target`` (its name's resolution or its connect under way)."""
        try:  # an address needs no resolver
            addresses: Optional[list[tuple]] = socket.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            addresses = None
        conn = UpstreamConnection(target, self._tls_context() if target.tls else None, addresses,
                                  on_close=self._closed)
        with self._lock:
            self.open += 1
        if self.metrics is not None:
            self.metrics.outbound_opened.inc()
        return conn

    def _closed(self) -> None:
        with self._lock:
            self.open -= 1

    def _checkout(self, target: Target) -> Optional[UpstreamConnection]:
        cutoff = time.monotonic() - self.idle_timeout
        while True:
            with self._lock:
                idle = self._idle.get(target.origin)
                if not idle:
                    return None
                conn, since = idle.pop()
            # A pooled socket that is readable has been closed by the upstream (or sent junk).
            if since < cutoff or _readable_now(conn) or conn.buffered():
                conn.close()
                continue
            conn.reused = True
            if self.metrics is not None:
                self.metrics.outbound_reused.inc()
            return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose exchange ended cleanly, for the next request to its origin."""
        with self._lock:
            idle = self._idle.setdefault(conn.target.origin, [])
            if len(idle) < self.idle_per_origin:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        cutoff = time.monotonic() - self.idle_timeout
        expired = []
        with self._lock:
            for origin, idle in self._idle.items():
                expired += [conn for conn, since in idle if since < cutoff]
                idle[:] = [(conn, since) for conn, since in idle if since >= cutoff]
        for conn in expired:
            conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _readable_now(conn: UpstreamConnection) -> bool:
    poller = select.poll()
    poller.register(conn.fileno(), READABLE)
    return bool(poller.poll(0))
