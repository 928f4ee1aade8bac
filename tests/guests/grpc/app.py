"""A gRPC service (package wasisup.test, service Greeter), protobuf encoded by hand:
SayHello(HelloRequest{string name = 1}) -> HelloReply{string message = 1}, "hello, NAME"
(name "fail": INVALID_ARGUMENT); Count(CountRequest{int32 n = 1}) streams Number{int32 value = 1}
for 1..n. The status goes in the response's trailers (grpc-status, grpc-message)."""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields, IncomingBody, OutgoingBody, OutgoingResponse, ResponseOutparam,
)

SERVICE = "/wasisup.test.Greeter/"
OK, INVALID_ARGUMENT, UNIMPLEMENTED = 0, 3, 12


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fields(message: bytes) -> dict:
    """{field number: value} of a protobuf message (varints and length-delimited only)."""
    found, at = {}, 0
    while at < len(message):
        key, at = read_varint(message, at)
        if key & 7 == 0:
            found[key >> 3], at = read_varint(message, at)
        else:
            length, at = read_varint(message, at)
            found[key >> 3], at = message[at:at + length], at + length
    return found


def read_varint(data: bytes, at: int) -> tuple:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def frame(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def read_body(request) -> bytes:
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
    IncomingBody.finish(body)
    return b"".join(chunks)


def messages(body: bytes) -> list:
    found, at = [], 0
    while at + 5 <= len(body):
        length = int.from_bytes(body[at + 1:at + 5], "big")
        found.append(body[at + 5:at + 5 + length])
        at += 5 + length
    return found


def answer(response_out, replies: list, status: int, message: str = "") -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/grpc")]))
    response.set_status_code(200)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        for reply in replies:
            stream.blocking_write_and_flush(frame(reply))
    trailers = [("grpc-status", str(status).encode())]
    if message:
        trailers.append(("grpc-message", message.encode()))
    OutgoingBody.finish(body, Fields.from_list(trailers))


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        method = (request.path_with_query() or "").removeprefix(SERVICE)
        received = messages(read_body(request))
        request_fields = fields(received[0]) if received else {}
        if method == "SayHello":
            name = request_fields.get(1, b"").decode()
            if name == "fail":
                answer(response_out, [], INVALID_ARGUMENT, "no greeting for fail")
            else:
                answer(response_out, [b"\x0a" + varint(len(f"hello, {name}".encode()))
                                      + f"hello, {name}".encode()], OK)
        elif method == "Count":
            count = request_fields.get(1, 0)
            answer(response_out, [b"\x08" + varint(i) for i in range(1, count + 1)], OK)
        else:
            answer(response_out, [], UNIMPLEMENTED, f"no method {method}")
