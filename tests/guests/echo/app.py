"""Echoes the request back as JSON: method, path-with-query, scheme, authority, headers, body,
trailers."""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, OutgoingBody, OutgoingResponse, ResponseOutparam,
)


def read_all(request) -> tuple:
    """(body, trailers as sorted [name, value] pairs or None)."""
    body = request.consume()
    chunks = []
    with body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(65536))
            except Err as err:
                if isinstance(err.value, StreamError_Closed):
                    break
                raise
    future = IncomingBody.finish(body)
    with future.subscribe() as ready:
        ready.block()
    outcome = future.get().value
    if isinstance(outcome, Err):
        raise outcome
    trailers = outcome.value
    if trailers is not None:
        trailers = sorted([name, value.decode("latin-1")] for name, value in trailers.entries())
    return b"".join(chunks), trailers


def method_name(method) -> str:
    name = type(method).__name__.removeprefix("Method_")
    return method.value if name == "Other" else name.upper()


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        scheme = request.scheme()
        with request.headers() as headers:
            entries = sorted((name, value.decode("latin-1")) for name, value in headers.entries())
        body, trailers = read_all(request)
        document = json.dumps({
            "method": method_name(request.method()),
            "path_with_query": request.path_with_query(),
            "scheme": None if scheme is None else type(scheme).__name__.removeprefix("Scheme_"),
            "authority": request.authority(),
            "headers": entries,
            "body": body.decode("latin-1"),
            "trailers": trailers,
        }, sort_keys=True).encode()
        response = OutgoingResponse(Fields.from_list([
            ("content-type", b"application/json"),
            ("content-length", str(len(document)).encode()),
            ("x-echo-method", method_name(request.method()).encode()),
        ]))
        out = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with out.write() as stream:
            for start in range(0, len(document), 4096):
                stream.blocking_write_and_flush(document[start:start + 4096])
        OutgoingBody.finish(out, None)
