"""Outbound HTTP for guests (wasi:http/outgoing-handler): urllib3's keep-alive pools.

Each outgoing request runs on a client thread: it streams the guest's body from a pipe as the
guest writes it, resolves the guest's future with the response head, then pumps the response
body into another pipe the guest reads (bounded: a slow guest slows the upstream read).
Failures become the wasi:http ``error-code`` the guest would get from wasmtime.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, Iterator, Optional

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError, MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError,
    ReadTimeoutError, SSLError,
)
from urllib3.util import SKIP_HEADER

from ..wasi.abi import Err
from ..wasi.http import (
    FutureIncomingResponse, Fields, IncomingResponse, OutgoingRequest, RequestOptions,
    attach_body, method_wire, scheme_wire,
)
from ..wasi.io import InboundPipe, IoError, OutboundPipe, Waker
from .outbound_policy import OutboundPolicy, Refused, Target, parse_target

log = logging.getLogger("wasisup.outbound")

DEFAULT_TIMEOUT_NS = 600 * 10**9  # wasmtime's default for every request-options timeout
READ_SIZE = 64 * 1024
DNS_ERROR = ("DNS-error", {"rcode": "address not available", "info-code": None})


class BodyAborted(Exception):
    """The guest dropped the request body without finishing it."""


def _seconds(ns: Optional[int]) -> float:
    return (ns if ns is not None else DEFAULT_TIMEOUT_NS) / 1e9


class OutboundClient:
    """Sends guest requests where ``policy`` allows, to exactly the host and port it checked."""

    def __init__(self, policy: OutboundPolicy = OutboundPolicy(),
                 max_connections: int = 64) -> None:
        self.policy = policy
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=max_connections, block=False,
                                        retries=False)

    def send(self, request: OutgoingRequest, options: RequestOptions,
             waker: Waker) -> FutureIncomingResponse:
        """wasi:http/outgoing-handler.handle: validate now, send on a client thread."""
        try:
            target = parse_target(scheme_wire(request.scheme() or "HTTPS"), request.authority())
            self.policy.check(target)
        except Refused as exc:
            raise Err(exc.error_code) from None
        future = FutureIncomingResponse(waker)
        pipe: Optional[OutboundPipe] = None
        if request.outgoing_body is not None:  # a guest that never asked for a body sends none
            pipe = OutboundPipe(waker)
            attach_body(request.outgoing_body, pipe)
        # A daemon thread per exchange: a fast stop (INT/QUIT) must not wait for upstreams.
        threading.Thread(target=self._exchange, name="wasisup-out", daemon=True,
                         args=(method_wire(request.method()), target,
                               request.path_with_query() or "/", request.header_fields.pairs(),
                               pipe, options, future)).start()
        return future

    def _exchange(self, method: str, target: Target, path_with_query: str,
                  headers: list[tuple[str, bytes]], body: Optional[OutboundPipe],
                  options: RequestOptions, future: FutureIncomingResponse) -> None:
        sent_headers: dict[str, Any] = {"host": target.authority, "user-agent": SKIP_HEADER,
                                        "accept-encoding": SKIP_HEADER}
        for name, value in headers:
            text = value.decode("latin-1")
            sent_headers[name] = f"{sent_headers[name]}, {text}" if isinstance(
                sent_headers.get(name), str) else text
        timeout = urllib3.Timeout(connect=_seconds(options.connect),
                                  read=_seconds(options.first_byte))
        try:
            upstream = self.pool.connection_from_host(target.host, target.port, target.scheme)
            response = upstream.urlopen(
                method, path_with_query, body=_chunks(body) if body else None,
                headers=sent_headers, redirect=False, retries=False, preload_content=False,
                decode_content=False, timeout=timeout, assert_same_host=False)
        except Exception as exc:  # every failure is the guest's error-code, none is ours
            if body is not None:
                body.abandon()
            future.resolve(Err(error_code(exc, before_response=True)))
            return
        sock = getattr(response.connection, "sock", None)
        if sock is not None:
            sock.settimeout(_seconds(options.between_bytes))
        pipe = InboundPipe(future.waker)
        fields = Fields.from_pairs([(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in response.headers.items()])
        future.resolve(IncomingResponse(response.status, fields, pipe, future.waker))
        self._pump(response, pipe)

    @staticmethod
    def _pump(response: Any, pipe: InboundPipe) -> None:
        try:
            while True:
                chunk = response.read1(READ_SIZE)
                if not chunk:
                    break
                if not pipe.put(chunk):  # the guest dropped the body
                    response.close()
                    return
        except Exception as exc:
            response.close()
            code = error_code(exc, before_response=False)
            pipe.finish(IoError(f"reading the upstream response failed: {exc}", code))
            return
        response.release_conn()
        pipe.finish()

    def close(self) -> None:
        self.pool.clear()


def _chunks(body: OutboundPipe) -> Iterator[bytes]:
    while True:
        chunk = body.take()
        if chunk is None:
            if body.aborted:
                raise BodyAborted("the guest dropped the request body without finishing it")
            return
        yield chunk


def error_code(exc: BaseException, before_response: bool) -> Any:
    """The wasi:http error-code for a client failure."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, (NameResolutionError, socket.gaierror)):
        return DNS_ERROR
    if isinstance(exc, NewConnectionError):  # (a subclass of ConnectTimeoutError)
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, socket.gaierror):
            return DNS_ERROR
        return "connection-refused"
    if isinstance(exc, ConnectTimeoutError):
        return "connection-timeout"
    if isinstance(exc, (ReadTimeoutError, TimeoutError)):
        return "connection-read-timeout"
    if isinstance(exc, (SSLError, ssl.SSLError)):
        return "TLS-protocol-error"  # wasmtime reports certificate failures this way too
    if isinstance(exc, BodyAborted):
        return ("internal-error", str(exc))
    if isinstance(exc, ProtocolError):
        return "connection-terminated" if before_response else "HTTP-response-incomplete"
    return ("internal-error", str(exc) or type(exc).__name__)
