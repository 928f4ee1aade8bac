"""GET /?url=URL fetches URL with an outbound request and answers with its status, body and
trailers (a line ``trailer NAME: VALUE`` each), or a 502 naming the error-code."""

import re
from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import outgoing_handler
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, OutgoingBody, OutgoingRequest, OutgoingResponse, RequestOptions,
    ResponseOutparam, Scheme_Http, Scheme_Https,
)


def error_name(code) -> str:
    name = type(code).__name__.removeprefix("ErrorCode_")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def answer(response_out, status: int, body_bytes: bytes) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        for start in range(0, len(body_bytes), 4096):
            stream.blocking_write_and_flush(body_bytes[start:start + 4096])
    OutgoingBody.finish(body, None)


def settled(future):
    """What a future resolves to, once it has; raises Err(error-code) if that is a failure."""
    with future.subscribe() as ready:
        ready.block()
    outcome = future.get().value
    if isinstance(outcome, Err):
        raise outcome
    return outcome.value


def fetch(url: str):
    """(status, body and trailer lines) of a GET, or raise Err(error-code)."""
    target = urlsplit(url)
    request = OutgoingRequest(Fields())
    request.set_scheme(Scheme_Https() if target.scheme == "https" else Scheme_Http())
    request.set_authority(target.netloc)
    request.set_path_with_query((target.path or "/") + (f"?{target.query}" if target.query else ""))
    options = RequestOptions()
    options.set_connect_timeout(2_000_000_000)
    options.set_first_byte_timeout(5_000_000_000)
    response = settled(outgoing_handler.handle(request, options))
    body = response.consume()
    chunks = []
    with body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(65536))
            except Err as err:
                if isinstance(err.value, StreamError_Closed):
                    break
                raise
    trailers = settled(IncomingBody.finish(body))
    if trailers is not None:
        chunks += [b"\ntrailer %s: %s" % (name.encode(), value)
                   for name, value in trailers.entries()]
    return response.status(), b"".join(chunks)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        query = parse_qs(urlsplit(request.path_with_query() or "/").query)
        if "url" not in query:
            answer(response_out, 400, b"usage: /?url=http://host:port/path\n")
            return
        try:
            status, body = fetch(query["url"][0])
        except Err as err:
            answer(response_out, 502, f"outbound error: {error_name(err.value)}\n".encode())
            return
        answer(response_out, 200, f"upstream {status}\n".encode() + body)
