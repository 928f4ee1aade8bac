"""Each test guest, served by wasisup, behaves as documented."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import (
    ROOT, Server, build_guest, free_port, guest, raw_exchange, run_cli, wasisup_argv,
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One wasisup per guest for the whole module (starting one costs about a second)."""
    tmp = tmp_path_factory.mktemp("serving")
    started: dict[str, Server] = {}

    def get(name: str, *args: str) -> Server:
        key = " ".join((name, *args))
        if key not in started:
            port = free_port()
            started[key] = Server(wasisup_argv(guest(name), *args, port=port), port, tmp).wait_ready()
        return started[key]

    yield get
    for server in started.values():
        server.stop()


def test_hello(servers):
    status, headers, body = servers("hello").request("GET", "/")
    assert (status, headers["content-type"], body) == (200, "text/plain", b"hello from wasm\n")
    assert "date" in headers


def test_keep_alive_serves_several_requests_on_one_connection(servers):
    conn = http.client.HTTPConnection("127.0.0.1", servers("hello").port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello from wasm\n")
    conn.close()


def test_echo_sees_method_path_query_headers_and_body(servers):
    status, headers, body = servers("echo").request(
        "PUT", "/some/path?a=1&b=two", body=b"payload \x00\xff", headers={"X-Custom": "Value 1"})
    assert status == 200 and headers["x-echo-method"] == "PUT"
    echoed = json.loads(body)
    assert echoed["method"] == "PUT"
    assert echoed["path_with_query"] == "/some/path?a=1&b=two"
    assert echoed["scheme"] == "Http"
    assert echoed["authority"] == f"127.0.0.1:{servers('echo').port}"
    assert ["x-custom", "Value 1"] in echoed["headers"]
    assert not any(name == "host" for name, _ in echoed["headers"]), "Host is the authority"
    assert echoed["body"] == "payload \x00\xff"


def test_extension_method_reaches_the_guest(servers):
    status, _, body = servers("echo").request("PURGE", "/x")
    assert status == 200 and json.loads(body)["method"] == "PURGE"


def test_download_streams_megabytes_chunked(servers):
    size = 5 * 1024 * 1024 + 123
    conn = http.client.HTTPConnection("127.0.0.1", servers("stream").port, timeout=60)
    conn.request("GET", f"/download?size={size}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("transfer-encoding") == "chunked"
    assert response.getheader("content-length") is None
    data = response.read()
    pattern = bytes(range(256)) * 256
    assert len(data) == size
    assert data == (pattern * (size // len(pattern) + 1))[:size]


def test_upload_streams_megabytes_to_the_guest(servers):
    payload = bytes(range(251)) * 20000  # ~5 MB, not a multiple of any buffer size
    status, _, body = servers("stream").request("POST", "/upload", body=payload)
    assert status == 200
    assert body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_chunked_upload(servers):
    chunks = [b"a" * 1000, b"b" * 70000, b"c"]
    conn = http.client.HTTPConnection("127.0.0.1", servers("stream").port, timeout=30)
    conn.request("POST", "/upload", body=iter(chunks), encode_chunked=True)
    response = conn.getresponse()
    joined = b"".join(chunks)
    assert response.read() == f"{len(joined)} {hashlib.sha256(joined).hexdigest()}\n".encode()


def test_expect_100_continue(servers):
    port = servers("stream").port
    request = (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(b"hello")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert f"5 {hashlib.sha256(b'hello').hexdigest()}".encode() in reply


def test_trap_gives_500_and_the_server_carries_on(servers):
    server = servers("trap")
    status, _, body = server.request("GET", "/")
    assert status == 500 and b"<h1>500 Internal Server Error</h1>" in body
    assert server.request("GET", "/")[0] == 500  # still serving, with a fresh instance
    assert "this guest traps on purpose" in server.log()


def test_trap_after_headers_cuts_the_connection(servers):
    reply = raw_exchange(servers("trap").port,
                         b"GET /after-headers HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 100" in head.lower()
    assert body == b"partial", "the body stops short and the connection closes"


def test_no_response_gives_500(servers):
    server = servers("noresponse")
    status, _, body = server.request("GET", "/")
    assert status == 500 and b"<h1>500 Internal Server Error</h1>" in body
    assert "without setting a response" in server.log()


def test_guest_stdout_and_stderr_go_to_the_log_with_a_request_id(servers):
    server = servers("stdio")
    assert server.request("GET", "/marker-path")[0] == 200
    log = server.log()
    import re
    assert re.search(r"\[[0-9a-f]+-\d+\] stdout: stdout line for /marker-path", log), log[-2000:]
    assert re.search(r"\[[0-9a-f]+-\d+\] stderr: stderr line", log)


def test_instance_reuse_serves_many_requests(servers):
    server = servers("echo", "--max-instance-reuse", "50")
    for i in range(120):
        status, _, body = server.request("POST", f"/n/{i}", body=str(i).encode())
        assert status == 200 and json.loads(body)["body"] == str(i)


def test_env_reaches_the_guest(serve, upstream):
    server = serve("proxy", "--env", f"UPSTREAM={upstream}")
    status, headers, body = server.request("GET", "/via-env")
    assert status == 200 and json.loads(body)["path"] == "/via-env"


def test_head_request_gets_no_body(servers):
    status, headers, body = servers("hello").request("HEAD", "/")
    assert status == 200 and body == b""


def test_javascript_guest(servers):
    server = servers("hello-js")
    status, headers, body = server.request("POST", "/js?q=1", body=b"abc", headers={"x-test": "t"})
    assert status == 200 and headers["x-guest"] == "js"
    assert body == b"hello from js: POST /js?q=1 x-test=t body=3\n"
    assert server.request("GET", "/teapot")[0] == 418


def test_precompiled_cwasm_is_served(serve, tmp_path):
    cwasm = tmp_path / "hello.cwasm"
    compiled = run_cli("compile", str(guest("hello")), "-o", str(cwasm))
    assert compiled.returncode == 0, compiled.stderr
    server = serve(cwasm)
    assert server.request("GET", "/")[2] == b"hello from wasm\n"


@pytest.mark.parametrize("args, message", [
    (["/does/not/exist.wasm"], "does not exist"),
    ([str(ROOT / "README.md")], "not a WebAssembly binary"),
    (["-b", "nonsense", "{hello}"], "bind"),
    (["-w", "many", "{hello}"], "give a whole number"),
    (["--max-memory", "lots", "{hello}"], "not a size"),
    (["--no-such-flag", "{hello}"], "unrecognized arguments"),
    (["--http-protocols", "h3", "{hello}"], "not a list of protocols"),
    (["--http2-cleartext", "upgrade", "{hello}"], "not off or prior-knowledge"),
    (["--http2-cleartext", "prior-knowledge", "--http-protocols", "h1", "{hello}"],
     "add h2 to it"),
    (["--http2-cleartext", "prior-knowledge", "--certfile", str(ROOT / "README.md"), "{hello}"],
     "HTTP/2 is chosen by ALPN"),
    ([], "no COMPONENT"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    args = [a.replace("{hello}", str(guest("hello"))) for a in args]
    result = run_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("wasisup: error:") and message in lines[0], lines
    assert "Traceback" not in result.stderr


def test_core_module_and_wrong_world_are_rejected(tmp_path):
    core = tmp_path / "core.wasm"
    core.write_bytes(b"\0asm\x01\0\0\0")
    result = run_cli(str(core))
    assert result.returncode == 2 and "core WebAssembly module, not a component" in result.stderr
    result = run_cli(str(build_guest(ROOT / "bench" / "hostcall")))
    assert result.returncode == 2
    assert "wasisup:bench/host" in result.stderr or "incoming-handler" in result.stderr
    assert "Traceback" not in result.stderr


def test_outbound_first_byte_timeout_is_the_guests(serve, upstream):
    # The outbound guest allows 5 s for the first byte; this upstream takes 7.
    server = serve("outbound")
    status, _, body = server.request("GET", f"/?url={upstream}/slow%3Fseconds%3D7")
    assert (status, body) == (502, b"outbound error: connection-read-timeout\n")


def test_unix_socket_bind(tmp_path):
    path = tmp_path / "wasisup.sock"
    server = Server([sys.executable, "-m", "wasisup", "-b", f"unix:{path}", str(guest("hello"))],
                    0, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and b"\r\nhello from wasm\n\r\n" in reply
    finally:
        server.stop()


def test_a_broken_component_leaves_nothing_in_the_cache(tmp_path):
    # Compiled, it fails the check (another world): no .cwasm may stay behind for a later run
    # to take from the cache.
    cache = tmp_path / "cache"
    other_world = build_guest(ROOT / "bench" / "hostcall")
    result = subprocess.run([sys.executable, "-m", "wasisup", str(other_world), "-b",
                             f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "WASISUP_CACHE": str(cache)})
    assert result.returncode == 2 and "incoming-handler" in result.stderr
    assert not list(cache.rglob("*.cwasm*"))
