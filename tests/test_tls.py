"""HTTPS on the listeners: real certificates made by openssl, real TLS clients (curl, Python's
ssl), certificates replaced under load, client certificates."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import error_line, free_port, guest, metrics_text, upstream_peak, wait_until


def served_files(tmp_path: Path, pki: dict[str, Path]) -> tuple[Path, Path]:
    """The server's certificate and key, copied where a test may replace them."""
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert.write_bytes(pki["server_cert"].read_bytes())
    key.write_bytes(pki["server_key"].read_bytes())
    return cert, key


def replace(path: Path, content: bytes) -> None:
    """Swap a file's content at once, as a Secret update or a renewal tool does."""
    staging = path.with_suffix(".new")
    staging.write_bytes(content)
    os.replace(staging, path)


def client_context(pki: dict[str, Path], certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if certificate:
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def https(port: int, context: ssl.SSLContext, method: str = "GET", path: str = "/",
          body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes, bytes]:
    """(status, body, the server certificate in DER) of one request on a new connection."""
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        presented = conn.sock.getpeercert(binary_form=True)
        response = conn.getresponse()
        return response.status, response.read(), presented
    finally:
        conn.close()


def scraped(port: int) -> str:
    """/metrics, or "" while the master's metrics server is not up yet."""
    try:
        return metrics_text(port)
    except OSError:
        return ""


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          text=True)


