"""Misbehaves on demand: /spin loops forever, /alloc?mb=N grows memory by N MiB, /work?n=N
computes for a while (N loop iterations of pure wasm, no host calls)."""

from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam

_kept = []


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        url = urlsplit(request.path_with_query() or "/")
        if url.path == "/spin":
            print("spinning", flush=True)  # (tests wait for this line in the log)
            while True:
                pass
        if url.path == "/work":
            print("working", flush=True)
            total = 0
            for i in range(int(parse_qs(url.query).get("n", ["1000000"])[0])):
                total += i * i % 7
        if url.path == "/alloc":
            megabytes = int(parse_qs(url.query).get("mb", ["1"])[0])
            _kept.append(bytearray(megabytes * 1024 * 1024))
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(b"done\n")
        OutgoingBody.finish(body, None)
