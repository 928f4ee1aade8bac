"""What happens to a request: its checked head -> the guest's incoming-handler -> the response.

``GuestHandler`` builds the ``incoming-request`` (its body read from the connection on demand,
so the guest gets back-pressure) and a ``response-outparam`` whose response is written to the
connection as soon as the guest sets it. A guest that traps or never answers gets a 500 if
nothing was sent yet; otherwise the connection is cut so the client sees an incomplete body.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Callable, Optional

import h11

from ..runtime import GuestTrap, Runtime
from ..wasi.abi import Err, Trap
from ..wasi.http import Fields, IncomingRequest, OutgoingResponse, ResponseOutparam, attach_body
from ..wasi.io import READABLE, WRITABLE, Interest, IoError, StreamClosed, StreamFailed
from .connection import Connection, http_date
from .request_head import RequestHead, clean_trailers

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


class ClientBody:
    """The request body as a byte source for the guest, read from the connection on demand
    (so the guest gets back-pressure); a client too slow to send it is cut off."""

    def __init__(self, conn: Connection, limit: int) -> None:
        self.conn = conn
        self.limit = limit
        self.received = 0
        self.fault: Optional[tuple[int, str]] = None  # what the client got wrong: (status, reason)
        self._chunks: list[bytes] = []
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
        deadline = self.conn.reading.deadline()
        return None if deadline is None else int(deadline * 1e9)

    def read(self, size: int) -> bytes:
        self._pull()
        if self._chunks:
            chunk = self._chunks.pop(0)
            if len(chunk) > size:
                self._chunks.insert(0, chunk[size:])
                chunk = chunk[:size]
            return chunk
        if self._error is not None:
            raise StreamFailed(self._error)
        if self._done:
            raise StreamClosed()
        return b""

    def trailers(self) -> Optional[list[tuple[bytes, bytes]]]:
        return self._trailers

    def close(self) -> None:
        """The guest is done with the body; the server drains or closes what is left."""


class ResponseWriter:
    """Writes the guest's response to the connection: the transport of its outgoing-body.

    Writes never block: what the client has not taken waits in the connection's output, and
    when that is full the guest waits (poll) for the client to read, at a minimum data rate.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.state = "pending"  # -> "streaming" -> "done" | "aborted"
        self.status = 0
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
        deadline = self.conn.writing.deadline()
        return None if deadline is None else int(deadline * 1e9)

    def _too_slow(self) -> bool:
        if not self.conn.writing.expired(time.monotonic()):
            return False
        log.info("cutting off %s: it reads the response too slowly", _peer(self.conn))
        self._client_gone()
        self.conn.out.clear()
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
    """Runs each request through the component's incoming-handler."""

    def __init__(self, runtime: Runtime, body_limit: int = 0, metrics: Any = None,
                 on_request: Optional[Callable[[], None]] = None) -> None:
        self.runtime = runtime
        self.body_limit = body_limit
        self.metrics = metrics
        self.on_request = on_request
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        # gunicorn gives the access logger handlers only for --access-logfile; without one a
        # log record per request would be built just to be dropped.
        self._log_access = access_log.hasHandlers()

    def __call__(self, conn: Connection, request: RequestHead) -> None:
        request_id = f"{self._prefix}-{next(self._ids)}"
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        writer = ResponseWriter(conn)
        try:
            self._run_guest(conn, request, writer, request_id)
        finally:
            writer.flush()
            elapsed = time.monotonic() - started
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(str(writer.status or 0)).inc()
                self.metrics.duration.observe(elapsed)
            if self._log_access:
                access_log.info('%s "%s %s HTTP/%s" %s %.1fms [%s]', _peer(conn),
                                request.method.decode(), request.target.decode(errors="replace"),
                                request.http_version.decode(), writer.status or "-",
                                elapsed * 1000, request_id)
            if self.on_request is not None:
                self.on_request()

    def _run_guest(self, conn: Connection, request: RequestHead, writer: "ResponseWriter",
                   request_id: str) -> None:
        body = ClientBody(conn, self.body_limit)
        try:
            with self.runtime.guest() as guest:
                incoming = IncomingRequest(
                    method=request.method.decode("ascii"),
                    path_with_query=request.path_with_query,
                    scheme="http",
                    authority=request.authority,
                    headers=Fields.from_pairs(request.fields),
                    body=body,
                    waiter=guest.context.waiter)
                hooks = guest.context.waiter.before_sleep
                hooks.append(writer.flush)
                try:
                    guest.handle(incoming, ResponseOutparam(writer.deliver), request_id)
                finally:
                    hooks.clear()
        except GuestTrap as trap:
            if self._client_at_fault(body, writer):
                return
            self._count_trap(trap.kind)
            if trap.kind == "timeout":
                log.warning("[%s] guest passed its deadline: %s", request_id, trap)
                writer.send_error(504, "the guest did not finish within the request timeout")
            else:
                log.warning("[%s] guest trapped: %s", request_id, trap)
                writer.send_guest_failure()
            return
        except Exception:
            log.exception("[%s] request failed", request_id)
            writer.send_error(500, "internal server error")
            return
        if self._client_at_fault(body, writer):
            return
        if writer.state == "pending":
            self._count_trap("no-response")
            log.warning("[%s] the guest returned without setting a response", request_id)
            writer.send_guest_failure()
        elif writer.state == "streaming":
            log.warning("[%s] guest returned before finishing the response body", request_id)
            writer.abort()

    @staticmethod
    def _client_at_fault(body: ClientBody, writer: "ResponseWriter") -> bool:
        """A body the client got wrong (or sent too slowly) is answered 400/408/413, whatever
        the guest made of it; a client that stopped reading the response gets nothing more.
        Either way the guest's failure is not the guest's."""
        if writer.client_gone:
            return True
        if body.fault is None:
            return False
        writer.send_error(*body.fault)
        return True

    def _count_trap(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.traps.labels(kind).inc()


def _peer(conn: Connection) -> str:
    peer = conn.peer
    return peer[0] if isinstance(peer, tuple) else str(peer or "-")

