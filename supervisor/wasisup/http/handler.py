"""What happens to a request: its checked head -> the guest's incoming-handler -> the response.

``GuestCall`` builds the ``incoming-request`` (its body read from the connection on demand,
so the guest gets back-pressure) and a ``response-outparam`` whose response is written to the
connection as soon as the guest sets it, starts the guest's handler and runs it, a step at a
time, for the loop that drives it. A guest that traps or never answers gets a 500 if nothing
was sent yet; otherwise the connection is cut so the client sees an incomplete body.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Callable, Optional

from .. import tracing
from ..metrics import method_label
from ..runtime import Guest, GuestTrap, Runtime
from ..wasi.abi import Err, Trap
from ..wasi.http import Fields, IncomingRequest, OutgoingResponse, ResponseOutparam, attach_body
from ..wasi.io import READABLE, WRITABLE, Interest, IoError, StreamClosed, StreamFailed
from .connection import Connection, http_date
from .http2 import Stream
from .request_head import RequestHead

# Whom a guest call answers: an HTTP/1.1 connection's current request, or an HTTP/2 stream
# (each offers the request body as a byte source and takes the response the same way).
Client = Connection | Stream

log = logging.getLogger("wasisup.request")
access_log = logging.getLogger("gunicorn.access")  # gunicorn routes it to --access-logfile

# What `wasmtime serve` answers when the guest fails; the same bytes keep clients indifferent.
GUEST_FAILURE_PAGE = b"""<!doctype html>
<html>
<head>
    <title>500 Internal Server Error</title>
</head>
<body>
    <center>
        <h1>500 Internal Server Error</h1>
        <hr>
        wasmtime
    </center>
