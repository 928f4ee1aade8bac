"""What an operator sees of real requests: the metrics of the requests served and of the
upstream hop behind them, and the trace context that crosses the proxy."""

from __future__ import annotations

import http.client
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from conftest import closed_port, free_port, metrics_text, wait_until


def samples(port: int, name: str, **labels: str) -> list[float]:
    """The values of the samples called ``name`` with (at least) these labels."""
    found = []
    for family in text_string_to_metric_families(metrics_text(port)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found.append(sample.value)
    return found


def total(port: int, name: str, **labels: str) -> float:
    return sum(samples(port, name, **labels))


def served(serve, *args: str, upstream: str) -> tuple:
    """The reference proxy in front of ``upstream``, with its metrics port."""
    port = free_port()
    server = serve("proxy", "-w", "1", "--env", f"UPSTREAM={upstream}",
                   "--metrics-bind", f"127.0.0.1:{port}", *args)
    return server, port


def test_requests_are_counted_by_method_and_code_with_their_sizes(serve, upstream):
    server, port = served(serve, upstream=upstream)
    assert server.request("POST", "/?status=201", body=b"x" * 1000)[0] == 201
    assert server.request("GET", "/?status=404")[0] == 404
    assert server.request("FOO", "/")[0] == 501  # (the upstream knows no FOO)
    wait_until(lambda: total(port, "wasisup_requests_total") == 3, what="three requests")
    assert total(port, "wasisup_requests_total", method="POST", code="201") == 1
    assert total(port, "wasisup_request_duration_seconds_count", method="GET", code="404") == 1
    assert total(port, "wasisup_requests_total", method="_OTHER", code="501") == 1
    assert total(port, "wasisup_request_body_bytes_sum") == 1000
    assert total(port, "wasisup_response_body_bytes_sum") > 0
    assert total(port, "wasisup_request_wait_seconds_count") == 3
    assert total(port, "wasisup_guest_seconds_total") > 0


def test_the_upstream_hop_is_measured_by_origin_and_outcome(serve, upstream):
    server, port = served(serve, upstream=upstream)
    for _ in range(5):
        assert server.request("GET", "/?status=503")[0] == 503
    wait_until(lambda: total(port, "wasisup_outbound_request_duration_seconds_count") == 5,
               what="five upstream requests")
    assert total(port, "wasisup_outbound_request_duration_seconds_count",
                 method="GET", origin=upstream, code="503", error="") == 5
    assert total(port, "wasisup_outbound_connections_opened_total") == 1
    assert total(port, "wasisup_outbound_connections_reused_total") == 4
    wait_until(lambda: samples(port, "wasisup_outbound_connections", state="idle") == [1.0],
               what="the pooled connection in the gauge")
    assert samples(port, "wasisup_outbound_connections", state="open") == [1.0]
    assert samples(port, "wasisup_guest_instances", state="busy") == [0.0]

    refused = f"http://127.0.0.1:{closed_port()}"
    server, port = served(serve, upstream=refused)
    assert server.request("GET", "/")[0] == 502
    denied, denied_port = served(serve, "--allow-outbound", "example.com", upstream=upstream)
    assert denied.request("GET", "/")[0] == 502
    wait_until(lambda: total(port, "wasisup_outbound_request_duration_seconds_count") == 1,
               what="the refused request")
    assert total(port, "wasisup_outbound_request_duration_seconds_count",
                 origin=refused, code="", error="connection-refused") == 1
    assert total(denied_port, "wasisup_outbound_request_duration_seconds_count",
                 error="HTTP-request-denied") == 1


def test_a_burst_of_answers_keeps_its_connections_for_the_next_burst(serve, upstream):
    server, port = served(serve, upstream=upstream)
    count = 48  # more than a small fixed pool would keep
    for burst in ("first", "second"):
        with ThreadPoolExecutor(count) as pool:
            statuses = list(pool.map(
                lambda _: server.request("GET", f"/gate?n={count}&group=burst-{burst}")[0],
                range(count)))
        assert statuses == [200] * count
    assert total(port, "wasisup_outbound_connections_opened_total") == count
    assert total(port, "wasisup_outbound_connections_reused_total") == count


def test_requests_beyond_the_cap_are_seen_waiting(serve, upstream):
    server, port = served(serve, "--max-concurrent-requests", "1", upstream=upstream)
    kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    kept.request("GET", "/healthz")  # (accepted while there is room, then kept alive)
    assert kept.getresponse().read() == b"ok\n"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(server.request, "GET", "/slow?seconds=3")
        wait_until(lambda: total(port, "wasisup_requests_in_flight") == 1, what="one in flight")
        kept.request("GET", "/slow?seconds=0")  # on an open connection: in the worker's queue
        backlog = pool.submit(server.request, "GET", "/slow?seconds=0")  # not taken yet
        wait_until(lambda: samples(port, "wasisup_requests_queued") == [1.0]
                   and samples(port, "wasisup_listen_backlog") == [1.0], what="both waiting")
        assert kept.getresponse().status == first.result()[0] == backlog.result()[0] == 200
    wait_until(lambda: total(port, "wasisup_request_wait_seconds_count") == 4, what="four starts")
    assert total(port, "wasisup_request_wait_seconds_sum") > 2  # both waited the first out


INBOUND_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INBOUND_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INBOUND_TRACE}-{INBOUND_PARENT}-01"


