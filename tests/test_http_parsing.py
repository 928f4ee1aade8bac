"""Strict HTTP/1.1 parsing (RFC 9110/9112) on raw sockets: bad framing gets 400 and a closed
connection — never a 500, never a hang."""

from __future__ import annotations

import pytest

from conftest import Server, free_port, guest, raw_exchange, wasisup_argv


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    port = free_port()
    server = Server(wasisup_argv(guest("echo"), port=port), port,
                    tmp_path_factory.mktemp("parsing")).wait_ready()
    yield server
    server.stop()


BAD_REQUESTS = {
    "garbage request line": b"HELLO\r\n\r\n",
    "bad HTTP version": b"GET / HTTP/9\r\nHost: x\r\n\r\n",
    "CL and TE together": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    "two different Content-Lengths": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                      b"Content-Length: 4\r\n\r\nabcd"),
    "non-numeric Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "bare LF line endings": b"GET / HTTP/1.1\nHost: x\n\n",
    "bare LF after a header": b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_malformed_request_gets_400_and_close(echo, name):
    reply = raw_exchange(echo.port, BAD_REQUESTS[name])
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"connection: close" in reply.lower()


def test_unknown_transfer_coding_gets_501(echo):
    # RFC 9112 6.1: a transfer coding the server does not understand SHOULD get a 501.
    reply = raw_exchange(echo.port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 501 ") and b"connection: close" in reply.lower()


def test_http10_without_host_is_served(echo):
    reply = raw_exchange(echo.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"path_with_query": "/old"' in reply and b'"authority": null' in reply


def test_pipelined_requests_are_answered_in_order(echo):
    reply = raw_exchange(echo.port, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 ") == 2
    assert reply.index(b"/first") < reply.index(b"/second")


def test_oversized_request_line_gets_414(echo):
    reply = raw_exchange(echo.port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 414 ")


def test_too_many_headers_get_431(echo):
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    reply = raw_exchange(echo.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_server_still_serves_after_bad_requests(echo):
    for raw in BAD_REQUESTS.values():
        raw_exchange(echo.port, raw)
    assert echo.request("GET", "/alive")[0] == 200


def test_bare_lf_in_a_pipelined_request_gets_400(echo):
    # The second request reaches the server in the same packet as the first: its head is
    # already buffered when it is parsed, and must be checked all the same.
    reply = raw_exchange(echo.port, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /second HTTP/1.1\nHost: x\n\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 200 ") == 1
    assert b"HTTP/1.1 400 " in reply and b"/second" not in reply
