"""W3C trace context across the proxy hop, and spans for an OpenTelemetry collector.

wasisup takes part in each request's trace whatever its guest does: it reads the inbound
``traceparent`` (or starts a trace when there is none, or it is malformed), gives the request a
server span, and gives each of the guest's outbound requests a client span whose id goes into
that request's ``traceparent`` (replacing whatever the guest copied), with the inbound
``tracestate`` unless the guest set one. The trace id goes into the access log.

Spans are built only when an exporter runs: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and the OpenTelemetry SDK is installed
(``pip install 'wasisup[otel]'``). The SDK's batch processor exports them from its own thread,
off the request path, and reads the rest of its configuration (``OTEL_SERVICE_NAME``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``...) from the environment.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .http.outbound_policy import Target
from .metrics import method_label

log = logging.getLogger("wasisup.tracing")

# version-traceid-parentid-flags; a version after 00 may add fields after a dash.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z",
                          re.S)
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
SAMPLED = 0x01
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _random_id(bits: int) -> str:
    """A span (64 bits) or trace (128 bits) id: random, never all zeros."""
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


@dataclass(slots=True)
class Trace:
    """Where one inbound request stands in its trace."""

    trace_id: str
    span_id: str  # the request's server span
    parent_id: Optional[str]  # the caller's span; None when this request started the trace
    flags: int
    state: Optional[bytes]  # the inbound tracestate, passed on

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def outbound_fields(self, span_id: str) -> list[tuple[str, bytes]]:
        """The trace fields of an outbound request made in client span ``span_id``."""
        fields = [("traceparent", f"00-{self.trace_id}-{span_id}-{self.flags:02x}".encode())]
        if self.state is not None:
            fields.append(("tracestate", self.state))
        return fields


def incoming(fields: Iterable[tuple[bytes, bytes]]) -> Trace:
    """The trace an inbound request (its fields, names in lower case) belongs to."""
    parents, states = [], []
    for name, value in fields:
        if name == b"traceparent":
            parents.append(value)
        elif name == b"tracestate":
            states.append(value)
    if len(parents) == 1:
        match = _TRACEPARENT.match(parents[0].strip())
        if match is not None:
            version, trace_id, parent_id, flags, rest = match.groups()
            if (version != b"ff" and trace_id != _ZERO_TRACE and parent_id != _ZERO_SPAN
                    and (version != b"00" or rest is None)):
                return Trace(trace_id.decode(), _random_id(64), parent_id.decode(),
                             int(flags, 16), b",".join(states) if states else None)
    return Trace(_random_id(128), _random_id(64), None, SAMPLED, None)


def new_span_id() -> str:
    return _random_id(64)


class Exporter:
    """Builds finished spans and hands them to the OpenTelemetry SDK's batch processor."""

    def __init__(self, processor: Any, resource: Any) -> None:
        from opentelemetry import trace as api
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from . import __version__

        self._api, self._span = api, ReadableSpan
        self._processor, self._resource = processor, resource
        self._scope = InstrumentationScope("wasisup", __version__)

    def server_span(self, trace: Trace, seconds: float, method: str, scheme: str,
                    path_with_query: str, http_version: str, peer: str, status: int,
                    request_id: str) -> None:
        """The span of an inbound request that took ``seconds`` and has just ended (status 0:
        no response was sent)."""
        path, _, query = path_with_query.partition("?")
        attributes: dict[str, Any] = {
            "http.request.method": method_label(method), "url.scheme": scheme, "url.path": path,
            "network.protocol.version": http_version, "client.address": peer,
            "wasisup.request_id": request_id}
        if method_label(method) != method:
            attributes["http.request.method_original"] = method
        if query:
            attributes["url.query"] = query
        if status:
            attributes["http.response.status_code"] = status
        failed = status >= 500 or not status
        if failed:
            attributes["error.type"] = str(status) if status else "no-response"
        parent = (None if trace.parent_id is None
                  else self._context(trace, trace.parent_id, remote=True))
        self._export(trace, trace.span_id, parent, "SERVER", seconds, attributes, failed)

    def client_span(self, trace: Trace, span_id: str, seconds: float, method: str,
                    target: Target, path_with_query: str, status: int, error: str) -> None:
        """The span of an outbound request (a child of ``trace``'s server span) that got its
        response head (``status``) or failed (``error``, a wasi:http error-code)."""
        attributes: dict[str, Any] = {
            "http.request.method": method_label(method), "server.address": target.host,
            "server.port": target.port,
            "url.full": f"{target.scheme}://{target.authority}{path_with_query}"}
        if status:
            attributes["http.response.status_code"] = status
        failed = bool(error) or status >= 400
        if failed:
            attributes["error.type"] = error or str(status)
        self._export(trace, span_id, self._context(trace, trace.span_id, remote=False),
                     "CLIENT", seconds, attributes, failed)

    def _context(self, trace: Trace, span_id: str, remote: bool) -> Any:
        api = self._api
        return api.SpanContext(int(trace.trace_id, 16), int(span_id, 16), is_remote=remote,
                               trace_flags=api.TraceFlags(trace.flags))

    def _export(self, trace: Trace, span_id: str, parent: Any, kind: str, seconds: float,
                attributes: dict[str, Any], failed: bool) -> None:
        if not trace.sampled:
            return
        api = self._api
        end = time.time_ns()
        status = api.Status(api.StatusCode.ERROR if failed else api.StatusCode.UNSET)
        span = self._span(
            attributes["http.request.method"], context=self._context(trace, span_id, False),
            parent=parent, resource=self._resource, attributes=attributes,
            kind=getattr(api.SpanKind, kind), status=status,
            start_time=end - int(seconds * 1e9), end_time=end,
            instrumentation_scope=self._scope)
        self._processor.on_end(span)

    def close(self) -> None:
        """Export what is still queued (a worker that exits)."""
        self._processor.shutdown()


def exporter_from_env() -> Optional[Exporter]:
    """The span exporter the environment asks for, if any (in a worker: after the fork)."""
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is missing: "
                    "no spans are exported (pip install 'wasisup[otel]')")
        return None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "wasisup"}
    return Exporter(BatchSpanProcessor(OTLPSpanExporter()), Resource.create(attributes))