def upstream_saw(server, headers: dict[str, str]) -> dict[str, str]:
    """The trace fields the echo upstream got for a request sent with ``headers``."""
    status, _, body = server.request("GET", "/traced", headers=headers)
    assert status == 200
    return {name: value for name, value in json.loads(body)["headers"]
            if name in ("traceparent", "tracestate")}


def test_trace_context_crosses_the_proxy_in_a_span_of_its_own(serve, upstream, tmp_path):
    access_log = tmp_path / "access.log"
    server, _ = served(serve, "--access-logfile", str(access_log), upstream=upstream)
    seen = upstream_saw(server, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    version, trace_id, parent_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", INBOUND_TRACE, "01")
    assert re.fullmatch("[0-9a-f]{16}", parent_id) and parent_id != INBOUND_PARENT
    assert seen["tracestate"] == "vendor=1"
    wait_until(lambda: f"trace={INBOUND_TRACE}" in access_log.read_text(), what="the access log")

    started = upstream_saw(server, {})["traceparent"].split("-")  # no trace yet: one starts
    assert started[0] == "00" and started[1] != INBOUND_TRACE and started[3] == "01"
    for malformed in (f"00-{'0' * 32}-{INBOUND_PARENT}-01", f"00-{INBOUND_TRACE}-{'0' * 16}-01",
                      f"ff-{INBOUND_TRACE}-{INBOUND_PARENT}-01", f"00-{INBOUND_TRACE}-x-01",
                      f"00-{INBOUND_TRACE.upper()}-{INBOUND_PARENT}-01", TRACEPARENT + "-extra"):
        restarted = upstream_saw(server, {"traceparent": malformed})["traceparent"].split("-")
        assert restarted[1] != INBOUND_TRACE and len(restarted[1]) == 32, malformed
    later = upstream_saw(server, {"traceparent": f"01-{INBOUND_TRACE}-{INBOUND_PARENT}-00-more"})
    assert later["traceparent"].split("-")[1:4:2] == [INBOUND_TRACE, "00"]  # a later version

    untraced, _ = served(serve, "--no-trace-context", upstream=upstream)
    assert upstream_saw(untraced, {"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps the spans POSTed to /v1/traces."""

    spans: list = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_reach_an_otlp_collector_with_their_links(serve, upstream):
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    server = serve("proxy", "-w", "1", "--env", f"UPSTREAM={upstream}",
                   env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    seen = upstream_saw(server, {"traceparent": TRACEPARENT})
    client_span_id = seen["traceparent"].split("-")[2]
    spans = wait_until(lambda: len(_Collector.spans) >= 2 and list(_Collector.spans),
                       what="two spans")
    collector.shutdown()
    kinds = {span.kind: span for span in spans}
    server_span = kinds[Span.SpanKind.SPAN_KIND_SERVER]
    client_span = kinds[Span.SpanKind.SPAN_KIND_CLIENT]
    assert server_span.trace_id.hex() == client_span.trace_id.hex() == INBOUND_TRACE
    assert server_span.parent_span_id.hex() == INBOUND_PARENT
    assert client_span.parent_span_id == server_span.span_id
    assert client_span.span_id.hex() == client_span_id  # what the upstream was told
    attributes = {span.kind: {a.key: a.value for a in span.attributes} for span in spans}
    server_attributes = attributes[Span.SpanKind.SPAN_KIND_SERVER]
    assert server_attributes["http.request.method"].string_value == "GET"
    assert server_attributes["url.path"].string_value == "/traced"
    assert server_attributes["http.response.status_code"].int_value == 200
    client_attributes = attributes[Span.SpanKind.SPAN_KIND_CLIENT]
    assert client_attributes["server.address"].string_value == "127.0.0.1"
    assert client_attributes["http.response.status_code"].int_value == 200
    assert server_span.start_time_unix_nano <= client_span.start_time_unix_nano
    assert client_span.end_time_unix_nano <= server_span.end_time_unix_nano
    assert server_span.name == client_span.name == "GET"


def test_the_config_file_can_turn_trace_context_off(serve, upstream, tmp_path):
    config = tmp_path / "untraced.conf.py"
    config.write_text("trace_context = False\n")
    server, _ = served(serve, "-c", str(config), upstream=upstream)
    assert upstream_saw(server, {"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}
