"""Strict HTTP/1.1 parsing (RFC 9110/9112) on raw sockets: bad framing gets 400 and a closed
connection — never a 500, never a hang."""

from __future__ import annotations

import json

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
    # RFC 9112 6.3: chunked must be the final coding, applied once; else the end is unknowable.
    "chunked twice": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
                      b"0\r\n\r\n"),
    "chunked on two lines": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "chunked not last": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                         b"0\r\n\r\n"),
    "Content-Length as a list": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000,1000\r\n\r\n"
                                 + b"a" * 1000),
    "Content-Length twice": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                             b"Content-Length: 3\r\n\r\nabc"),
    "Content-Length past 64 bits": (b"POST / HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 18446744073709551616\r\n\r\nabc"),
    "whitespace before the first field": b"GET / HTTP/1.1\r\n X-A: b\r\nHost: x\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "BEL in a field value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x07b\r\n\r\n",
    "DEL in a field value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    "asterisk-form for GET": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    "authority-form for GET": b"GET example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n",
    "relative target": b"GET foo/bar HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form with userinfo": b"GET http://u@example.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid Host": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_malformed_request_gets_400_and_close(echo, name):
    reply = raw_exchange(echo.port, BAD_REQUESTS[name])
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"connection: close" in reply.lower()


def test_unknown_transfer_coding_gets_501(echo):
    # RFC 9112 6.1: a transfer coding the server does not understand SHOULD get a 501 (when
    # chunked is last; without chunked last the framing is broken: 400, above).
    reply = raw_exchange(echo.port, b"POST / HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 501 ") and b"connection: close" in reply.lower()


def test_transfer_coding_without_chunked_gets_400(echo):
    reply = raw_exchange(echo.port,
                         b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"3.0"])
def test_other_major_versions_get_505(echo, version):
    reply = raw_exchange(echo.port, b"GET /foo HTTP/%s\r\nHost: x\r\n\r\n" % version)
    assert reply.startswith(b"HTTP/1.1 505 "), reply[:100]


def test_a_later_http1_minor_version_is_served_as_11(echo):
    reply = raw_exchange(echo.port, b"GET /foo HTTP/1.2\r\nHost: x\r\n" + CLOSE + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")


def echoed(reply: bytes) -> dict:
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


CLOSE = b"Connection: close\r\n"


def test_absolute_form_target_gives_its_path_and_authority(echo):
    # RFC 9112 3.2.2: the target's authority wins over Host.
    seen = echoed(raw_exchange(echo.port, b"GET http://example.com/foo?q=1 HTTP/1.1\r\n"
                                          b"Host: other.test\r\n" + CLOSE + b"\r\n"))
    assert (seen["path_with_query"], seen["authority"]) == ("/foo?q=1", "example.com")
    seen = echoed(raw_exchange(echo.port, b"GET http://example.com:8080?q HTTP/1.1\r\n"
                                          b"Host: example.com:8080\r\n" + CLOSE + b"\r\n"))
    assert (seen["path_with_query"], seen["authority"]) == ("/?q", "example.com:8080")


def test_options_asterisk_is_served(echo):
    seen = echoed(raw_exchange(echo.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n"))
    assert (seen["method"], seen["path_with_query"]) == ("OPTIONS", "*")


def test_empty_lines_before_the_request_line_are_ignored(echo):
    # RFC 9112 2.2: at least one empty line before a request line is ignored.
    seen = echoed(raw_exchange(echo.port,
                               b"\r\nGET /one HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n"))
    assert seen["path_with_query"] == "/one"
    # ... also after a body, in the same packet as the next request (an old client's CRLF).
    reply = raw_exchange(echo.port,
                         b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok\r\n"
                         b"\r\nGET /second HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n")
    assert reply.count(b"HTTP/1.1 200 ") == 2 and b'"/second"' in reply


def test_framing_and_routing_fields_in_trailers_are_dropped(echo):
    seen = echoed(raw_exchange(echo.port, b"POST / HTTP/1.1\r\nHost: x\r\n" + CLOSE
                               + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
                                 b"Content-Length: 5\r\nHost: evil.test\r\n"
                                 b"Transfer-Encoding: chunked\r\nX-Checksum: 1\r\n\r\n"))
    assert seen["body"] == "a" and seen["trailers"] == [["x-checksum", "1"]]


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
