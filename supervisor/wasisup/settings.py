"""Every wasisup option, declared once: flag, config key, default, validator and help.

gunicorn's settings are reused where they mean the same thing: ``REUSED`` maps each one's
config key to how wasisup offers it (its help, and its default, validator or metavar where they
differ from gunicorn's; the flags stay gunicorn's). The ``Setting`` classes below add what a
wasm host needs. The command line, ``--help`` and config files expose exactly these.

Help texts: one lower-case line, no markup, saying what the value does (the first line of a
class's ``desc``, later lines are detail). ``--help`` adds the default. A validator turns bad
input into a ``ValueError`` that names the problem and what to give instead; the command line
prefixes the flag (or config file and key). README's option table lists every setting with its
default (tests/test_cli.py holds it to these declarations).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from gunicorn.config import Setting, validate_bool, validate_list_string, validate_string
from gunicorn.util import parse_address

from .http.outbound_policy import HostPattern
from .usage import check_utf8

SECTION = "wasisup"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ADDRESS_FORMS = "use HOST:PORT (e.g. 127.0.0.1:8000), [IPV6]:PORT or unix:PATH"


def whole_number(minimum: int) -> Callable[[object], int]:
    """A validator for whole numbers from ``minimum`` up (gunicorn's accepts 0 workers)."""

    def validate(value: object) -> int:
        try:
            number = value if type(value) is int else int(str(value).strip())
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise ValueError(f"give a whole number of at least {minimum}, not {value!r}")
        return number

    return validate


validate_count = whole_number(0)
validate_positive = whole_number(1)


def validate_size(value: object) -> int:
    """A byte count: an integer, optionally with a K/M/G (binary) suffix; 0 means no limit."""
    if type(value) is int and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size: give bytes, or e.g. 64K, 256M, 1G")
    return int(match.group(1)) * 1024 ** " KMG".index((match.group(2) or " ").upper())


def validate_seconds(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"give a number of seconds (0 or more), not {value!r}")
    return seconds


def validate_loglevel(value: object) -> str:
    level = str(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return level


def validate_binds(value: object) -> list[str]:
    """Addresses to listen on, each checked the way gunicorn will parse it."""
    addresses = validate_list_string(value)
    for address in addresses:
        if address.count("[") != address.count("]"):
            raise ValueError(f"{address!r} has an unclosed '[': write an IPv6 address as "
                             "[IPV6]:PORT, e.g. [::1]:8000")
        try:
            parsed = parse_address(address)
        except RuntimeError as exc:  # e.g. "'x' is not a valid port number."
            raise ValueError(f"{address!r}: {str(exc).rstrip('.')}; {ADDRESS_FORMS}") from None
        if parsed == "":
            raise ValueError(f"{address!r} names no socket file: give unix:PATH")
        if isinstance(parsed, tuple) and not 0 <= parsed[1] <= 65535:
            raise ValueError(f"{address!r}: port {parsed[1]} is out of range (0-65535)")
    return addresses


def validate_env(value: object) -> list[tuple[str, str]]:
    """KEY=VALUE strings (or a dict, in a config file) -> the guest's environment, which WASI
    hands over as UTF-8 text (so a byte that is not UTF-8, as the shell may pass, is refused)."""
    if isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in validate_list_string(value):
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{item!r} is not KEY=VALUE (e.g. UPSTREAM=http://127.0.0.1:9000)")
            pairs.append((key, val))
    for key, val in pairs:
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"{key!r} is not a variable name: give one without '=' (e.g. UPSTREAM)")
        if "\0" in val:
            raise ValueError(f"the value of {key} holds a NUL character, which no environment "
                             "value can (a guest's own runtime would trap on it)")
        try:
            check_utf8(key, "a variable name")
            check_utf8(val, f"the value of {key}")
        except ValueError as exc:
            raise ValueError(f"{exc}: a guest's environment is UTF-8 text") from None
    return pairs


def validate_host_port(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = validate_string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT: give e.g. 127.0.0.1:9090")
    return text


def validate_patterns(value: object) -> list[str]:
    """``--allow-outbound`` entries, each checked now so a typo is a startup error."""
    patterns = validate_list_string(value)
    for pattern in patterns:
        HostPattern.parse(pattern)
    return patterns


def validate_cert_reqs(value: object) -> int:
    text = str(value).strip()
    if text not in ("0", "1", "2"):
        raise ValueError(f"{value!r} is not 0, 1 or 2 (none, optional, required)")
    return int(text)


def validate_http_protocols(value: object) -> list[str]:
    protocols = [part.strip().lower() for part in str(value).split(",") if part.strip()]
    if not protocols or set(protocols) - {"h1", "h2"} or len(set(protocols)) < len(protocols):
        raise ValueError(f"{value!r} is not a list of protocols: give h1, h2, h2,h1 or h1,h2")
    return protocols


def validate_h2c(value: object) -> str:
    text = "prior-knowledge" if value is True else "off" if value is False else str(value)
    if text.strip().lower() not in ("off", "prior-knowledge"):
        raise ValueError(f"{value!r} is not off or prior-knowledge (the Upgrade: h2c way is "
                         "not offered)")
    return text.strip().lower()


_GUNICORN = object()  # "as gunicorn has it"


@dataclass(frozen=True)
class Reuse:
    """A gunicorn setting as wasisup offers it: wasisup's help, and what else differs."""

    help: str
    default: Any = _GUNICORN
    validator: Callable[[object], Any] | None = None
    meta: str | None = None

    def adopt(self, setting: Setting) -> None:
        setting.short = setting.desc = self.help
        if self.meta:
            setting.meta = self.meta
        if self.validator:
            setting.validator = self.validator
        if self.default is not _GUNICORN:
            setting.default = self.default
            setting.set(self.default)


# gunicorn's settings that wasisup exposes, in --help order (config-file keys).
REUSED: dict[str, Reuse] = {
    "config": Reuse("a Python config file whose top-level names set options, e.g. "
                    "workers = 4 (each option below names its own)", default=None, meta="FILE"),
    "bind": Reuse("where to listen: HOST:PORT, [IPV6]:PORT or unix:PATH; repeatable; "
                  "$PORT makes the default 0.0.0.0:$PORT", validator=validate_binds),
    "workers": Reuse("worker processes; $WEB_CONCURRENCY sets the default",
                     validator=validate_positive),
    "threads": Reuse("event loops per worker, each a thread running guests (wasm of different "
                     "loops runs in parallel); a waiting request holds none", default=1,
                     validator=validate_positive),
    "timeout": Reuse("a worker silent this long is killed and replaced; 0: never",
                     validator=validate_count, meta="SECONDS"),
    "graceful_timeout": Reuse("time in-flight requests get to finish on TERM, QUIT or HUP",
                              validator=validate_count, meta="SECONDS"),
    "keepalive": Reuse("an idle keep-alive connection is closed after this",
                       validator=validate_count, meta="SECONDS"),
    "max_requests": Reuse("restart a worker after this many requests; 0: never",
                          validator=validate_count),
    "max_requests_jitter": Reuse("plus a random 0..N, so workers do not restart together",
                                 validator=validate_count),
    "backlog": Reuse("pending connections per listening socket", validator=validate_positive),
    "pidfile": Reuse("write the master's pid to this file"),
    "loglevel": Reuse(f"log level: {', '.join(LOG_LEVELS)}", validator=validate_loglevel),
    "accesslog": Reuse("write one line per request to this file (-: stdout)"),
    "errorlog": Reuse("write the log to this file (-: stderr); guest stdout/stderr lines go "
                      "there too"),
    "limit_request_line": Reuse("a longer request line gets a 414", validator=validate_positive,
                                meta="BYTES"),
    "limit_request_fields": Reuse("more header fields get a 431", validator=validate_positive),
    "limit_request_field_size": Reuse("a larger header field gets a 431",
                                      validator=validate_positive, meta="BYTES"),
    "proc_name": Reuse('NAME in the process titles "wasisup: master [NAME]" and '
                       '"wasisup: worker [NAME]"; unset: the file name of the component',
                       meta="NAME"),
    "certfile": Reuse("serve HTTPS with this certificate (PEM; with its chain); reloaded "
                      "when the file changes", meta="FILE"),
    "keyfile": Reuse("the private key of --certfile (PEM), if not in that file", meta="FILE"),
    "ca_certs": Reuse("CA certificates (PEM) that client certificates are checked against",
                      meta="FILE"),
    "cert_reqs": Reuse("client certificates: 0 not asked for, 1 checked if sent, 2 required "
                       "(with --ca-certs)", default=0, validator=validate_cert_reqs, meta="N"),
    "ciphers": Reuse("OpenSSL cipher list for TLS 1.2 (TLS 1.3's suites are OpenSSL's); unset: "
                     "Python's defaults", meta="CIPHERS"),
    "http_protocols": Reuse("protocols served, preferred first: h1, h2 (HTTP/2: chosen by ALPN "
                            "over TLS, by its preface with --http2-cleartext)", default="h2,h1",
                            validator=validate_http_protocols, meta="LIST"),
    "http2_cleartext": Reuse("HTTP/2 without TLS (h2c): off, or prior-knowledge (a connection "
                             "opening with HTTP/2's preface gets HTTP/2, others HTTP/1.1); only "
                             "behind a trusted proxy", validator=validate_h2c, meta="MODE"),
    "http2_max_concurrent_streams": Reuse("HTTP/2 streams a connection may have open at once "
                                          "(at most a loop's share of "
                                          "--max-concurrent-requests)",
                                          validator=validate_positive),
    "http2_initial_window_size": Reuse("HTTP/2 flow-control window of each request body "
                                       "(bytes the client may send ahead of the guest)",
                                       meta="BYTES"),
    "http2_max_frame_size": Reuse("the largest HTTP/2 frame payload a client may send",
                                  meta="BYTES"),
    "http2_max_header_list_size": Reuse("HTTP/2 request headers, decoded, at most (HPACK "
                                        "bombs stop there)", validator=validate_positive,
                                        meta="BYTES"),
    "worker_connections": Reuse("open client connections a worker holds at most; beyond, "
                                "new ones wait in the backlog", validator=validate_positive),
    # Heartbeat files in memory: a /tmp on disk can stall them (gunicorn #1194).
    "worker_tmp_dir": Reuse("where workers keep their heartbeat files (/dev/shm if it exists, "
                            "else the system's temporary directory)", meta="DIR",
                            default="/dev/shm" if os.path.isdir("/dev/shm") else None),
}


# gunicorn's hooks a config file may define (functions; no flag): ssl_context(config,
# default_ssl_context_factory) returns the SSLContext TLS connections get.
HOOKS = ("ssl_context",)


def adopt(settings: dict[str, Setting]) -> None:
    """Make a gunicorn ``Config``'s settings wasisup's: its help, defaults and validators."""
    for name, reuse in REUSED.items():
        reuse.adopt(settings[name])


class Component(Setting):
    name = "component"
    section = SECTION
    meta = "COMPONENT"
    validator = validate_string
    default = None
    desc = """\
        the wasi:http/proxy component to serve: a .wasm (compiled once, cached) or a .cwasm

        A .wasm is compiled once, in a child process, into a cache keyed by its hash, the
        wasmtime version and the engine settings; a .cwasm comes from `wasisup compile`.
        """


class GuestEnv(Setting):
    name = "guest_env"
    section = SECTION
    cli = ["--env"]
    meta = "KEY=VALUE"
    action = "append"
    validator = validate_env
    default = []
    desc = """\
        an environment variable for the guest; repeatable (a dict in a config file)
        """


class MaxInstanceReuse(Setting):
    name = "max_instance_reuse"
    section = SECTION
    cli = ["--max-instance-reuse"]
    meta = "INT"
    validator = validate_positive
    default = 1
    desc = """\
        requests one guest instance serves before a fresh one replaces it

        1 (the default) gives every request a fresh instance, like `wasmtime serve`.
        """


class RequestTimeout(Setting):
    name = "request_timeout"
    section = SECTION
    cli = ["--request-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 0
    desc = """\
        the guest's deadline per request, past which it gets a 504; 0: none
        """


class MaxMemory(Setting):
    name = "max_memory"
    section = SECTION
    cli = ["--max-memory"]
    meta = "BYTES"
    validator = validate_size
    default = 0
    desc = """\
        linear memory a guest instance may grow to (e.g. 256M), past which a 500; 0: unlimited
        """


class LimitRequestBody(Setting):
    name = "limit_request_body"
    section = SECTION
    cli = ["--limit-request-body"]
    meta = "BYTES"
    validator = validate_size
    default = 0
    desc = """\
        a larger request body gets a 413 (e.g. 10M); 0: unlimited
        """


class AllowOutbound(Setting):
    name = "allow_outbound"
    section = SECTION
    cli = ["--allow-outbound"]
    meta = "PATTERN"
    action = "append"
    validator = validate_patterns
    default = []
    desc = """\
        a host the guest may send requests to: HOST or HOST:PORT, * for one label; repeatable; unset: any (with a warning)

        A ``*`` stands for one whole label: ``*.example.com``, ``10.0.0.*``; an IPv6 address
        goes in brackets, ``[::1]:8080``. Requests to any other host (or port) fail with
        HTTP-request-denied. The host a request connects to is what is checked: IPv4 in any
        spelling is compared as a dotted quad. Without this option guests may reach any host,
        loopback services included; the master logs a warning at startup.
        """


class MetricsBind(Setting):
    name = "metrics_bind"
    section = SECTION
    cli = ["--metrics-bind"]
    meta = "HOST:PORT"
    validator = validate_host_port
    default = None
    desc = """\
        where the master serves Prometheus metrics (/metrics); unset: off
        """


class TraceContext(Setting):
    name = "trace_context"
    section = SECTION
    cli = ["--no-trace-context"]
    validator = validate_bool
    action = "store_false"
    default = True
    desc = """\
        leave W3C trace context (traceparent) to the guest: no spans, headers passed as it sets them

        By default wasisup takes part in each request's trace: it reads the inbound
        ``traceparent`` (or starts a trace), writes the trace id in the access log, and gives
        each outbound request a ``traceparent`` naming a span of its own. Spans are exported
        when OTEL_EXPORTER_OTLP_ENDPOINT is set and ``wasisup[otel]`` is installed.
        """


class HeaderTimeout(Setting):
    name = "header_timeout"
    section = SECTION
    cli = ["--header-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 20
    desc = """\
        a request head must arrive whole within this, from its first byte; else 408

        Heads are read by the worker's event loop, so a slow client holds a connection slot
        (see --worker-connections), nothing more.
        """


class MinDataRate(Setting):
    name = "min_data_rate"
    section = SECTION
    cli = ["--min-data-rate"]
    meta = "BYTES_PER_SECOND"
    validator = validate_seconds
    default = 240
    desc = """\
        the slowest a client may send a body or read a response while we wait on it; 0: any

        Measured over --data-rate-grace: a client must move rate x grace bytes within every
        such window the server spends waiting on it. A slower body gets a 408; a slower reader
        is disconnected (Kestrel's defaults: 240 bytes/s after 5 s).
        """


class DataRateGrace(Setting):
    name = "data_rate_grace"
    section = SECTION
    cli = ["--data-rate-grace"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 5
    desc = """\
        the window over which --min-data-rate is measured
        """


class MaxConcurrentRequests(Setting):
    name = "max_concurrent_requests"
    section = SECTION
    cli = ["--max-concurrent-requests"]
    meta = "INT"
    validator = validate_positive
    default = 1000
    desc = """\
        requests a worker holds in flight at once; more wait their turn, in order

        A request in flight has a guest instance (its memory: ~3 MB for the reference guest)
        and a suspended call; one waiting its turn has only its connection. The instance pool
        is sized for this many, so a full pool never fails a request (wasmtime serve's
        --max-concurrent-requests, per worker here).
        """


class ComputeTimeout(Setting):
    name = "compute_timeout"
    section = SECTION
    cli = ["--compute-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 0
    desc = """\
        a guest running wasm this long without waiting for I/O is stopped (504); 0: --timeout

        A guest that mostly waits (a slow upstream, a long download) is not limited by this;
        --request-timeout bounds a whole request.
        """
