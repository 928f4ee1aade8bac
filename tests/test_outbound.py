"""The guests' outbound HTTP: a keep-alive pool per worker, stale connections, upstreams that
break off, the guest's timeouts on a pooled connection, and every way an upstream may frame
(or garble) its response, read as `wasmtime serve` reads it — against real upstream sockets."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Callable, Iterator

import h11
import pytest

from conftest import guest, running, wait_until, wasisup_argv, wasmtime_serve_argv


class ScriptedUpstream:
    """An HTTP/1.1 server on loopback whose every connection runs ``script(index, requests)``:
    ``requests`` yields each request (method, target) as it arrives and ``script`` answers with
    ``answer``; returning closes the connection. It counts connections and requests."""

    def __init__(self, script: Callable[["Exchange"], None]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection index, target)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(Exchange(self, sock, self.connections),),
                             daemon=True).start()

    def _serve(self, exchange: "Exchange") -> None:
        try:
            self.script(exchange)
        except OSError:
            pass
        finally:
            exchange.sock.close()

    def close(self) -> None:
        self._listener.close()


class Exchange:
    """One upstream connection, as a script sees it."""

    def __init__(self, upstream: ScriptedUpstream, sock: socket.socket, index: int) -> None:
        self.upstream, self.sock, self.index = upstream, sock, index
        self.h11 = h11.Connection(h11.SERVER)

    def _event(self) -> object:
        """h11's next event, reading the socket as it needs (None once the client closed)."""
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.h11.receive_data(data)
        return event

    def requests(self) -> Iterator[str]:
        """Each request's target, once its body has arrived; ends when the client closes."""
        while True:
            if self.h11.our_state is h11.DONE:
                self.h11.start_next_cycle()
            target = None
            while not isinstance(event := self._event(), h11.EndOfMessage):
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    target = event.target.decode()
            self.upstream.requests.append((self.index, target))
            yield target

    def request_head(self) -> str | None:
        """The next request's target, as soon as its head has arrived (None: the client
        closed); for scripts that answer with raw bytes and then close."""
        event = self._event()
        if not isinstance(event, h11.Request):
            return None
        target = event.target.decode()
        self.upstream.requests.append((self.index, target))
        return target

    def answer(self, body: bytes = b"ok", declared: int | None = None) -> None:
        """A 200 with ``body``; ``declared`` announces another content-length (a short body)."""
        head = self.h11.send(h11.Response(status_code=200, headers=[
            ("content-length", str(len(body) if declared is None else declared))]))
        self.sock.sendall(head + body)
        if declared is None:
            self.h11.send(h11.Data(data=body))
            self.h11.send(h11.EndOfMessage())


def answer_all(exchange: Exchange) -> None:
    for target in exchange.requests():
        if target.startswith("/slow"):
            time.sleep(7)
        exchange.answer(b"ok " + target.encode())


@pytest.fixture
def upstreams() -> Iterator[Callable[[Callable[[Exchange], None]], ScriptedUpstream]]:
    made: list[ScriptedUpstream] = []

    def make(script: Callable[[Exchange], None]) -> ScriptedUpstream:
        made.append(ScriptedUpstream(script))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def test_sequential_requests_share_one_upstream_connection(serve, upstreams):
    upstream = upstreams(answer_all)
    server = serve("proxy", "--threads", "1", "--max-instance-reuse", "100",
                   "--env", f"UPSTREAM={upstream.url}")
    for i in range(20):
        status, headers, body = server.request("GET", f"/item/{i}")
        assert (status, body) == (200, f"ok /item/{i}".encode())
    assert upstream.connections == 1


def test_a_connection_the_upstream_closed_while_idle_is_not_used(serve, upstreams):
    def close_when_idle(exchange: Exchange) -> None:
        for target in exchange.requests():
            exchange.answer(b"ok " + target.encode())
            exchange.sock.settimeout(0.3)  # then close the idle connection, like a keep-alive timeout
    upstream = upstreams(close_when_idle)
    server = serve("proxy", "--threads", "1", "--env", f"UPSTREAM={upstream.url}")
    assert server.request("GET", "/one")[2] == b"ok /one"
    time.sleep(0.8)
    assert server.request("GET", "/two")[2] == b"ok /two"
    assert upstream.connections == 2


def test_a_request_on_a_connection_closed_under_it_is_sent_again(serve, upstreams):
    def answer_one_then_drop(exchange: Exchange) -> None:
        for count, target in enumerate(exchange.requests()):
            if count == 1:
                return  # the second request gets no answer: the connection just closes
            exchange.answer(b"ok " + target.encode())
    upstream = upstreams(answer_one_then_drop)
    server = serve("proxy", "--threads", "1", "--env", f"UPSTREAM={upstream.url}")
    assert server.request("GET", "/one")[2] == b"ok /one"
    assert server.request("GET", "/two")[2] == b"ok /two"
    assert [target for _, target in upstream.requests] == ["/one", "/two", "/two"]
    assert upstream.connections == 2


def test_an_upstream_that_closes_mid_body_cuts_the_response(serve, upstreams):
    def short_body(exchange: Exchange) -> None:
        for target in exchange.requests():
            if target == "/short":
                exchange.answer(b"x" * 500, declared=1000)
                return
            exchange.answer(b"fine")
    upstream = upstreams(short_body)
    server = serve("proxy", "--threads", "1", "--env", f"UPSTREAM={upstream.url}")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/short")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    assert server.request("GET", "/after")[2] == b"fine"


