"""Differential test: every test guest, served by wasisup and by `wasmtime serve` (the oracle),
gives the same status, headers and body for the same requests: wasisup over HTTP/1.1, and
over HTTP/2, against `wasmtime serve` over HTTP/1.1.

Compared: the status; every header (names case-insensitively) except `date` and `connection`;
the body bytes.
Framing headers (`content-length`, `transfer-encoding`) are compared too: a host must frame a
response the same way — length when the guest declares one, chunked when it does not.
"""

from __future__ import annotations

import http.client
import re

import pytest

from conftest import closed_port, guest, running, wasisup_argv, wasmtime_serve_argv
from h2client import H2Client

# hyper adds `connection: close` when a guest left the request body unread, or not, depending on
# whether the body had arrived when the response went out: the oracle is not deterministic there.
IGNORED = {"date", "connection"}

CASES = {
    "hello": [("GET", "/", None, {}), ("HEAD", "/", None, {}), ("POST", "/x?y=1", b"body", {}),
              ("GET", "/nobody", None, {})],
    "echo": [("GET", "/a/b?c=d&e", None, {"X-One": "1", "Accept": "*/*"}),
             ("POST", "/post", b"some body \x00\x01", {"Content-Type": "application/x-test"}),
             ("DELETE", "/thing/7", None, {}),
             ("PURGE", "/cache", None, {})],
    "stream": [("GET", "/download?size=100000", None, {}),
               ("POST", "/upload", bytes(range(256)) * 300, {}),
               ("GET", "/missing", None, {})],
    "trap": [("GET", "/", None, {})],
    "noresponse": [("GET", "/", None, {})],
    "stdio": [("GET", "/printing", None, {})],
    "hello-js": [("GET", "/js?q=1", None, {"x-test": "abc"}), ("POST", "/post", b"12345", {}),
                 ("GET", "/teapot", None, {})],
}


def exchange(port: int, method: str, path: str, body, headers) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": "example.test", **headers})
        response = conn.getresponse()
        data = response.read()
        kept = sorted((k.lower(), v) for k, v in response.getheaders() if k.lower() not in IGNORED)
        return response.status, kept, data
    finally:
        conn.close()


def exchange_http2(client: H2Client, method: str, path: str, body, headers) -> tuple:
    """The same request over HTTP/2 (with the fields http.client adds); what HTTP/1.1 frames
    with transfer-encoding, HTTP/2 frames itself, so that field is left out of the oracle's
    answer when comparing."""
    fields = [("accept-encoding", "identity")] + [(k.lower(), v) for k, v in headers.items()]
    if body is not None:
        fields.append(("content-length", str(len(body))))
    stream = client.request(method, path, fields, body or b"", authority="example.test")
    reply = client.response(stream, timeout=30)
    kept = sorted((k, v) for k, v in reply.headers if k not in IGNORED and k != ":status")
    return reply.status, kept, bytes(reply.body)


def replies(argv_for_port, requests, tmp, http2: bool = False) -> list[tuple]:
    """Each request's answer over HTTP/1.1, then (``http2``) over HTTP/2 on one connection."""
    with running(argv_for_port, tmp) as server:
        answers = [exchange(server.port, *request) for request in requests]
        if http2:
            client = H2Client(server.port)
            answers += [exchange_http2(client, *request) for request in requests]
            client.close()
        return answers


def outbound_requests(upstream: str, closed: str) -> list[tuple]:
    """Through the outbound guest: answers, a refused connection, and a TLS handshake with a
    server that speaks plain HTTP (the error-code each host reports must be the same)."""
    plain_as_tls = upstream.replace("http://", "https://", 1)
    return [("GET", f"/?url={upstream}/path%3Fq%3D1", None, {}),
            ("GET", f"/?url={upstream}/bytes%3Fsize%3D70000", None, {}),
            ("GET", f"/?url={closed}/nothing-here", None, {}),
            ("GET", f"/?url={plain_as_tls}/tls", None, {})]


@pytest.mark.parametrize("name", [*CASES, "outbound"])
def test_same_answers_as_wasmtime_serve(name, tmp_path, upstream):
    requests = CASES.get(name) or outbound_requests(upstream, f"http://127.0.0.1:{closed_port()}")
    component = guest(name)
    ours = replies(lambda port: wasisup_argv(component, "--http2-cleartext", "prior-knowledge",
                                             port=port), requests, tmp_path, http2=True)
    theirs = replies(wasmtime_serve_argv(component), requests, tmp_path)
    over_http2 = [(status, [field for field in fields if field[0] != "transfer-encoding"], body)
                  for status, fields, body in theirs]
    for request, mine, reference in zip(requests * 2, ours, theirs + over_http2, strict=True):
        if name == "outbound":  # the upstream's own Date header differs between the runs
            mine, reference = _without_upstream_date(mine), _without_upstream_date(reference)
            mine = _without_our_traceparent(mine)
        assert mine == reference, f"{request[0]} {request[1]}:\n  wasisup:         {mine!r:.600}\n  wasmtime serve:  {reference!r:.600}"


def _without_upstream_date(reply: tuple) -> tuple:
    status, headers, body = reply
    lines = [line for line in body.split(b"\n") if not line.lower().startswith(b"date:")]
    return status, headers, b"\n".join(lines)


def _without_our_traceparent(reply: tuple) -> tuple:
    """wasisup takes part in the trace (wasmtime serve does not): the upstream got a
    traceparent of wasisup's own, which goes before comparing."""
    status, headers, body = reply
    echoed = re.search(rb', \["traceparent", "00-[0-9a-f]{32}-[0-9a-f]{16}-01"\]', body)
    assert echoed or b'"headers"' not in body, body
    return status, headers, body.replace(echoed[0], b"") if echoed else body
