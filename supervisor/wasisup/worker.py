"""The gunicorn worker class: loads the .cwasm (never compiles), serves HTTP until told to stop.

Signals (from the master): TERM -> stop accepting, finish in-flight requests, close idle
keep-alive connections, exit; QUIT/INT -> exit now. The heartbeat comes from the accept loop,
so it keeps beating while requests run in the thread pool.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from gunicorn.workers.base import Worker
from setproctitle import setproctitle

from . import metrics
from .http.client import OutboundClient
from .http.handler import GuestHandler
from .http.outbound_policy import OutboundPolicy
from .http.server import Limits, Server
from .runtime import Runtime


class WasmWorker(Worker):
    """A worker process: one Runtime, one HTTP server on the inherited sockets."""

    server: Optional[Server] = None

    def init_process(self) -> None:
        setproctitle(f"wasisup: worker [{self.app.component_name}]")
        share_logging(self.log)
        super().init_process()

    def load_wsgi(self) -> None:
        """There is no WSGI app: the worker's application is the compiled component."""

    def run(self) -> None:
        cfg = self.cfg
        stats = metrics.get()
        prepared = self.app.prepared
        stats.component.labels(self.app.component_name, prepared.sha256).set(1)
        stats.compile_seconds.set(prepared.compile_seconds)
        outbound = OutboundClient(OutboundPolicy(cfg.allow_outbound))
        runtime = Runtime(Path(self.app.cwasm), cfg.guest_env, outbound,
                          max_instance_reuse=cfg.max_instance_reuse,
                          request_timeout=cfg.request_timeout, max_memory=cfg.max_memory,
                          metrics=stats)
        limits = Limits(request_line=cfg.limit_request_line, request_fields=cfg.limit_request_fields,
                        request_field_size=cfg.limit_request_field_size,
                        request_body=cfg.limit_request_body, keep_alive=cfg.keepalive)
        handler = GuestHandler(runtime, limits.request_body, metrics=stats,
                               on_request=self._count_request)
        self.server = Server([s.sock for s in self.sockets], handler, threads=cfg.threads,
                             limits=limits, on_tick=self._tick)
        self.log.info("Worker ready: %s, %d threads", self.app.component_name, cfg.threads)
        self.server.serve(graceful_timeout=cfg.graceful_timeout)
        runtime.close()
        outbound.close()

    def _tick(self) -> None:
        self.notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False
        if not self.alive:  # also a stop that came before the server existed
            self._retire()

    def _count_request(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self._retire()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """TERM: graceful stop."""
        self._retire()

    def _retire(self) -> None:
        """Stop taking requests; the server finishes those in flight, then ``run`` returns."""
        self.alive = False
        if self.server is not None:
            self.server.stop()


def share_logging(glog: Any) -> None:
    """Send wasisup's loggers where gunicorn's error log goes, at its level."""
    target = logging.getLogger("wasisup")
    target.handlers = list(glog.error_log.handlers)
    target.setLevel(glog.error_log.level)
    target.propagate = False
