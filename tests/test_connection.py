"""One client connection in process (``wasisup.http.connection``), on a real loopback socket:
how response bytes reach the socket."""

from __future__ import annotations

import os
import socket
import time

from wasisup.http.connection import Connection
from wasisup.http.request_head import Limits


def test_a_spliced_body_follows_the_head_without_passing_through_the_output_buffer():
    """The head waits in the output when the body's first piece arrives in a pipe: it goes out
    first, so the piece moves pipe -> socket in the kernel instead of being read into the
    buffer behind it (which cost a 1 MiB response ~20% more CPU)."""
    body = bytes(range(256)) * 32  # 8 KiB: a new socket takes it at once
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_end, peer = listener.accept()
    pipe_out, pipe_in = os.pipe()
    conn = Connection(server_end, peer, Limits())
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.settimeout(5)
        deadline = time.monotonic() + 5
        while conn.read_head() is None:
            assert time.monotonic() < deadline, "the request head never arrived"
        conn.start_response(200, [("content-length", str(len(body)).encode())])
        os.write(pipe_in, body)
        conn.send_body_from_pipe(pipe_out, len(body))
        assert not conn.out, "the body went through the output buffer"
        assert conn.end_response() and conn.flush()

        received = b""
        while not received.endswith(body):
            chunk = client.recv(65536)
            assert chunk, "the connection closed early"
            received += chunk
        assert received == b"HTTP/1.1 200 OK\r\ncontent-length: 8192\r\n\r\n" + body
    finally:
        conn.close()
        client.close()
        os.close(pipe_out)
        os.close(pipe_in)
