"""What a request head must be before a guest sees it: RFC 9112's rules on top of h11 (no I/O).

h11 parses; it is lenient where a server in front of a guest must not be (it folds
``Content-Length: 5,5`` into 5, accepts any ``HTTP/x.y``, any request-target, controls in field
values, obs-fold) and it answers 501 where RFC 9112 asks for a 400 (chunked applied twice).
``check_head`` takes the ``h11.Request`` and the raw head bytes and raises ``BadRequest`` with
the status RFC 9112 gives, or returns the ``RequestHead`` a guest call serves: the fields,
what the guest sees as path-with-query and authority, and whether the connection may stay open.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import h11

CONTENT_LENGTH_MAX = 2**63 - 1  # what fits a signed 64-bit offset (Go's net/http bound)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_DIGITS = re.compile(rb"[0-9]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB; DEL
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?\Z")
_ABSOLUTE = re.compile(
    rb"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?]*)(?P<rest>.*)\Z", re.S)
_AUTHORITY_FORM = re.compile(rb"[^/?@]+:[0-9]+\Z")

# Fields a sender must not put in trailers (RFC 9110 6.5.1: framing, routing, request
# modifiers, authentication, content format, connection), as Go's net/http lists them.
NOT_IN_TRAILERS = frozenset({
    b"authorization", b"cache-control", b"connection", b"content-encoding", b"content-length",
    b"content-range", b"content-type", b"expect", b"host", b"keep-alive", b"max-forwards",
    b"pragma", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"range",
    b"realm", b"te", b"trailer", b"transfer-encoding", b"www-authenticate",
})


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send and how slowly (gunicorn's names and defaults for the
    request, Kestrel's minimum data rate for slow clients)."""

    request_line: int = 4094
    request_fields: int = 100
    request_field_size: int = 8190
    request_body: int = 0  # 0: unlimited
    keep_alive: float = 2.0  # idle between requests
    header_timeout: float = 20.0  # for a whole request head, from its first byte
    min_data_rate: float = 240.0  # bytes/s a client must move while we wait on it (0: off)
    data_rate_grace: float = 5.0

    @property
    def max_head(self) -> int:
        """The largest head these limits allow (h11's bound on an incomplete event)."""
        return self.request_line + self.request_fields * (self.request_field_size + 2) + 4


@dataclass(frozen=True)
class RequestHead:
    """A checked request head, as plain data."""

    method: bytes
    target: bytes
    http_version: bytes
    fields: list[tuple[bytes, bytes]]  # names in lower case
    path_with_query: Optional[str]  # None for CONNECT
    authority: Optional[str]
    keep_alive: bool  # HTTP/1.1 without `Connection: close` (as h11, no 1.0 keep-alive)
    received: float = field(default_factory=time.monotonic, compare=False)  # when it was whole


class BadRequest(Exception):
    """The client sent something we refuse; ``status`` says how."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def skip_empty_lines(data: bytes) -> bytes:
    """RFC 9112 2.2: empty lines before a request line are ignored (a CR alone may be the
    first half of a CRLF split between two reads)."""
    return data.lstrip(b"\r\n")


def header_fields(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's fields as (lower-case name, value) pairs. (Iterating h11's Headers goes
    through the Sequence ABC one item at a time; this is one list.)"""
    return [(name.lower(), value) for name, value in request.headers.raw_items()]


def host_field(fields: list[tuple[bytes, bytes]]) -> Optional[bytes]:
    """The request's Host field, if it has one."""
    return next((value for name, value in fields if name == b"host"), None)


def check_head(request: h11.Request, head: bytes, limits: Limits) -> RequestHead:
    """The head h11 parsed from the bytes ``head``, if it may be served; else BadRequest."""
    if not request.http_version.startswith(b"1."):
        raise BadRequest(505, f"HTTP/{request.http_version.decode()} is not supported; "
                              "use HTTP/1.1")
    if _BARE_LF.search(head):
        raise BadRequest(400, "bare LF in the request head; lines end with CRLF")
    if len(request.method) + len(request.target) + 10 > limits.request_line:
        raise BadRequest(414, "request line too long")
    fields = header_fields(request)
    lines = head.split(b"\r\n")[1:]
    if any(line[:1] in (b" ", b"\t") for line in lines):
        raise BadRequest(400, "a header line starts with whitespace (obs-fold)")
    check_fields(fields, limits)
    names = [name for name, _ in fields]
    if b"transfer-encoding" in names and b"content-length" in names:
        raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    check_content_length(_field_values(lines, b"content-length"), limits)
    host = host_field(fields)
    check_authority(host)
    path_with_query, authority = request_target(request, host)
    keep_alive = request.http_version == b"1.1" and not any(
        name == b"connection" and b"close" in value.lower() for name, value in fields)
    return RequestHead(request.method, request.target, request.http_version, fields,
                       path_with_query, authority, keep_alive)


