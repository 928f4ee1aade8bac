"""Where a guest's outbound request goes, and whether it may go there (no I/O here).

A guest names its upstream with a scheme and an authority (``wasi:http`` ``outgoing-request``).
``parse_target`` reduces them to the exact host and port the connection will go to: names
lower-cased, every IPv4 spelling the resolver accepts (``127.1``, ``0x7f.0.0.1``) written as a
dotted quad, IPv4-mapped IPv6 as the IPv4 address it reaches. The client connects to exactly
that host and port, and ``OutboundPolicy`` checks exactly that: ``--allow-outbound`` patterns
match a host label by label (a ``*`` is one whole label, so it never crosses a dot, a colon or a
backslash), and a port only if the pattern names one. No URL is built and parsed again between
the check and the connect.

What a guest may set is stricter than wasmtime-wasi-http (which takes ``http``'s URI grammar):
an authority is ``host[:port]`` with no userinfo, a path-with-query starts with ``/`` (or is
``*``, for OPTIONS) and holds printable ASCII only, without ``#`` or ``\\``. Refusals carry the
wasi:http ``error-code`` the guest gets, as wasmtime names them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Iterable, Optional

DEFAULT_PORTS = {"http": 80, "https": 443}
URI_INVALID = "HTTP-request-URI-invalid"
_LABEL = re.compile(r"[a-z0-9_-]+\Z")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)\Z")  # what inet_aton reads as a number
_PORT = re.compile(r"[0-9]{1,5}\Z")
# Printable ASCII but `#` (a fragment has no place on the wire) and `\` (a separator to some);
# or the asterisk-form of OPTIONS.
_PATH_WITH_QUERY = re.compile(r"(/[\x21\x22\x24-\x5b\x5d-\x7e]*|\*)\Z")


class Refused(Exception):
    """An outbound request that must not be sent; ``error_code`` is what the guest gets."""

    def __init__(self, error_code: str, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code


@dataclass(frozen=True)
class Target:
    """Where a request goes: ``host`` is canonical (an IPv6 address without brackets)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    authority: str  # as the guest set it: the Host header

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def origin(self) -> tuple[str, str, int]:
        """Where the connection goes, however the guest spelled the authority (pools' key)."""
        return self.scheme, self.host, self.port


@functools.lru_cache(maxsize=1024)
def parse_authority(authority: str) -> tuple[str, Optional[int]]:
    """``host[:port]`` -> (canonical host, port or None); raises Refused if malformed.
    (Cached: a guest names the same few upstreams on every request, twice each.)"""
    host, port = _split_port(authority)
    return canonical_host(host), port


def check_path_with_query(path_with_query: str) -> None:
    """Raise Refused unless ``path_with_query`` is origin-form (``/...``) or ``*``."""
    if not _PATH_WITH_QUERY.match(path_with_query):
        raise Refused(URI_INVALID, f"path-with-query {path_with_query!r} is not * or "
                                   "/PATH[?QUERY] in printable ASCII without # or \\")


def parse_target(scheme: str, authority: Optional[str]) -> Target:
    """The host and port a request with this scheme and authority connects to."""
    if scheme not in DEFAULT_PORTS:
        raise Refused("HTTP-protocol-error", f"unsupported scheme {scheme!r}")
    if not authority:
        raise Refused(URI_INVALID, "the request has no authority")
    host, port = parse_authority(authority)
    return Target(scheme, host, port or DEFAULT_PORTS[scheme], authority)


def canonical_host(host: str) -> str:
    """The name or address a connection to ``host`` reaches, in one spelling."""
    if not host.isascii():
        raise Refused(URI_INVALID, f"host {host!r} is not ASCII")
    if host.startswith("[") and host.endswith("]"):
        return _ipv6(host[1:-1])
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name  # the root label
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise Refused(URI_INVALID, f"host {host!r} is not a name or an address")
    if _NUMERIC_LABEL.match(labels[-1]):  # the resolver reads the whole host as IPv4
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            raise Refused(URI_INVALID, f"host {host!r} is not an IPv4 address") from None
    return name


def _ipv6(text: str) -> str:
    if "%" in text:  # a zone id names an interface, not a host
        raise Refused(URI_INVALID, f"IPv6 address [{text}] has a zone id")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise Refused(URI_INVALID, f"[{text}] is not an IPv6 address") from None
    return str(address.ipv4_mapped or address)


def _split_port(authority: str) -> tuple[str, Optional[int]]:
    """(host, port): the port follows the last ``:`` outside brackets, 1-65535 in digits."""
    if authority.startswith("["):
        end = authority.find("]") + 1
        if not end:
            raise Refused(URI_INVALID, f"authority {authority!r} has an unclosed [")
        host, rest = authority[:end], authority[end:]
        if rest and not rest.startswith(":"):
            raise Refused(URI_INVALID, f"authority {authority!r} has text after ]")
        port = rest[1:] if rest else None
    else:
        host, colon, port = authority.partition(":")
        port = port if colon else None
    if port is None:
        return host, None
    if not _PORT.match(port) or not 0 < int(port) < 65536:
        raise Refused(URI_INVALID, f"authority {authority!r} has a bad port")
    return host, int(port)


@dataclass(frozen=True)
class HostPattern:
    """One ``--allow-outbound`` entry: a host whose labels may be ``*``, and maybe a port."""

    host: str  # canonical, or labels with "*"; an IPv6 address without brackets
    port: Optional[int]

    @classmethod
    def parse(cls, text: str) -> "HostPattern":
        """Raises ValueError naming what is wrong (for a startup error)."""
        if "://" in text or "/" in text:
            raise ValueError(f"{text!r} is a URL: a pattern is HOST or HOST:PORT "
                             "(e.g. example.com or example.com:443)")
        try:
            host, port = _split_port(text)
            if "*" not in host:
                return cls(canonical_host(host), port)
        except Refused as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        labels = host.lower().split(".")
        if not all(label == "*" or _LABEL.match(label) for label in labels):
            raise ValueError(f"{text!r}: a * stands for one whole label, "
                             "as in *.example.com or 10.0.0.*")
        return cls(".".join(labels), port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if ":" in host or ":" in self.host:  # IPv6: the same address, no wildcards
            return host == self.host
        labels, wanted = host.split("."), self.host.split(".")
        return len(labels) == len(wanted) and all(
            want == "*" or want == label for label, want in zip(labels, wanted))


class OutboundPolicy:
    """Which targets guests may send to: any, when no pattern is given."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(HostPattern.parse(text) for text in patterns)

    @property
    def unrestricted(self) -> bool:
        return not self.patterns

    def check(self, target: Target) -> None:
        """Raise Refused (HTTP-request-denied) unless a pattern allows ``target``."""
        if self.patterns and not any(p.matches(target.host, target.port) for p in self.patterns):
            raise Refused("HTTP-request-denied",
                          f"{target.host}:{target.port} is not in --allow-outbound")