def test_first_byte_timeout_on_a_pooled_connection(serve, upstreams):
    upstream = upstreams(answer_all)
    server = serve("outbound", "--threads", "1")
    assert server.request("GET", f"/?url={upstream.url}/fast")[2] == b"upstream 200\nok /fast"
    started = time.monotonic()
    status, _, body = server.request("GET", f"/?url={upstream.url}/slow")
    assert (status, body) == (502, b"outbound error: connection-read-timeout\n")
    assert time.monotonic() - started > 4.5  # (it waited for the timeout, not less)
    assert server.request("GET", f"/?url={upstream.url}/again")[2] == b"upstream 200\nok /again"
    # the timed-out connection was dropped, the first one reused
    assert upstream.connections == 2


def test_a_connection_the_upstream_said_it_closes_is_not_reused(serve, upstreams):
    def answer_then_linger(exchange: Exchange) -> None:
        if exchange.request_head() is not None:
            exchange.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                  b"Content-Length: 2\r\n\r\nok")
            time.sleep(15)  # the socket stays open: only the header says the connection is done
    upstream = upstreams(answer_then_linger)
    server = serve("proxy", "--threads", "1", "--env", f"UPSTREAM={upstream.url}")
    assert server.request("GET", "/one")[::2] == (200, b"ok")
    started = time.monotonic()
    assert server.request("GET", "/two")[::2] == (200, b"ok")
    assert time.monotonic() - started < 5
    assert upstream.connections == 2

# Responses an upstream may send, byte for byte: each is sent on a connection of its own, which
# the upstream then closes.
RAW_RESPONSES = {
    "/chunked-with-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                              b"Trailer: x-checksum\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n"
                              b"0\r\nx-checksum: abc\r\n\r\n",
    "/chunked-large": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                      + b"".join(b"%x\r\n%s\r\n" % (size, bytes([65 + i]) * size)
                                 for i, size in enumerate((70_000, 300_000, 1))) + b"0\r\n\r\n",
    "/until-close": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"
                    b"a body that ends when the connection does",
    "/until-close-large": b"HTTP/1.0 200 OK\r\n\r\n" + bytes(range(256)) * 2000,
    "/http-1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/informational-first": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                            b"Link: </style.css>\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                            b"Connection: upgrade\r\n\r\n",
    "/bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "/obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "/odd-status": b"HTTP/1.1 599\r\nContent-Length: 2\r\n\r\nok",
    "/many-headers": b"HTTP/1.1 200 OK\r\n"
                     + b"".join(b"x-%d: %d\r\n" % (i, i) for i in range(150))
                     + b"Content-Length: 2\r\n\r\nok",
    "/long-header": b"HTTP/1.1 200 OK\r\nx-long: " + b"v" * 100_000
                    + b"\r\nContent-Length: 2\r\n\r\nok",
    "/not-http": b"HTCPCP/1.0 418 I'm a teapot\r\n\r\n",
    "/length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "/bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n",
    "/more-than-declared": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok and more",
    "/chunked-then-more": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"2\r\nok\r\n0\r\n\r\nmore",
    "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "/header-without-colon": b"HTTP/1.1 200 OK\r\nbroken header\r\nContent-Length: 2\r\n\r\nok",
    "/nothing": b"",
}


def answer_raw(exchange: Exchange) -> None:
    target = exchange.request_head()
    if target is not None:
        exchange.sock.sendall(RAW_RESPONSES[target])
        exchange.sock.shutdown(socket.SHUT_WR)


def test_response_framings_read_as_wasmtime_serve_reads_them(tmp_path, upstreams):
    upstream = upstreams(answer_raw)
    component = guest("outbound")

    def replies(argv_for_port) -> dict[str, tuple[int, bytes]]:
        with running(argv_for_port, tmp_path) as server:
            return {target: server.request("GET", f"/?url={upstream.url}{target}")[::2]
                    for target in RAW_RESPONSES}

    ours = replies(lambda port: wasisup_argv(component, "--threads", "1", port=port))
    theirs = replies(wasmtime_serve_argv(component))
    assert ours == theirs
    assert ours["/chunked-with-trailers"] == (200, b"upstream 200\nhello, world\n"
                                                    b"trailer x-checksum: abc")
    assert ours["/until-close"] == (200, b"upstream 200\na body that ends when the connection does")
    assert ours["/chunked-large"] == (200, b"upstream 200\n"
                                           + b"A" * 70_000 + b"B" * 300_000 + b"C")
    assert ours["/until-close-large"] == (200, b"upstream 200\n" + bytes(range(256)) * 2000)


def test_a_coding_beside_a_length_reaches_the_client_framed_by_the_coding(serve, upstreams):
    upstream = upstreams(answer_raw)
    server = serve("proxy", "--env", f"UPSTREAM={upstream.url}")
    status, headers, body = server.request("GET", "/length-and-chunked")
    assert (status, body) == (200, b"abc")
    assert "content-length" not in headers  # (the upstream's 3 described nothing)


def test_an_upload_the_client_abandons_abandons_the_upstream_request(serve, upstreams):
    ended: list[float] = []

    def read_until_closed(exchange: Exchange) -> None:
        if exchange.request_head() is not None:
            while exchange.sock.recv(65536):
                pass
            ended.append(time.monotonic())

    upstream = upstreams(read_until_closed)
    server = serve("proxy", "--env", f"UPSTREAM={upstream.url}")
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                       + b"x" * 1000)
        wait_until(lambda: upstream.requests, what="the request upstream")
    aborted = time.monotonic()
    wait_until(lambda: ended, timeout=8, what="the upstream request abandoned")
    assert ended[0] - aborted < 5  # not the 10 s the guest would wait for a first byte
