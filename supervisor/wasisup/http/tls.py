"""TLS on the listeners: the context new connections are wrapped in, reloaded when its files
change.

The context is gunicorn's (``--certfile``, ``--keyfile``, ``--ca-certs``, ``--cert-reqs``,
``--ciphers``, and the config file's ``ssl_context`` hook), TLS 1.2 at least. The master loads
it at start and on HUP (a pair that does not load then refuses the reload), workers inherit it,
and each looks at the files' identity every few seconds: when one changed (a Kubernetes Secret update swaps the symlinks a
mount holds), new connections get the new context and open ones keep theirs. A new pair that
does not load (a key that does not match, a file half written) leaves the old context in place,
and the log says why. The handshake itself runs in the worker's event loop (``server``).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from typing import Any, Optional

from gunicorn.sock import ssl_context

from ..wasi.io import READABLE, WRITABLE

log = logging.getLogger("wasisup.tls")

CHECK_INTERVAL = 5.0  # seconds between looks at the certificate files
HANDSHAKE_RECORD = 0x16  # the first byte of a TLS ClientHello


class TlsContext:
    """The SSLContext new connections get (``current``), for a gunicorn config.

    The master makes it, so a worker inherits one that loaded even if the files broke since;
    ValueError (one line) if the files do not load now.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.metrics: Any = None  # a worker's wasisup.metrics.Metrics
        self._paths = [path for path in (cfg.certfile, cfg.keyfile, cfg.ca_certs) if path]
        self._stamps = self._identity()
        try:
            self.current = ssl_context(cfg)
        except Exception as exc:  # (the files, or the config file's ssl_context hook)
            raise ValueError(f"TLS: {describe(exc)} (--certfile {cfg.certfile}, --keyfile "
                             f"{cfg.keyfile}"
                             f"{', --ca-certs ' + cfg.ca_certs if cfg.ca_certs else ''})") from None
        self._checked = time.monotonic()

    def _identity(self) -> list[Optional[tuple[int, int, int]]]:
        """What says a file changed: its inode, size and mtime (None while it is missing)."""
        found = []
        for path in self._paths:
            try:
                stat = os.stat(path)
                found.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                found.append(None)
        return found

    def check(self) -> None:
        """Reload the context if its files changed since they were last loaded (at most every
        CHECK_INTERVAL)."""
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        stamps = self._identity()
        if stamps == self._stamps:
            return
        self._stamps = stamps  # (a pair that fails is tried again when a file changes again)
        try:
            context = ssl_context(self.cfg)
        except Exception as exc:  # (the files, or the config file's ssl_context hook)
            log.error("the changed certificate files do not load, new connections keep the "
                      "previous certificate: %s", describe(exc))
            self._count("failed")
            return
        self.current = context
        log.info("certificate files changed: new connections get the new certificate")
        self._count("ok")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(outcome).inc()

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """A server-side TLS socket over ``sock``, its handshake left to the event loop
        (``Connection.handshake``)."""
        return self.current.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def describe(exc: BaseException) -> str:
    """One line for a TLS or file error."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")  # e.g. "key values mismatch"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def handshake_step(sock: ssl.SSLSocket) -> int:
    """Advance a non-blocking TLS handshake (either side): 0 once it is done, else what the
    socket must become first (READABLE or WRITABLE). ssl.SSLError or OSError if it failed."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return READABLE
    except ssl.SSLWantWriteError:
        return WRITABLE
    return 0


def looks_like_plain_http(sock: socket.socket) -> bool:
    """Did the client start with something other than a TLS handshake (plain HTTP to an
    HTTPS port)? False if nothing came yet."""
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError, OSError):
        return False
    return bool(first) and first[0] != HANDSHAKE_RECORD
