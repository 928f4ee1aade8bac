"""Traps: before answering, or (`/after-headers`) after sending headers and part of the body."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, OutgoingResponse, ResponseOutparam


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        if request.path_with_query() == "/after-headers":
            response = OutgoingResponse(Fields.from_list([("content-length", b"100")]))
            body = response.body()
            ResponseOutparam.set(response_out, Ok(response))
            with body.write() as stream:
                stream.blocking_write_and_flush(b"partial")
        raise RuntimeError("this guest traps on purpose")
