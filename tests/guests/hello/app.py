"""The smallest useful guest: 200, text/plain, `hello from wasm` (`/nobody`: no body at all)."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        if request.path_with_query() == "/nobody":
            ResponseOutparam.set(response_out, Ok(response))
            return
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(b"hello from wasm\n")
        OutgoingBody.finish(body, None)
