"""The outbound allow-list holds: a guest that sends raw authority and path strings reaches only
the hosts --allow-outbound names, checked on the host and port the connection goes to."""

from __future__ import annotations

import socket
import threading
from urllib.parse import quote

import pytest

from conftest import closed_port, run_cli
from wasisup.http.outbound_policy import (
    HostPattern, OutboundPolicy, Refused, check_path_with_query, parse_authority, parse_target,
)


@pytest.mark.parametrize("authority, host, port", [
    ("example.com", "example.com", None),
    ("API.Example.COM.:8443", "api.example.com", 8443),
    ("127.0.0.1:80", "127.0.0.1", 80),
    ("127.1", "127.0.0.1", None),  # what the resolver makes of the short forms
    ("0x7f.0.0.1", "127.0.0.1", None),
    ("2130706433:9", "127.0.0.1", 9),
    ("[::1]:443", "::1", 443),
    ("[0:0::1]", "::1", None),
    ("[::ffff:127.0.0.1]", "127.0.0.1", None),  # IPv4-mapped IPv6 reaches IPv4
])
def test_authority_is_reduced_to_where_the_connection_goes(authority, host, port):
    assert parse_authority(authority) == (host, port)


@pytest.mark.parametrize("authority", [
    "", "user@example.com", "user:pw@example.com:80", "example.com:", "example.com:0",
    "example.com:65536", "example.com:+80", "example.com:8_0", "example.com:80:80",
    "127.0.0.1:80\\x.0.0.2", "a b.com", "a\tb.com", "exa\x00mple.com", "example.com/path",
    "example.com?q", "example.com#f", "ex%41mple.com", "a..b", ".", "1.2.3.4.5", "256.0.0.1",
    "[::1", "[::1]x", "[::1%25eth0]", "[not-v6]", "exämple.com", "\u212aelvin.com",
])
def test_malformed_authority_is_refused(authority):
    with pytest.raises(Refused) as refused:
        parse_authority(authority)
    assert refused.value.error_code == "HTTP-request-URI-invalid"


@pytest.mark.parametrize("path, ok", [
    ("/", True), ("/a/b?c=d&e=%20f", True), ("/{\"json\":1}|^", True), ("*", True),
    ("", False), ("**", False), ("*/x", False), ("?q", False), ("a/b", False), ("*@127.0.0.1/x", False),
    ("/a b", False), ("/a#frag", False), ("/a\\b", False), ("/a\r\nHost: x", False),
    ("/\x7f", False), ("/é", False),
])
def test_path_with_query_is_origin_form(path, ok):
    if ok:
        check_path_with_query(path)
    else:
        with pytest.raises(Refused):
            check_path_with_query(path)


def test_target_takes_the_scheme_default_port():
    assert parse_target("http", "example.com").port == 80
    assert parse_target("https", "example.com").port == 443 and parse_target("https", "x").tls
    with pytest.raises(Refused) as refused:
        parse_target("ftp", "example.com")
    assert refused.value.error_code == "HTTP-protocol-error"
    with pytest.raises(Refused) as refused:
        parse_target("http", None)
    assert refused.value.error_code == "HTTP-request-URI-invalid"


@pytest.mark.parametrize("pattern, authority, allowed", [
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "API.EXAMPLE.COM:8443", True),
    ("*.example.com", "example.com", False),  # a * is one label: not zero ...
    ("*.example.com", "a.b.example.com", False),  # ... and not two
    ("*.example.com", "evil.com:1\\x.example.com", None),  # never even parsed
    ("*.0.0.2", "127.0.0.2", True),
    ("*.0.0.2", "127.0.0.1", False),
    ("10.0.0.*", "10.0.0.7:80", True),
    ("127.0.0.1", "127.1:8080", True),
    ("127.0.0.1:8080", "127.0.0.1:8080", True),
    ("127.0.0.1:8080", "127.0.0.1:8081", False),
    ("127.0.0.1:80", "127.0.0.1", True),  # http's default port
    ("[::1]", "[0::1]:9", True),
    ("[::1]", "127.0.0.1", False),
    ("*.0.0.1", "[::1]", False),
])
def test_patterns_match_hosts_by_labels(pattern, authority, allowed):
    policy = OutboundPolicy([pattern])
    try:
        target = parse_target("http", authority)
    except Refused:
        assert allowed is None
        return
    try:
        policy.check(target)
    except Refused as refused:
        assert refused.error_code == "HTTP-request-denied"
        assert allowed is False
    else:
        assert allowed is True


