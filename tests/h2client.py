"""A real HTTP/2 client on a real socket (h2's state machine, client side), for the tests that
need frames and timings curl and grpcio do not give: several streams at once, resets, trailers,
small windows, and the raw frames of attacks."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Optional

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class Reply:
    """What came back on one stream."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Optional[list[tuple[str, str]]] = None
    ended: bool = False
    reset: Optional[int] = None  # the error code of a RST_STREAM from the server

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One HTTP/2 connection to 127.0.0.1:``port`` (TLS with ALPN h2 if ``context`` is given)."""

    def __init__(self, port: int, context: Optional[ssl.SSLContext] = None,
                 window: Optional[int] = None, read_data: bool = True) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if context is not None:
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.read_data = read_data  # acknowledge DATA (open the window again) as it comes
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        if window is not None:
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.goaway: Optional[h2.events.ConnectionTerminated] = None
        self.closed = False
        self.send()

    def send(self, raw: bytes = b"") -> None:
        self.sock.sendall(self.h2.data_to_send() + raw)

    def request(self, method: str, path: str, headers: Optional[list[tuple[str, str]]] = None,
                body: bytes = b"", end: bool = True, authority: str = "localhost") -> int:
        """Open a stream; its body is sent whole (use ``data`` for more) and ended if ``end``."""
        stream_id = self.h2.get_next_available_stream_id()
        self.replies[stream_id] = Reply()
        fields = [(":method", method), (":path", path), (":scheme", "http"),
                  (":authority", authority), *(headers or [])]
        self.h2.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.data(stream_id, body, end)
        self.send()
        return stream_id

    def data(self, stream_id: int, body: bytes, end: bool = False) -> None:
        """Send body bytes as the server's windows allow (reading meanwhile)."""
        view = memoryview(body)
        while view:
            size = min(len(view), self.h2.local_flow_control_window(stream_id),
                       self.h2.max_outbound_frame_size)
            if size <= 0:  # (negative when the server's settings shrank the window)
                assert not self.closed, f"the server closed the connection ({self.goaway})"
                self.pump()
                continue
            self.h2.send_data(stream_id, bytes(view[:size]))
            view = view[size:]
            self.send()
        if end:
            self.h2.end_stream(stream_id)
            self.send()

    def trailers(self, stream_id: int, fields: list[tuple[str, str]]) -> None:
        self.h2.send_headers(stream_id, fields, end_stream=True)
        self.send()

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id)
        self.send()

    def pump(self, timeout: float = 10) -> None:
        """Read once (up to ``timeout``) and take in what came."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, ssl.SSLError, ConnectionResetError):
            data = b""
        if not data:
            self.closed = True
            return
        for event in self.h2.receive_data(data):
            self._take(event)
        self.send()

    def _take(self, event: object) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            reply = self.replies[event.stream_id]
            reply.headers = list(event.headers)
            reply.status = int(dict(reply.headers)[":status"])
        elif isinstance(event, h2.events.InformationalResponseReceived):
            self.replies[event.stream_id].headers.extend(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.replies[event.stream_id].body += event.data
            if self.read_data:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.replies[event.stream_id].trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.replies[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.replies[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def wait(self, condition, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"HTTP/2: condition not met (closed={self.closed}, "
                                     f"goaway={self.goaway})")
            self.pump(left)

    def response(self, stream_id: int, timeout: float = 20) -> Reply:
        reply = self.replies[stream_id]
        self.wait(lambda: reply.done, timeout)
        return reply

    def get(self, path: str, **kwargs) -> Reply:
        return self.response(self.request("GET", path, **kwargs))

    def until_closed(self, timeout: float = 20) -> None:
        """Read until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError("the server did not close the connection")
            self.pump(deadline - time.monotonic())

    def close(self) -> None:
        self.sock.close()