</body>
</html>"""


class ResponseWriter:
    """Writes the guest's response to the connection: the transport of its outgoing-body.

    Writes never block: what the client has not taken waits in the connection's output, and
    when that is full the guest waits (poll) for the client to read, at a minimum data rate.
    """

    def __init__(self, conn: Client) -> None:
        self.conn = conn
        self.state = "pending"  # -> "streaming" -> "done" | "aborted"
        self.status = 0
        self.body_bytes = 0  # of the response body, written so far
        self.client_gone = False  # the client stopped taking the response

    # -- the response-outparam callback
    def deliver(self, outcome: Any) -> None:
        if self.state != "pending":
            raise Trap("response-outparam.set called twice")
        if isinstance(outcome, Err):
            log.warning("the guest answered with an error: %s", _describe(outcome.value))
            self.send_guest_failure()
            return
        response: OutgoingResponse = outcome.value
        headers = response.header_fields.pairs()
        if response.outgoing_body is None and response.header_fields.first("content-length") is None:
            headers.append(("content-length", b"0"))  # no body at all, as hyper says it
        if response.header_fields.first("date") is None:
            headers.append(("date", http_date()))
        try:
            self.conn.start_response(response.status, headers)
        except ValueError as exc:
            self.send_error(500, f"the guest's response is not valid HTTP: {exc}")
            return
        self.status = response.status
        self.state = "streaming"
        if response.outgoing_body is None:
            self.finish(None)
        else:
            attach_body(response.outgoing_body, self)

    # -- Transport (for the guest's outgoing-body)
    def ready(self) -> bool:
        if self.state != "streaming":
            return True
        self.flush()
        return self.state != "streaming" or self.conn.room() > 0 or self._too_slow()

    def interest(self) -> Optional[Interest]:
        self.conn.writing.waiting(time.monotonic())
        return self.conn.fd, WRITABLE

    @property
    def deadline(self) -> Optional[int]:
        return self.conn.writing.deadline()

    def _too_slow(self) -> bool:
        if not self.conn.writing.expired(time.monotonic()):
            return False
        log.info("cutting off %s: it reads the response too slowly", _peer(self.conn))
        self._client_gone()
        self.conn.discard_output()
        return True

    def capacity(self, limit: int) -> int:
        if self.state != "streaming":
            raise StreamClosed()
        room = self.conn.room()
        if not room:
            self.flush()
            room = self.conn.room()
            if not room and self._too_slow():
                raise StreamFailed(IoError("the client reads the response too slowly",
                                           "connection-terminated"))
        return min(limit, room)

    def write(self, data: bytes | memoryview) -> None:
        self._send(self.conn.send_body, data)
        self.body_bytes += len(data)

    def _send(self, send: Callable[..., None], *args: Any) -> None:
        try:
            send(*args)
        except OSError as exc:
            self._client_gone()
            raise StreamFailed(IoError(f"sending the response failed: {exc}",
                                       "connection-terminated")) from None

    def takes_pipe(self) -> bool:
        return self.state == "streaming" and self.conn.takes_pipe()

    def write_from_pipe(self, pipe: int, count: int) -> None:
        self._send(self.conn.send_body_from_pipe, pipe, count)
        self.body_bytes += count

    def finish(self, trailers: Optional[Fields]) -> None:
        if self.state != "streaming":
            return
        if self.conn.end_response(trailers.pairs() if trailers is not None else []):
            self.state = "done"
        else:  # fewer bytes than the guest's content-length
            self.abort()

    def flush(self) -> None:
        """Send what the guest wrote so far (it is about to wait for something)."""
        try:
            self.conn.flush()
        except OSError:
            self._client_gone()

    def _client_gone(self) -> None:
        self.client_gone = True
        self.abort()

    def abort(self) -> None:
        """End the response short: the client gets what was written, then the connection
        closes, so it sees an incomplete body."""
        if self.state in ("streaming", "pending"):
            self.state = "aborted"
            self.conn.broken = True

    # -- what the handler does when the guest is done
    def send_error(self, status: int, message: str) -> None:
        """Answer with a plain-text error and close, if nothing was sent yet."""
        self._send_failure(status, "text/plain; charset=utf-8", f"{message}\n".encode(), close=True)

    def send_guest_failure(self) -> None:
        """The guest trapped or gave no response: the 500 page `wasmtime serve` sends."""
        self._send_failure(500, "text/html; charset=UTF-8", GUEST_FAILURE_PAGE, close=False)

    def _send_failure(self, status: int, content_type: str, body: bytes, close: bool) -> None:
        """Answer ``status`` if nothing was sent yet; otherwise cut the connection."""
        if self.state == "pending" and not self.conn.responded:
            self.status = status
            if close:
                self.conn.must_close = True
            self.conn.start_response(status, [("content-type", content_type.encode()),
                                              ("content-length", str(len(body)).encode()),
                                              ("date", http_date())])
            self.conn.send_body(body)
            self.conn.end_response()
            self.state = "done"
        elif self.state in ("pending", "streaming"):
            self.abort()


def _describe(error_code: Any) -> str:
    return error_code if isinstance(error_code, str) else f"{error_code[0]} {error_code[1]!r}"


class GuestHandler:
    """What every request's guest call shares: the runtime, limits, metrics, the access log."""

    def __init__(self, runtime: Runtime, body_limit: int = 0, metrics: Any = None,
                 on_request: Optional[Callable[[], None]] = None, trace_context: bool = True,
                 exporter: Optional[tracing.Exporter] = None) -> None:
        self.runtime = runtime
        self.body_limit = body_limit
        self.metrics = metrics
        self.on_request = on_request
        self.trace_context = trace_context  # take part in W3C trace context (see tracing)
        self.exporter = exporter
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        # gunicorn gives the access logger handlers only for --access-logfile; without one a
        # log record per request would be built just to be dropped.
        self.log_access = access_log.hasHandlers()

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def count(self, method: bytes, status: int, seconds: float, received: int, sent: int) -> None:
        """A request is over: into the metrics."""
        stats = self.metrics
        labels = (method_label(method.decode("ascii")), str(status))
        stats.in_flight.dec()
        stats.child(stats.requests, *labels).inc()
        stats.child(stats.duration, *labels).observe(seconds)
        stats.request_bytes.observe(received)
        stats.response_bytes.observe(sent)


