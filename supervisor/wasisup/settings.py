"""Every wasisup option, declared once: gunicorn ``Setting`` classes (flag, config key, default,
validator, help).

gunicorn's own settings are reused where they mean the same thing (``GUNICORN_SETTINGS``);
the classes below add what a wasm host needs. The command line exposes exactly these.
"""

from __future__ import annotations

import re

from gunicorn.config import Setting, validate_pos_int, validate_string, validate_list_string

from .http.outbound_policy import HostPattern

SECTION = "wasisup"

# gunicorn's settings that wasisup exposes unchanged (config-file keys).
GUNICORN_SETTINGS = (
    "config", "bind", "workers", "threads", "timeout", "graceful_timeout", "keepalive",
    "max_requests", "max_requests_jitter", "backlog", "pidfile", "loglevel", "accesslog",
    "errorlog", "limit_request_line", "limit_request_fields", "limit_request_field_size",
    "proc_name", "worker_connections", "worker_tmp_dir",
)


def validate_size(value: object) -> int:
    """A byte count: an integer, optionally with a K/M/G (binary) suffix; 0 means no limit."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", str(value))
        if not match:
            raise ValueError(f"not a size: {value!r} (use bytes, or e.g. 64M)")
        number = int(match.group(1)) * 1024 ** " KMG".index((match.group(2) or " ").upper())
    if number < 0:
        raise ValueError(f"size must be positive: {value!r}")
    return number


def validate_seconds(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"not a number of seconds: {value!r}") from None
    if seconds < 0:
        raise ValueError(f"seconds must be positive: {value!r}")
    return seconds


def validate_positive(value: object) -> int:
    number = validate_pos_int(value)
    if number < 1:
        raise ValueError(f"must be at least 1: {value!r}")
    return number


def validate_env(value: object) -> list[tuple[str, str]]:
    """KEY=VALUE strings (or a dict, in a config file) -> the guest's environment."""
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    pairs = []
    for item in validate_list_string(value):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"guest environment entry {item!r} is not KEY=VALUE")
        pairs.append((key, val))
    return pairs


def validate_host_port(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = validate_string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def validate_patterns(value: object) -> list[str]:
    """``--allow-outbound`` entries, each checked now so a typo is a startup error."""
    patterns = validate_list_string(value)
    for pattern in patterns:
        HostPattern.parse(pattern)
    return patterns


class Component(Setting):
    name = "component"
    section = SECTION
    meta = "COMPONENT"
    validator = validate_string
    default = None
    desc = """\
        The wasi:http/proxy component to serve: a .wasm, or a .cwasm from ``wasisup compile``.

        A .wasm is compiled once, in a child process, into a cache keyed by its hash, the
        wasmtime version and the engine settings.
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
        Set an environment variable in the guest (repeatable).
        """


class MaxInstanceReuse(Setting):
    name = "max_instance_reuse"
    section = SECTION
    cli = ["--max-instance-reuse"]
    meta = "INT"
    type = int
    validator = validate_positive
    default = 1
    desc = """\
        Requests one guest instance serves before it is replaced by a fresh one.

        1 (the default) gives every request a fresh instance, like ``wasmtime serve``.
        """


class RequestTimeout(Setting):
    name = "request_timeout"
    section = SECTION
    cli = ["--request-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 0
    desc = """\
        The guest's deadline per request (0: none); past it the request gets a 504.
        """


class MaxMemory(Setting):
    name = "max_memory"
    section = SECTION
    cli = ["--max-memory"]
    meta = "BYTES"
    validator = validate_size
    default = 0
    desc = """\
        Linear memory a guest instance may grow to (e.g. 256M; 0: unlimited).
        """


class LimitRequestBody(Setting):
    name = "limit_request_body"
    section = SECTION
    cli = ["--limit-request-body"]
    meta = "BYTES"
    validator = validate_size
    default = 0
    desc = """\
        The largest request body accepted (0: unlimited); larger gets a 413.
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
        A host the guest may send requests to: HOST or HOST:PORT (repeatable).

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
        Where the master serves Prometheus metrics (/metrics); off when unset.
        """


class HeaderTimeout(Setting):
    name = "header_timeout"
    section = SECTION
    cli = ["--header-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 20
    desc = """\
        Time a client has to send a whole request head, from its first byte (or from
        connecting); past it the request gets a 408 and the connection is closed.

        Heads are read by the worker's event loop, so a slow client holds a connection slot
        (see --worker-connections), never a request thread.
        """


class MinDataRate(Setting):
    name = "min_data_rate"
    section = SECTION
    cli = ["--min-data-rate"]
    meta = "BYTES_PER_SECOND"
    validator = validate_seconds
    default = 240
    desc = """\
        The slowest a client may send a request body or read a response while the server
        waits on it, after --data-rate-grace (0: no minimum). Slower clients get a 408 (body)
        or are disconnected (response).
        """


class DataRateGrace(Setting):
    name = "data_rate_grace"
    section = SECTION
    cli = ["--data-rate-grace"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 5
    desc = """\
        The window over which --min-data-rate is measured: a client must move
        rate x grace bytes within every such window the server spends waiting on it.
        """


class ComputeTimeout(Setting):
    name = "compute_timeout"
    section = SECTION
    cli = ["--compute-timeout"]
    meta = "SECONDS"
    validator = validate_seconds
    default = 0
    desc = """\
        The longest a guest may run wasm without waiting for I/O (0: the worker --timeout);
        past it the request gets a 504. A guest that mostly waits (a slow upstream, a long
        download) is not limited by this; see --request-timeout for that.
        """