@pytest.mark.parametrize("pattern", ["a*.com", "*x.example.com", "ex*ample.com", "**.com",
                                     "user@host", "host:port", "host:0", "[::1", "a b", "a..b"])
def test_bad_pattern_is_a_startup_error(pattern):
    with pytest.raises(ValueError):
        HostPattern.parse(pattern)
    result = run_cli("--allow-outbound", pattern, "missing.wasm")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"wasisup: error: --allow-outbound: {pattern!r}")


class RecordingService:
    """A service on 127.0.0.1 that records every connection it gets and answers "secret"."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.hits.append(head)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\n"
                             b"secret")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service():
    recording = RecordingService()
    yield recording
    recording.close()


def tricks(port: int) -> list[tuple[str, str, str, str]]:
    """(scheme, authority, path-with-query, the guest's answer) aimed at 127.0.0.1:port."""
    refused_path, refused_authority = "set-path-with-query refused", "set-authority refused"
    denied, invalid = "outbound error: http-request-denied", refused_authority
    return [
        ("http", "127.0.0.2", f"*@127.0.0.1:{port}/secret", refused_path),
        ("http", "127.0.0.2", f"@127.0.0.1:{port}/secret", refused_path),
        ("http", f"127.0.0.1:{port}\\x.0.0.2", "/secret", invalid),
        ("http", f"127.0.0.2@127.0.0.1:{port}", "/secret", invalid),
        ("http", f"127.0.0.1:{port}#.0.0.2", "/secret", invalid),
        ("http", f"127.0.0.1:{port}/x.0.0.2", "/secret", invalid),
        ("http", f"127.0.0.1:{port} .0.0.2", "/secret", invalid),
        ("http", f"127.0.0.1.0.0.2:{port}", "/secret", invalid),
        ("http", f"127.0.0.1:{port}\u3002x.0.0.2", "/secret", invalid),
        ("http", f"127.1:{port}", "/secret", denied),
        ("http", f"2130706433:{port}", "/secret", denied),
        ("http", f"[::ffff:127.0.0.1]:{port}", "/secret", denied),
        ("http", f"localhost:{port}", "/secret", denied),
        ("http://127.0.0.1:{port}/#", "127.0.0.2", "/secret", "set-scheme refused"),
    ]


def ask(server, scheme: str, authority: str, path: str) -> tuple[int, bytes]:
    query = "&".join(f"{name}={quote(value, safe='')}" for name, value in
                     (("scheme", scheme), ("authority", authority), ("path", path)))
    status, _, body = server.request("GET", f"/?{query}")
    return status, body


def test_tricks_never_reach_a_host_outside_the_allow_list(serve, service):
    server = serve("rawoutbound", "-w", "1", "--allow-outbound", "127.0.0.2",
                   "--allow-outbound", "*.0.0.2")
    for scheme, authority, path, expected in tricks(service.port):
        status, body = ask(server, scheme, authority, path)
        assert body.decode() == expected + "\n", (authority, path)
        assert status != 200
    # The allow-list does let 127.0.0.2 through (nothing listens there).
    status, body = ask(server, "http", f"127.0.0.2:{closed_port()}", "/")
    assert (status, body) == (502, b"outbound error: connection-refused\n")
    assert service.hits == []
    assert "Outbound requests are unrestricted" not in server.log()


def test_allowed_host_is_reached_with_the_guests_path_and_authority(serve, service):
    server = serve("rawoutbound", "-w", "1", "--allow-outbound", "127.0.0.1")
    status, body = ask(server, "http", f"127.0.0.1:{service.port}", "/secret?q=1")
    assert (status, body) == (200, b"upstream 200\nsecret")
    assert len(service.hits) == 1
    assert service.hits[0].startswith(b"GET /secret?q=1 HTTP/1.1\r\n")
    assert f"\r\nhost: 127.0.0.1:{service.port}\r\n".encode() in service.hits[0].lower()


def test_unrestricted_outbound_is_a_warning_at_startup(serve):
    server = serve("hello", "-w", "1")
    assert server.request("GET", "/")[0] == 200  # a worker serves: the master is ready
    assert server.log().count("Outbound requests are unrestricted") == 1