class GuestCall:
    """One request in flight: the guest's incoming-handler run for it, from ``start`` through
    ``step``s (each runs the guest until it waits or returns) to the end of its response.

    Whoever drives it (the worker's loop) watches ``waits()`` while the guest waits, and calls
    ``cancel`` if the client goes away meanwhile.
    """

    def __init__(self, handler: GuestHandler, conn: Client, request: RequestHead) -> None:
        self.handler = handler
        self.conn = conn
        self.request = request
        self.request_id = handler.next_id()
        self.writer = ResponseWriter(conn)
        self.body = conn.request_body(handler.body_limit)
        self.guest: Optional[Guest] = None
        self.trace = tracing.incoming(request.fields) if handler.trace_context else None
        if handler.metrics is not None:
            handler.metrics.in_flight.inc()

    def start(self) -> bool:
        """Begin the guest's handler: True if it is under way (``step`` runs it), False if it
        is already over (no instance could be made)."""
        try:
            self.guest = guest = self.handler.runtime.acquire()
            request = self.request
            incoming = IncomingRequest(
                method=request.method.decode("ascii"),
                path_with_query=request.path_with_query,
                scheme=self.conn.scheme,
                authority=request.authority,
                headers=Fields.from_pairs(request.fields),
                body=self.body,
                waiter=guest.context.waiter)
            guest.context.waiter.before_sleep.append(self.writer.flush)
            guest.start(incoming, ResponseOutparam(self.writer.deliver), self.request_id,
                        self.trace)
            if self.handler.metrics is not None:
                self.handler.metrics.wait.observe(time.monotonic() - request.received)
        except Exception as exc:
            self._failed(exc)
            self._end()
            return False
        return True

    def step(self) -> bool:
        """Run the guest until it waits (False) or is done (True: the response is complete
        or cut, the request counted)."""
        try:
            if not self.guest.poll():
                return False
        except Exception as exc:
            self._failed(exc)
        else:
            self._returned()
        self._end()
        return True

    def waits(self) -> tuple[list[Interest], Optional[int]]:
        """What the guest waits for: the sockets, and a deadline (monotonic ns) or None."""
        waiter = self.guest.context.waiter
        return waiter.interests or [], waiter.wake_at

    @property
    def reads_body(self) -> bool:
        """Is the guest waiting for the client's body (so the client's end of it is news
        for the guest, not a sign it left)?"""
        return any(fd == self.conn.fd and events & READABLE for fd, events in self.waits()[0])

    def cancel(self) -> None:
        """The client went away: drop the guest's call wherever it waits; nothing more is sent."""
        self.guest.cancel()
        log.debug("[%s] %s went away: the guest's call was dropped", self.request_id,
                 _peer(self.conn))
        self.writer.client_gone = True
        self.writer.abort()
        self._end()

    def _failed(self, exc: Exception) -> None:
        if self._client_at_fault():
            return
        if not isinstance(exc, GuestTrap):
            log.error("[%s] request failed", self.request_id, exc_info=exc)
            self.writer.send_error(500, "internal server error")
            return
        self._count_trap(exc.kind)
        if exc.kind == "timeout":
            log.warning("[%s] guest passed its deadline: %s", self.request_id, exc)
            self.writer.send_error(504, f"{exc}")
        else:
            log.warning("[%s] guest %s: %s", self.request_id,
                        "could not start" if exc.kind == "instantiation" else "trapped", exc)
            self.writer.send_guest_failure()

    def _returned(self) -> None:
        if self._client_at_fault():
            return
        writer = self.writer
        if writer.state == "pending":
            self._count_trap("no-response")
            log.warning("[%s] the guest returned without setting a response", self.request_id)
            writer.send_guest_failure()
        elif writer.state == "streaming":
            log.warning("[%s] guest returned before finishing the response body", self.request_id)
            writer.abort()

    def _client_at_fault(self) -> bool:
        """A body the client got wrong (or sent too slowly) is answered 400/408/413, whatever
        the guest made of it; a client that stopped reading the response gets nothing more.
        Either way the guest's failure is not the guest's."""
        if self.writer.client_gone:
            return True
        if self.body.fault is None:
            return False
        self.writer.send_error(*self.body.fault)
        return True

    def _count_trap(self, kind: str) -> None:
        if self.handler.metrics is not None:
            self.handler.metrics.traps.labels(kind).inc()

    def _end(self) -> None:
        handler, writer = self.handler, self.writer
        if self.guest is not None:
            self.guest.context.waiter.before_sleep.clear()
            handler.runtime.release(self.guest)
            self.guest = None
        writer.flush()
        elapsed = time.monotonic() - self.request.received
        if handler.metrics is not None:
            handler.count(self.request.method, writer.status, elapsed, self.body.received,
                          writer.body_bytes)
        if handler.exporter is not None and self.trace is not None:
            request = self.request
            handler.exporter.server_span(
                self.trace, elapsed, request.method.decode("ascii"),
                self.conn.scheme,
                request.path_with_query or request.target.decode("ascii", "replace"),
                request.http_version.decode(), _peer(self.conn), writer.status, self.request_id)
        if handler.log_access:
            request = self.request
            access_log.info('%s "%s %s HTTP/%s" %s %.1fms [%s trace=%s]', _peer(self.conn),
                            request.method.decode(), request.target.decode(errors="replace"),
                            request.http_version.decode(), writer.status or "-",
                            elapsed * 1000, self.request_id,
                            self.trace.trace_id if self.trace is not None else "-")
        if handler.on_request is not None:
            handler.on_request()


def _peer(conn: Client) -> str:
    peer = conn.peer
    return peer[0] if isinstance(peer, tuple) else str(peer or "-")