def test_curl_gets_answers_over_tls_1_2_and_1_3(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    server = serve("hello", "--certfile", str(cert), "--keyfile", str(key))
    url = f"https://localhost:{server.port}/"
    resolve = f"localhost:{server.port}:127.0.0.1"
    for versions in (["--tlsv1.2", "--tls-max", "1.2"], ["--tlsv1.3"]):
        done = curl("--cacert", str(pki["ca"]), "--resolve", resolve, *versions,
                    "-w", "%{http_code} %{ssl_verify_result}", url)
        assert done.returncode == 0 and done.stdout.endswith("200 0"), (versions, done.stderr)
    kept = curl("--cacert", str(pki["ca"]), "--resolve", resolve, url, url,
                "-w", "%{num_connects}\n")
    assert kept.stdout.splitlines()[-1] == "0"  # the second request on the same connection


def test_bodies_both_ways_over_tls(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    server = serve("echo", "--certfile", str(cert), "--keyfile", str(key))
    body = os.urandom(1 << 20).hex().encode()  # 2 MB: many TLS records each way
    status, answer, _ = https(server.port, client_context(pki), "POST", "/up", body)
    echoed = json.loads(answer)
    assert status == 200 and echoed["body"] == body.decode()
    assert echoed["scheme"] == "Https"  # the guest sees the request came over TLS


def test_plain_http_to_a_tls_port_is_told_so(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    server = serve("hello", "--certfile", str(cert), "--keyfile", str(key))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"plain HTTP" in answer


def test_clients_that_never_finish_a_handshake_hold_up_nobody(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    server = serve("hello", "-w", "1", "--threads", "1", "--certfile", str(cert),
                   "--keyfile", str(key), "--header-timeout", "30")
    stalled = []
    for number in range(200):  # half say nothing, half begin a handshake record and stop
        sock = socket.create_connection(("127.0.0.1", server.port))
        if number % 2:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        stalled.append(sock)
    try:
        context = client_context(pki)
        with ThreadPoolExecutor(20) as pool:  # (held up, they would wait the 30 s out)
            started = time.monotonic()
            answers = list(pool.map(lambda _: https(server.port, context, timeout=10)[0],
                                    range(20)))
            elapsed = time.monotonic() - started
        assert answers == [200] * 20 and elapsed < 5, elapsed
    finally:
        for sock in stalled:
            sock.close()


def test_client_certificates_are_required_with_cert_reqs_2(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    metrics_port = free_port()
    server = serve("hello", "--certfile", str(cert), "--keyfile", str(key),
                   "--cert-reqs", "2", "--ca-certs", str(pki["ca"]),
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    assert https(server.port, client_context(pki, certificate=True))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        https(server.port, client_context(pki))
    wait_until(lambda: re.search(r"^wasisup_tls_handshake_failures_total [1-9]",
                                 scraped(metrics_port), re.M), what="the refused handshake counted")
    line = error_line("--certfile", str(cert), "--keyfile", str(key), "--cert-reqs", "2",
                      str(guest("hello")))
    assert "--ca-certs" in line


def test_tls_files_that_do_not_load_are_one_line(tmp_path, pki):
    missing = error_line("--certfile", str(tmp_path / "nope.pem"), str(guest("hello")))
    assert "TLS:" in missing and "nope.pem" in missing
    mismatched = error_line("--certfile", str(pki["server_cert"]), "--keyfile",
                            str(pki["client_key"]), str(guest("hello")))
    assert "key values mismatch" in mismatched
    assert "0, 1 or 2" in error_line("--cert-reqs", "3", str(guest("hello")))


class _Load:
    """HTTPS requests, each on a new connection, until stopped: what failed, and the
    certificates the server presented."""

    def __init__(self, port: int, context: ssl.SSLContext, threads: int = 4) -> None:
        self.port, self.context = port, context
        self.failures: list[BaseException] = []
        self.presented: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _, presented = https(self.port, self.context)
                assert status == 200
                self.presented.append(presented)
            except BaseException as exc:  # (kept for the test to report)
                self.failures.append(exc)

    def __enter__(self) -> "_Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_certificates_are_replaced_under_load_with_and_without_hup(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    metrics_port = free_port()
    server = serve("hello", "-w", "2", "--certfile", str(cert), "--keyfile", str(key),
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    context = client_context(pki)
    with _Load(server.port, context) as load:
        wait_until(lambda: load.presented, what="answers")
        replace(key, pki["renewed_key"].read_bytes())  # (key first: a moment of mismatch)
        replace(cert, pki["renewed_cert"].read_bytes())
        wait_until(lambda: load.presented[-8:] == [der(pki["renewed_cert"])] * 8,
                   what="the renewed certificate on new connections")
        replace(key, pki["server_key"].read_bytes())  # and back, with a HUP this time
        replace(cert, pki["server_cert"].read_bytes())
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: load.presented[-8:] == [der(pki["server_cert"])] * 8,
                   what="the first certificate again")
    assert not load.failures, load.failures[:3]
    assert re.search(r'wasisup_tls_reloads_total\{outcome="ok"\} [1-9]', scraped(metrics_port))


def test_a_new_pair_that_does_not_load_keeps_the_old_one(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    metrics_port = free_port()
    server = serve("hello", "-w", "1", "--certfile", str(cert), "--keyfile", str(key),
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    replace(cert, b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    wait_until(lambda: 'wasisup_tls_reloads_total{outcome="failed"} 1.0'
               in scraped(metrics_port), what="the failed reload")
    status, _, presented = https(server.port, client_context(pki))
    assert status == 200 and presented == der(pki["server_cert"])
    assert "do not load, new connections keep the previous certificate" in server.log()


def test_the_config_files_ssl_context_hook_shapes_the_context(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    config = tmp_path / "tls.conf.py"
    config.write_text(
        f"certfile = {str(cert)!r}\nkeyfile = {str(key)!r}\n\n"
        "def ssl_context(config, default_ssl_context_factory):\n"
        "    import ssl\n"
        "    context = default_ssl_context_factory()\n"
        "    context.minimum_version = ssl.TLSVersion.TLSv1_3\n"
        "    return context\n")
    server = serve("hello", "-c", str(config))
    url, resolve = f"https://localhost:{server.port}/", f"localhost:{server.port}:127.0.0.1"
    old = curl("--cacert", str(pki["ca"]), "--resolve", resolve, "--tls-max", "1.2", url)
    assert old.returncode != 0 and "alert" in old.stderr.lower(), old.stderr
    new = curl("--cacert", str(pki["ca"]), "--resolve", resolve, "-w", "%{http_code}", url)
    assert new.stdout.endswith("200"), new.stderr


def test_a_graceful_stop_finishes_requests_in_flight_over_tls(serve, tmp_path, pki, upstream):
    cert, key = served_files(tmp_path, pki)
    server = serve("proxy", "--env", f"UPSTREAM={upstream}", "--certfile", str(cert),
                   "--keyfile", str(key))
    context = client_context(pki)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(https, server.port, context, "GET", "/slow?seconds=2&group=tls-drain",
                             None, 30) for _ in range(3)]
        wait_until(lambda: upstream_peak(upstream, "tls-drain") == 3, what="3 requests in flight")
        server.send_signal(signal.SIGTERM)
        assert [call.result()[0] for call in calls] == [200, 200, 200]
    assert server.proc.wait(30) == 0


def test_a_response_ended_by_closing_ends_with_a_close_notify(serve, tmp_path, pki):
    cert, key = served_files(tmp_path, pki)
    server = serve("hello", "--certfile", str(cert), "--keyfile", str(key))
    context = client_context(pki)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        # (a cut connection would raise SSLEOFError here, not end the read)
        with context.wrap_socket(raw, server_hostname="localhost",
                                 suppress_ragged_eofs=False) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from wasm\n")
