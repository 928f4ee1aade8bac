"""Writes to stdout and stderr, then answers 200."""

import sys

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        print(f"stdout line for {request.path_with_query()}", flush=True)
        print("stderr line", file=sys.stderr, flush=True)
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(b"printed\n")
        OutgoingBody.finish(body, None)
