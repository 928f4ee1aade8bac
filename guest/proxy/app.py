"""The reference guest: a reverse proxy for the wasi:http/proxy world.

``/healthz`` answers ``200 ok``; every other request goes to ``$UPSTREAM`` (e.g.
``http://127.0.0.1:9000``) with its method, path, query, headers (minus Host and hop-by-hop
ones) and body, and the upstream's answer comes back with ``x-wasisup-proxy: 1``. Bodies are
moved with ``splice``, so they stream through the host without being copied into the guest.
An answer that has no body by definition (to HEAD; 204, 304) is passed on as a head alone: its
content-length describes a body that is not sent. When the upstream cannot be reached or
fails, the answer is a 502 naming the error-code. A client whose request body breaks off gets
its upstream request abandoned at once. (The host hands over an upstream's response without a
Content-Length its chunked coding overrides, so forwarding its fields never mis-frames a body.)
"""

import os
import re
from urllib.parse import urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import outgoing_handler
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, Method_Head, OutgoingBody, OutgoingRequest, OutgoingResponse,
    RequestOptions, ResponseOutparam, Scheme_Http, Scheme_Https,
)

MARKER = ("x-wasisup-proxy", b"1")
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
    "trailer", "host", "http2-settings", "proxy-authenticate", "proxy-authorization",
})
SECOND = 1_000_000_000
CONNECT_TIMEOUT, FIRST_BYTE_TIMEOUT, BETWEEN_BYTES_TIMEOUT = 2 * SECOND, 10 * SECOND, 10 * SECOND
SPLICE = 1 << 20
NO_BODY_STATUSES = frozenset({204, 304})


def error_name(code) -> str:
    """``ErrorCode_ConnectionRefused()`` -> ``connection-refused``."""
    name = type(code).__name__.removeprefix("ErrorCode_")
    detail = getattr(code, "value", None)
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()
    return f"{words} ({detail})" if isinstance(detail, str) and detail else words


def respond(response_out, status: int, text: str, headers=()) -> None:
    body_bytes = text.encode()
    fields = Fields.from_list([("content-type", b"text/plain; charset=utf-8"),
                               ("content-length", str(len(body_bytes)).encode()), *headers])
    response = OutgoingResponse(fields)
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        for start in range(0, len(body_bytes), 4096):
            stream.blocking_write_and_flush(body_bytes[start:start + 4096])
    OutgoingBody.finish(body, None)


def pump(source, sink) -> None:
    """Move everything from an input stream to an output stream, inside the host."""
    while True:
        try:
            sink.blocking_splice(source, SPLICE)
        except Err as err:
            if isinstance(err.value, StreamError_Closed):
                return
            raise


def broken(stream) -> bool:
    """Has this input stream failed (not merely ended)?"""
    try:
        stream.read(0)
    except Err as err:
        return not isinstance(err.value, StreamError_Closed)
    return False


def forwarded_headers(fields) -> list:
    return [(name, value) for name, value in fields.entries() if name not in HOP_BY_HOP]


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        path = request.path_with_query() or "/"
        if path == "/healthz" or path.startswith("/healthz?"):
            respond(response_out, 200, "ok\n")
            return
        upstream = os.environ.get("UPSTREAM")
        if not upstream:
            respond(response_out, 502, "upstream error: UPSTREAM is not set\n", [MARKER])
            return
        target = urlsplit(upstream)

        with request.headers() as incoming_headers:
            outgoing = OutgoingRequest(Fields.from_list(forwarded_headers(incoming_headers)))
        method = request.method()
        outgoing.set_method(method)
        outgoing.set_scheme(Scheme_Https() if target.scheme == "https" else Scheme_Http())
        outgoing.set_authority(target.netloc)
        outgoing.set_path_with_query(target.path.rstrip("/") + path)
        options = RequestOptions()
        options.set_connect_timeout(CONNECT_TIMEOUT)
        options.set_first_byte_timeout(FIRST_BYTE_TIMEOUT)
        options.set_between_bytes_timeout(BETWEEN_BYTES_TIMEOUT)
        outgoing_body = outgoing.body()
        try:
            future = outgoing_handler.handle(outgoing, options)
        except Err as err:
            respond(response_out, 502, f"upstream error: {error_name(err.value)}\n", [MARKER])
            return

        incoming_body = request.consume()
        failed = None
        with incoming_body.stream() as source, outgoing_body.write() as sink:
            try:
                pump(source, sink)
            except Err:  # the upstream went away mid-body (its answer or error says why), or
                failed = "client" if broken(source) else "upstream"  # the client's body broke off
        if failed == "client":  # the request body dropped unfinished: the upstream's request
            outgoing_body.__exit__(None, None, None)  # fails now (not after its timeout)
            return
        if failed is None:
            OutgoingBody.finish(outgoing_body, None)
        IncomingBody.finish(incoming_body)

        with future, future.subscribe() as ready:
            ready.block()
            outcome = future.get()
        result = outcome.value if isinstance(outcome, Ok) else None
        if not isinstance(result, Ok):
            reason = error_name(result.value) if isinstance(result, Err) else "no response"
            respond(response_out, 502, f"upstream error: {reason}\n", [MARKER])
            return

        upstream_response = result.value
        with upstream_response.headers() as upstream_headers:
            fields = Fields.from_list(forwarded_headers(upstream_headers) + [MARKER])
        response = OutgoingResponse(fields)
        response.set_status_code(upstream_response.status())
        if isinstance(method, Method_Head) or upstream_response.status() in NO_BODY_STATUSES:
            ResponseOutparam.set(response_out, Ok(response))  # a head without a body
            return
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        upstream_body = upstream_response.consume()
        try:
            with upstream_body.stream() as source, body.write() as sink:
                pump(source, sink)
        except Err:
            return  # the upstream broke off: dropping the body unfinished cuts the response
        IncomingBody.finish(upstream_body)
        OutgoingBody.finish(body, None)
