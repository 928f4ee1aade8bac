"""HTTP/2: negotiated by ALPN over TLS and by its preface on an h2c listener, streams as
concurrent guest calls, flow control both ways, resets, GOAWAY drains, trailers, gRPC, and the
bounds on HTTP/2's own attack surface. Real clients: curl, nghttp, grpcio, and h2 on a socket
(tests/h2client.py) for the frames the others do not send."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (ContinuationFrame, GoAwayFrame, HeadersFrame, RstStreamFrame,
                              SettingsFrame)

from conftest import free_port, metrics_text, upstream_peak, wait_until
from h2client import H2Client

H2C = ("--http2-cleartext", "prior-knowledge")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True,
                          timeout=60)


def tls_options(pki: dict[str, Path]) -> tuple[str, ...]:
    return ("--certfile", str(pki["server_cert"]), "--keyfile", str(pki["server_key"]))


def test_curl_negotiates_h2_by_alpn_over_tls(serve, pki):
    server = serve("echo", *tls_options(pki))
    url = f"https://localhost:{server.port}/alpn?x=1"
    version = ["--cacert", str(pki["ca"]), "-o", "/dev/null", "-w", "%{http_version}"]
    assert curl("--http2", *version, url).stdout == b"2"
    assert curl("--http1.1", *version, url).stdout == b"1.1"
    answer = json.loads(curl("--http2", "--cacert", str(pki["ca"]), "-d", "over h2", url).stdout)
    assert (answer["method"], answer["path_with_query"], answer["body"]) == ("POST", "/alpn?x=1",
                                                                            "over h2")
    assert answer["scheme"] == "Https" and answer["authority"] == f"localhost:{server.port}"


def test_http1_only_offers_no_h2(serve, pki):
    server = serve("echo", "--http-protocols", "h1", *tls_options(pki))
    result = curl("--http2", "--cacert", str(pki["ca"]), "-o", "/dev/null", "-w",
                  "%{http_version}", f"https://localhost:{server.port}/")
    assert result.stdout == b"1.1"


def test_h2c_prior_knowledge_and_http11_share_a_port(serve):
    server = serve("echo", *H2C)
    version = ["-o", "/dev/null", "-w", "%{http_version}"]
    assert curl("--http2-prior-knowledge", *version, server.url + "/").stdout == b"2"
    assert curl("--http1.1", *version, server.url + "/").stdout == b"1.1"
    answer = json.loads(curl("--http2-prior-knowledge", "-H", "x-one: 1", server.url
                             + "/h2c?q").stdout)
    assert answer["path_with_query"] == "/h2c?q" and ["x-one", "1"] in answer["headers"]


def test_without_h2c_a_preface_is_an_http11_error_not_a_hang(serve):
    server = serve("echo")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 505 ")


def test_a_stalled_preface_is_closed_at_the_header_timeout(serve):
    server = serve("echo", *H2C, "--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"PRI * HTTP/2")
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # (the bytes were never read)
            assert client.recv(100) == b""
        assert 0.9 < time.monotonic() - started < 5


def test_streams_of_one_connection_run_concurrently(serve, upstream):
    server = serve("proxy", "-w", "1", *H2C, "--env", f"UPSTREAM={upstream}")
    count = 50  # the upstream answers only once all of them wait there at once
    client = H2Client(server.port)
    streams = [client.request("GET", f"/gate?n={count}&group=h2gate") for _ in range(count)]
    replies = [client.response(stream) for stream in streams]
    assert [reply.status for reply in replies] == [200] * count
    assert all(dict(reply.headers).get("x-wasisup-proxy") for reply in replies)


def test_large_bodies_both_ways_under_flow_control(serve, tmp_path):
    server = serve("stream", *H2C)
    size = 8 << 20
    body = tmp_path / "body"
    body.write_bytes(bytes(range(256)) * (size // 256))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    upload = curl("--http2-prior-knowledge", "--data-binary", f"@{body}", server.url + "/upload")
    assert upload.stdout.decode() == f"{size} {digest}\n"
    download = curl("--http2-prior-knowledge", f"{server.url}/download?size={size}")
    assert hashlib.sha256(download.stdout).hexdigest() == digest
    # A client with a 1 KiB window that takes its time: never sent more than it allowed (h2
    # would refuse the frames), and the stream completes.
    client = H2Client(server.port, window=1024)
    reply = client.get("/download?size=300000")
    assert reply.status == 200 and len(reply.body) == 300000
    client.close()


def test_a_request_body_waits_for_the_guest_window_by_window(serve):
    server = serve("stream", *H2C, "--http2-initial-window-size", "16384")
    client = H2Client(server.port)
    payload = bytes(range(256)) * 4096  # 1 MiB through 16 KiB windows
    stream = client.request("POST", "/upload", body=payload)
    reply = client.response(stream)
    assert reply.body.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"


def in_flight(metrics_port: int) -> float:
    return sum(float(value) for value in re.findall(
        r'wasisup_requests_in_flight\{pid="\d+"\} ([\d.]+)', metrics_text(metrics_port)))


def test_rst_stream_cancels_the_streams_guest_call(serve, upstream):
    metrics_port = free_port()
    server = serve("proxy", "-w", "1", *H2C, "--log-level", "debug", "--metrics-bind",
                   f"127.0.0.1:{metrics_port}", "--env", f"UPSTREAM={upstream}")
    client = H2Client(server.port)
    stream = client.request("GET", "/slow?seconds=30&group=h2reset")
    kept = client.request("GET", "/slow?seconds=1&group=h2kept")
    wait_until(lambda: upstream_peak(upstream, "h2reset") == 1, what="the guest waiting upstream")
    client.reset(stream)
    wait_until(lambda: in_flight(metrics_port) <= 1, timeout=10, what="the call dropped")
    assert "went away: the guest's call was dropped" in server.log()
    assert "wasisup_http2_client_resets_total 1.0" in metrics_text(metrics_port)
    assert client.response(kept).status == 200  # the connection's other stream goes on
    assert client.get("/healthz").body == b"ok\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_drain_sends_goaway_and_open_streams_finish(serve, upstream, signum):
    server = serve("proxy", "-w", "1", *H2C, "--env", f"UPSTREAM={upstream}")
    group = f"h2drain{signum}-"
    urls = [f"{server.url}/slow?seconds=2&group={group}{i}" for i in range(5)]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(subprocess.run, ["nghttp", "-nv", *urls], capture_output=True,
                          timeout=60)
        wait_until(lambda: all(upstream_peak(upstream, f"{group}{i}") == 1 for i in range(5)),
                   what="five streams waiting upstream")
        server.send_signal(signum)
        output = run.result().stdout.decode()
    assert output.count(":status: 200") == 5, output
    # (nghttp's streams are 13 to 21: the GOAWAY names the last, so none is lost)
    assert re.search(r"recv GOAWAY frame.*\n.*last_stream_id=21, error_code=NO_ERROR", output), output
    if signum == signal.SIGTERM:
        assert server.proc.wait(30) == 0
    else:  # the new worker serves
        assert H2Client(server.port).get("/healthz").body == b"ok\n"


def test_a_client_goaway_lets_its_open_streams_finish(serve, upstream):
    server = serve("proxy", "-w", "1", *H2C, "--env", f"UPSTREAM={upstream}")
    client = H2Client(server.port)
    stream = client.request("GET", "/slow?seconds=1&group=h2client-goaway")
    wait_until(lambda: upstream_peak(upstream, "h2client-goaway") == 1, what="the stream upstream")
    goaway = GoAwayFrame(0)  # (raw: h2's own client would stop reading after sending it)
    goaway.last_stream_id, goaway.error_code = 0, ErrorCodes.NO_ERROR
    client.send(frames(goaway))
    reply = client.response(stream)
    assert reply.status == 200 and reply.ended
    client.until_closed()  # (no streams left: the server closes)


def test_max_concurrent_streams_is_at_most_the_admission_limit(serve):
    server = serve("hello", *H2C, "--max-concurrent-requests", "8")
    client = H2Client(server.port)
    client.wait(lambda: client.h2.remote_settings.max_concurrent_streams == 8)


def test_a_stream_whose_window_stays_shut_is_cut_off(serve):
    server = serve("stream", *H2C, "--min-data-rate", "1000", "--data-rate-grace", "1")
    client = H2Client(server.port, window=0)
    stream = client.request("GET", "/download?size=100000")
    started = time.monotonic()
    reply = client.response(stream)
    assert reply.reset is not None and time.monotonic() - started < 10
    assert "it reads the response too slowly" in server.log()


def test_request_trailers_reach_the_guest(serve):
    server = serve("echo", *H2C)
    client = H2Client(server.port)
    stream = client.request("POST", "/t", headers=[("te", "trailers")], body=b"abc", end=False)
    client.trailers(stream, [("x-checksum", "123"), ("content-length", "9")])
    answer = json.loads(client.response(stream).body)
    assert answer["body"] == "abc"
    assert answer["trailers"] == [["x-checksum", "123"]]  # (content-length is no trailer)


def test_response_trailers_over_http2_and_chunked_http11(serve):
    server = serve("grpc", *H2C)
    message = b"\x0a\x03bob"
    body = b"\0" + len(message).to_bytes(4, "big") + message
    grpc_headers = [("content-type", "application/grpc"), ("te", "trailers")]
    client = H2Client(server.port)
    reply = client.response(client.request("POST", "/wasisup.test.Greeter/SayHello",
                                           headers=grpc_headers, body=body))
    assert reply.status == 200 and reply.body == b"\0\0\0\0\x0c\x0a\x0ahello, bob"
    assert reply.trailers == [("grpc-status", "0")]
    failed = client.response(client.request("POST", "/wasisup.test.Greeter/Nothing",
                                            headers=grpc_headers, body=body))
    assert failed.trailers == [("grpc-status", "12"), ("grpc-message", "no method Nothing")]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as http11:
        http11.sendall(b"POST /wasisup.test.Greeter/SayHello HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        raw = b""
        while chunk := http11.recv(65536):
            raw += chunk
    assert b"transfer-encoding: chunked\r\n" in raw
    assert raw.endswith(b"\r\n0\r\ngrpc-status: 0\r\n\r\n")


GREETER = "/wasisup.test.Greeter/"


def grpc_calls(channel: grpc.Channel) -> None:
    same = lambda data: data  # noqa: E731  (the messages are encoded by hand)
    hello = channel.unary_unary(GREETER + "SayHello", request_serializer=same,
                                response_deserializer=same)
    count = channel.unary_stream(GREETER + "Count", request_serializer=same,
                                 response_deserializer=same)
    for i in range(1000):
        if i % 10:
            assert hello(b"\x0a\x03bob", timeout=10) == b"\x0a\x0ahello, bob"
        else:
            assert list(count(b"\x08\x05", timeout=10)) == [b"\x08" + bytes([n])
                                                             for n in range(1, 6)]
    with pytest.raises(grpc.RpcError) as failed:
        hello(b"\x0a\x04fail", timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "no greeting for fail"


def test_grpcio_calls_a_grpc_guest_over_h2c_and_tls(serve, pki):
    cleartext = serve("grpc", *H2C)
    with grpc.insecure_channel(f"127.0.0.1:{cleartext.port}") as channel:
        grpc_calls(channel)
    secure = serve("grpc", *tls_options(pki), "--max-instance-reuse", "100")
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(f"localhost:{secure.port}", credentials) as channel:
        grpc_calls(channel)


def test_a_bad_head_gets_its_status_on_its_stream_and_the_connection_goes_on(serve):
    server = serve("echo", *H2C, "--limit-request-fields", "5")
    client = H2Client(server.port)
    many = [(f"x-{i}", "v") for i in range(10)]
    refused = client.get("/", headers=many)
    assert refused.status == 431 and b"too many header fields" in refused.body
    assert client.get("/").status == 200


def test_a_guest_that_traps_gets_500_or_its_stream_reset(serve):
    server = serve("trap", *H2C)
    client = H2Client(server.port)
    before = client.get("/")
    assert before.status == 500 and b"500 Internal Server Error" in before.body
    cut = client.get("/after-headers")  # the head and some body went out: no clean end
    assert cut.status == 200 and cut.reset == ErrorCodes.INTERNAL_ERROR and not cut.ended
    assert client.get("/").status == 500  # the connection carries on


def test_expect_100_continue_on_a_stream(serve):
    server = serve("echo", *H2C)
    client = H2Client(server.port)
    stream = client.request("POST", "/", headers=[("expect", "100-continue")], end=False)
    client.wait(lambda: (":status", "100") in client.replies[stream].headers)
    client.data(stream, b"after the 100", end=True)
    assert json.loads(client.response(stream).body)["body"] == "after the 100"


def test_head_and_no_content_have_no_body(serve):
    server = serve("hello", *H2C)
    client = H2Client(server.port)
    reply = client.response(client.request("HEAD", "/"))
    assert reply.status == 200 and reply.body == b"" and reply.ended


# -- HTTP/2's own attack surface

def frames(*items) -> bytes:
    return b"".join(frame.serialize() for frame in items)


def peer_may_close():
    """(A flood may meet the server's close before it is all sent.)"""
    return contextlib.suppress(BrokenPipeError, ConnectionResetError)


def goaway_code(client: H2Client) -> ErrorCodes:
    client.wait(lambda: client.goaway is not None)
    return client.goaway.error_code


def test_rapid_reset_gets_goaway(serve):
    metrics_port = free_port()
    server = serve("hello", *H2C, "--metrics-bind", f"127.0.0.1:{metrics_port}")
    client = H2Client(server.port)
    encoder = client.h2.encoder
    block = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                            (":authority", "x")])
    flood = []
    for stream_id in range(1, 2 * 3000, 2):  # open and cancel at once, 3,000 times
        headers = HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"])
        flood += [headers, RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL)]
    with peer_may_close():
        client.send(frames(*flood))
    assert goaway_code(client) == ErrorCodes.ENHANCE_YOUR_CALM
    assert "too many HTTP/2 control frames or reset streams" in server.log()
    assert 'wasisup_http2_goaways_total{error="enhance_your_calm"} 1.0' in metrics_text(
        metrics_port)
    assert H2Client(server.port).get("/").status == 200