def check_fields(fields: list[tuple[bytes, bytes]], limits: Limits) -> None:
    """The request's header fields: how many, how large, no control characters."""
    if len(fields) > limits.request_fields:
        raise BadRequest(431, "too many header fields")
    for name, value in fields:
        if len(name) + len(value) + 2 > limits.request_field_size:
            raise BadRequest(431, f"header field {name.decode()} too large")
        if _BAD_VALUE.search(value):
            raise BadRequest(400, f"control character in header field {name.decode()}")


def check_authority(host: Optional[bytes]) -> None:
    """The request's Host (or HTTP/2 :authority), if it has one, is a host[:port]."""
    if host is not None and not _HOST.match(host):
        raise BadRequest(400, "Host is not a valid host[:port]")


def check_content_length(values: list[bytes], limits: Limits) -> None:
    """The Content-Length values of a request: one decimal number, within the body limit."""
    if not values:
        return
    if len(values) > 1 or not _DIGITS.match(values[0]):
        raise BadRequest(400, "Content-Length must be one decimal number")
    length = int(values[0])
    if length > CONTENT_LENGTH_MAX:
        raise BadRequest(400, "Content-Length too large")
    if limits.request_body and length > limits.request_body:
        raise BadRequest(413, "request body too large")


def protocol_error(exc: h11.RemoteProtocolError, received: bytes) -> BadRequest:
    """The answer to a request h11 could not parse, given the bytes it had.

    h11 answers 501 to every Transfer-Encoding but a lone ``chunked``; RFC 9112 6.3 makes it a
    400 when chunked is missing, not last or applied twice (the body's end is unknowable), and
    leaves 501 for a coding before chunked that we do not implement.
    """
    if exc.error_status_hint == 501:
        head = received.split(b"\r\n\r\n", 1)[0]
        codings = [coding.split(b";", 1)[0].strip().lower()
                   for value in _field_values(head.split(b"\r\n")[1:], b"transfer-encoding")
                   for coding in value.split(b",") if coding.strip()]
        if codings[-1:] == [b"chunked"] and codings.count(b"chunked") == 1:
            return BadRequest(501, "only the chunked transfer coding is supported")
        return BadRequest(400, "Transfer-Encoding must end with chunked, applied once")
    return BadRequest(exc.error_status_hint, str(exc))


def request_target(request: h11.Request,
                   host: Optional[bytes]) -> tuple[Optional[str], Optional[str]]:
    """(path-with-query, authority) the guest sees, from the request-target's form (RFC 9112
    3.2): origin-form with Host; absolute-form, whose authority wins over Host; ``*`` only for
    OPTIONS; authority-form only for CONNECT. ``host``: the request's Host field, if any."""
    target = request.target
    authority = host.decode("latin-1") if host is not None else None
    if request.method == b"CONNECT":
        if not _AUTHORITY_FORM.match(target):
            raise BadRequest(400, "CONNECT takes host:port as its target")
        return None, target.decode("ascii")
    if target.startswith(b"/"):
        return target.decode("ascii"), authority
    if target == b"*":
        if request.method != b"OPTIONS":
            raise BadRequest(400, "the * target is for OPTIONS only")
        return "*", authority
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        raise BadRequest(400, "the request target must start with / (or be an absolute URI)")
    if absolute["scheme"].lower() not in (b"http", b"https"):
        raise BadRequest(400, "an absolute request target must be http or https")
    if not absolute["authority"] or b"@" in absolute["authority"]:
        raise BadRequest(400, "an absolute request target needs a host and no userinfo")
    rest = absolute["rest"]
    path = rest if rest.startswith(b"/") else b"/" + rest
    return path.decode("ascii"), absolute["authority"].decode("ascii")


def clean_trailers(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailer fields without those that may not be trailers: dropped, not refused, since by
    the time trailers arrive the guest has the head and the body and may have answered."""
    return [(name, value) for name, value in fields if name.lower() not in NOT_IN_TRAILERS]


def _field_values(lines: list[bytes], name: bytes) -> list[bytes]:
    """The values of every ``name`` field line in raw header lines (names any case)."""
    values = []
    for line in lines:
        field, colon, value = line.partition(b":")
        if colon and field.lower() == name:
            values.append(value.strip(b" \t"))
    return values
