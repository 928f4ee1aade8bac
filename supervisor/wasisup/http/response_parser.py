"""An upstream's HTTP/1.1 response, read by llhttp (through httptools) into plain data.

llhttp is the parser Node.js uses, in C: it reads a response head for a fraction of the
Python h11 runs (README, Performance).

Interim (1xx) responses are skipped, except a ``101``: like wasmtime, the guest gets it as the
answer (with no body; the connection is not reused). The caller decides how the body is
delimited (it knows whether it asked with HEAD) and may stop feeding once the head is in, to
read a known length straight from the socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import httptools

# An upstream head bigger than this is refused (hyper, wasmtime's client, allows ~400 KiB).
MAX_HEAD = 256 * 1024
# A head with more fields is refused, as hyper refuses it.
MAX_FIELDS = 100


class UpstreamProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


@dataclass
class UpstreamHead:
    status: int
    http_version: str  # "1.0" or "1.1"
    fields: list[tuple[bytes, bytes]]


class ResponseParser:
    """Feed it the upstream's bytes; it collects the final response's head, the body bytes
    parsed so far (``body``, for the caller to take), the trailers and the end."""

    def __init__(self) -> None:
        self.head: Optional[UpstreamHead] = None
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.extra = False  # bytes came after the response: the connection is not reusable
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._refused = ""  # why a complete head is not taken
        self._parser = httptools.HttpResponseParser(self)
        # As hyper (wasmtime's client) reads a response: lines may end in a bare LF, and a
        # Transfer-Encoding overrides a Content-Length beside it.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True,
                                              lenient_chunked_length=True)

    def feed(self, data: bytes) -> None:
        """Parse ``data``; UpstreamProtocolError if it breaks the response (bytes that break
        only what comes after a complete response set ``extra`` instead)."""
        if self.head is None:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # after a 101: what follows is another protocol
            self.complete = self.extra = True
        except httptools.HttpParserError as exc:
            if not self.complete:
                raise UpstreamProtocolError(self._refused or str(exc) or "malformed") from None
            self.extra = True
        if self._refused:
            raise UpstreamProtocolError(self._refused)
        if self.head is None and self._head_bytes > MAX_HEAD:
            raise UpstreamProtocolError(f"a response head of more than {MAX_HEAD} bytes")

    # -- llhttp's callbacks
    def on_message_begin(self) -> None:
        if self.head is not None:
            self.extra = True
        self._fields = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is None:
            self._fields.append((name, value))
        elif not self.complete and not self.extra:
            self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if self.head is not None or status < 200 and status != 101:
            return
        if len(self._fields) > MAX_FIELDS:
            self._refused = f"a response head of more than {MAX_FIELDS} fields"
        else:
            self.head = UpstreamHead(status, self._parser.get_http_version(), self._fields)

    def on_body(self, data: bytes) -> None:
        if self.head is not None and not self.complete and not self.extra:
            self.body += data

    def on_message_complete(self) -> None:
        if self.head is not None and not self.extra:
            self.complete = True
