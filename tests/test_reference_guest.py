"""The reference guest (guest/proxy) in front of a real local upstream."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Server, closed_port, free_port, guest, wasisup_argv


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    port = free_port()
    server = Server(wasisup_argv(guest("proxy"), "--env", f"UPSTREAM={upstream}", port=port),
                    port, tmp_path_factory.mktemp("proxy")).wait_ready()
    yield server
    server.stop()


def test_healthz(proxy):
    status, headers, body = proxy.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")


def test_the_quick_start_checks_pass_against_the_shipped_upstream(proxy):
    # (the tests' upstream is guest/echo_upstream.py, with test-only paths beside)
    status, headers, body = proxy.request("GET", "/get?source=readme")
    assert status == 200 and headers["x-wasisup-proxy"] == "1"
    assert json.loads(body)["path"] == "/get?source=readme"
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: proxy.request("GET", f"/get?n={i}")[0], range(8)))
    assert statuses == [200] * 8
    status, _, body = proxy.request("POST", "/post", body=b"hello")
    assert status == 200 and json.loads(body)["body"] == "hello"
    status, headers, body = proxy.request("HEAD", "/get")
    assert (status, body) == (200, b"") and headers["x-wasisup-proxy"] == "1"


def test_forwards_method_path_query_headers_and_body(proxy):
    status, headers, body = proxy.request("POST", "/api/items?limit=5&sort=asc", body=b'{"a": 1}',
                                          headers={"X-Request-Id": "abc", "Content-Type": "application/json"})
    assert status == 200
    assert headers["x-wasisup-proxy"] == "1" and headers["x-upstream"] == "yes"
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["path"] == "/api/items?limit=5&sort=asc"
    assert seen["body"] == '{"a": 1}'
    received = dict(seen["headers"])
    assert received["x-request-id"] == "abc" and received["content-type"] == "application/json"
    assert received["host"] != f"127.0.0.1:{proxy.port}", "the client's Host is not forwarded"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_methods_are_forwarded(proxy, method):
    status, headers, body = proxy.request(method, "/m", body=b"x" if method in ("PUT", "PATCH") else None)
    assert status == 200 and json.loads(body)["method"] == method


def test_head_gets_the_upstream_head_without_a_trap(proxy):
    # The upstream's content-length describes the body a GET would get; none is sent.
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("HEAD", "/head?x=1")
        head = conn.getresponse()
        body = head.read()
        conn.request("GET", "/healthz")  # same connection: the HEAD's handler is done by now
        after = conn.getresponse().read()
    finally:
        conn.close()
    assert (head.status, body, after) == (200, b"", b"ok\n")
    assert head.getheader("x-upstream") == "yes" and head.getheader("x-wasisup-proxy") == "1"
    assert int(head.getheader("content-length")) > 0
    assert "trap" not in proxy.log() and "Traceback" not in proxy.log()


def test_upstream_status_is_passed_through(proxy):
    assert proxy.request("GET", "/anything?status=404")[0] == 404


def test_large_bodies_stream_through(proxy):
    size = 3 * 1024 * 1024 + 7
    status, _, body = proxy.request("GET", f"/bytes?size={size}")
    expected = (bytes(range(256)) * (size // 256 + 1))[:size]
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    payload = bytes(range(256)) * 8192  # 2 MiB up
    status, _, body = proxy.request("POST", "/up", body=payload)
    assert status == 200 and len(json.loads(body)["body"]) == len(payload)


def _bytes(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def test_spliced_bodies_reach_slow_and_vanishing_clients_intact(serve, upstream):
    """A body the upstream sends with a content-length moves socket -> pipe -> socket in the
    kernel: a slow reader still gets every byte in order, and a client that leaves mid-body
    leaves nothing behind for the next response on the same thread."""
    server = serve("proxy", "-w", "1", "--threads", "1", "--env", f"UPSTREAM={upstream}")
    size = 8 * 1024 * 1024 + 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /bytes?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = bytearray()
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < size:
            time.sleep(0.002)  # ~8 MiB in a few seconds: the server waits on us, often
            chunk = sock.recv(64 * 1024)
            assert chunk, "the connection closed early"
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == _bytes(size)

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /bytes?size=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(100_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        status, _, body = server.request("GET", "/bytes?size=70000")
        assert status == 200 and body == _bytes(70000)


def test_unreachable_upstream_gives_502_naming_the_failure(serve):
    server = serve("proxy", "--env", f"UPSTREAM=http://127.0.0.1:{closed_port()}")
    status, headers, body = server.request("GET", "/anything")
    assert status == 502 and headers["x-wasisup-proxy"] == "1"
    assert body == b"upstream error: connection-refused\n"
    assert server.request("GET", "/healthz")[0] == 200


def test_missing_upstream_setting_gives_502(serve):
    status, _, body = serve("proxy").request("GET", "/x")
    assert status == 502 and b"UPSTREAM is not set" in body