def test_settings_flood_gets_goaway(serve):
    server = serve("hello", *H2C)
    client = H2Client(server.port)
    with peer_may_close():
        client.send(frames(*[SettingsFrame(0, settings={0x3: 100}) for _ in range(5000)]))
    assert goaway_code(client) == ErrorCodes.ENHANCE_YOUR_CALM
    assert H2Client(server.port).get("/").status == 200


def test_continuation_flood_gets_goaway(serve):
    server = serve("hello", *H2C)
    client = H2Client(server.port)
    block = client.h2.encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                      (":authority", "x")])
    flood = [HeadersFrame(1, block)] + [ContinuationFrame(1, b"\x40\x01a\x01b")
                                        for _ in range(10000)]
    with peer_may_close():
        client.send(frames(*flood))
    assert goaway_code(client) == ErrorCodes.PROTOCOL_ERROR
    assert H2Client(server.port).get("/").status == 200


def test_hpack_bomb_is_refused(serve):
    server = serve("hello", *H2C)
    client = H2Client(server.port)
    client.pump()  # (the server's settings)
    # One 4 KiB field in the dynamic table, then referenced 100 times: 400 KiB decoded from a
    # block of a few hundred bytes.
    big = client.h2.encoder.encode([("x-big", "a" * 4000)])
    index = b"\xbe"  # the dynamic table's first entry (index 62)
    block = client.h2.encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                      (":authority", "x")])
    with peer_may_close():
        client.send(frames(HeadersFrame(1, block + big + index * 100,
                                        flags=["END_HEADERS", "END_STREAM"])))
    assert goaway_code(client) == ErrorCodes.ENHANCE_YOUR_CALM  # (h2: a DenialOfServiceError)
    assert H2Client(server.port).get("/").status == 200


def test_more_streams_than_advertised_get_goaway(serve, upstream):
    server = serve("proxy", *H2C, "--http2-max-concurrent-streams", "10",
                   "--env", f"UPSTREAM={upstream}")
    client = H2Client(server.port)
    client.wait(lambda: client.h2.remote_settings.max_concurrent_streams == 10)
    client.send()  # (the settings acknowledged: in force)
    block = client.h2.encoder.encode([(":method", "GET"), (":path", "/slow?seconds=5&group=many"),
                                      (":scheme", "http"), (":authority", "x")])
    with peer_may_close():  # (h2's own client would not open the 11th)
        client.send(frames(*[HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"])
                             for stream_id in range(1, 41, 2)]))
    assert goaway_code(client) == ErrorCodes.PROTOCOL_ERROR
    assert H2Client(server.port).get("/healthz").status == 200
