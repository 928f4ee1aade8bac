"""GET /?scheme=S&authority=A&path=P sends a GET with exactly those strings (percent-decoded,
no other processing) and answers which step refused it, or what upstream answered:

    200 "upstream STATUS\\n" + body      the request went out
    400 "set-authority refused\\n"       (likewise set-path-with-query, set-scheme)
    502 "outbound error: CODE\\n"        outgoing-handler.handle or the response failed
"""

import re
from urllib.parse import unquote

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import outgoing_handler
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme_Http, Scheme_Https, Scheme_Other,
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
        stream.blocking_write_and_flush(body_bytes)
    OutgoingBody.finish(body, None)


def params(path_with_query: str) -> dict:
    """The query's parameters, percent-decoded only (a + stays a +)."""
    query = path_with_query.partition("?")[2]
    pairs = (item.partition("=") for item in query.split("&") if item)
    return {unquote(name): unquote(value) for name, _, value in pairs}


def scheme(name: str):
    return {"http": Scheme_Http(), "https": Scheme_Https()}.get(name) or Scheme_Other(name)


def send(request) -> tuple:
    future = outgoing_handler.handle(request, None)
    with future.subscribe() as ready:
        ready.block()
    result = future.get().value
    if isinstance(result, Err):
        raise result
    response = result.value
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
    IncomingBody.finish(body)
    return response.status(), b"".join(chunks)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        given = params(request.path_with_query() or "/")
        outgoing = OutgoingRequest(Fields())
        for step, setter, value in (
                ("set-scheme", outgoing.set_scheme, scheme(given.get("scheme", "http"))),
                ("set-authority", outgoing.set_authority, given.get("authority")),
                ("set-path-with-query", outgoing.set_path_with_query, given.get("path"))):
            try:
                setter(value)
            except Err:
                answer(response_out, 400, f"{step} refused\n".encode())
                return
        try:
            status, body = send(outgoing)
        except Err as err:
            answer(response_out, 502, f"outbound error: {error_name(err.value)}\n".encode())
            return
        answer(response_out, 200, f"upstream {status}\n".encode() + body)
