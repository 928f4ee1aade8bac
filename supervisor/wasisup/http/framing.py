"""HTTP/1.1 framing written by hand, for the responses we serve and the requests guests send.

Every field was validated when the guest set it (``wasisup.wasi.http``), so nothing here checks
again (h11's send path would, a second time).
"""

from __future__ import annotations

from typing import Any, Iterable


def field_lines(fields: Iterable[tuple[str, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name.encode(), value) for name, value in fields)


def chunk(data: bytes | memoryview) -> list[Any]:
    """One chunk of a chunked body, as parts for a gathered write."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


def last_chunk(trailers: Iterable[tuple[str, bytes]]) -> bytes:
    return b"0\r\n" + field_lines(trailers) + b"\r\n"
