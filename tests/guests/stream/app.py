"""Large bodies both ways: GET /download?size=N streams N bytes (no content-length, so the
host must chunk); POST /upload reads the body as it arrives and answers `LENGTH SHA256`."""

import hashlib
from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, OutgoingBody, OutgoingResponse, ResponseOutparam,
)

PATTERN = bytes(range(256)) * 256  # 64 KiB


def send(response_out, status: int, chunks) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/octet-stream")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                allowed = stream.check_write()
                if allowed == 0:
                    with stream.subscribe() as ready:
                        ready.block()
                    continue
                stream.write(bytes(view[:allowed]))
                view = view[allowed:]
        stream.blocking_flush()
    OutgoingBody.finish(body, None)


def download(size: int):
    while size > 0:
        chunk = PATTERN[:min(size, len(PATTERN))]
        size -= len(chunk)
        yield chunk


def upload_digest(request) -> bytes:
    digest, length = hashlib.sha256(), 0
    body = request.consume()
    with body.stream() as stream:
        while True:
            try:
                chunk = stream.blocking_read(65536)
            except Err as err:
                if isinstance(err.value, StreamError_Closed):
                    break
                raise
            digest.update(chunk)
            length += len(chunk)
    IncomingBody.finish(body)
    return f"{length} {digest.hexdigest()}\n".encode()


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        url = urlsplit(request.path_with_query() or "/")
        if url.path == "/download":
            size = int(parse_qs(url.query).get("size", ["0"])[0])
            send(response_out, 200, download(size))
        elif url.path == "/upload":
            send(response_out, 200, [upload_digest(request)])
        else:
            send(response_out, 404, [b"try /download?size=N or POST /upload\n"])
