"""The gunicorn worker class: loads the .cwasm (never compiles), serves HTTP until told to stop.

Signals (from the master): TERM -> stop accepting, finish in-flight requests, close idle
keep-alive connections, exit; QUIT/INT -> exit now. The heartbeat comes from the first event
loop (the main thread's), which a computing guest gives back every epoch tick.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from gunicorn.workers.base import Worker
from setproctitle import setproctitle

from . import metrics, tracing
from .http.client import OutboundClient
from .http.handler import GuestHandler
from .http.http2 import Http2Settings
from .http.outbound_policy import OutboundPolicy
from .http.pool import Pool
from .http.request_head import Limits
from .http.server import Server
from .http.tls import TlsContext
from .compile import CompileError
from .runtime import Runtime
from .wasi.linker import LinkError


PR_SET_PDEATHSIG = 1
# How long past --compute-timeout a guest may run without yielding before its loop counts as
# stuck (the epoch interrupt should have stopped it): then the heartbeat stops.
STUCK_GRACE = 5.0


class WasmWorker(Worker):
    """A worker process: one Runtime, one HTTP server on the inherited sockets."""

    server: Optional[Server] = None
    tls: Optional[TlsContext] = None

    def init_process(self) -> None:
        setproctitle(f"wasisup: worker [{self.app.component_name}]")
        share_logging(self.log)
        die_with_parent()
        super().init_process()

    def init_signals(self) -> None:
        """gunicorn's handlers, then the signals the master held pending across the fork."""
        super().init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def load_wsgi(self) -> None:
        """There is no WSGI app: the worker's application is the compiled component."""

    def run(self) -> None:
        cfg = self.cfg
        stats = metrics.get()
        prepared = self.app.prepared
        stats.component.labels(self.app.component_name, prepared.sha256).set(1)
        stats.compile_seconds.set(prepared.compile_seconds)
        exporter = tracing.exporter_from_env() if cfg.trace_context else None
        outbound = OutboundClient(OutboundPolicy(cfg.allow_outbound),
                                  Pool(idle_per_origin=cfg.max_concurrent_requests,
                                       metrics=stats), metrics=stats, exporter=exporter)
        self.compute_timeout = cfg.compute_timeout or cfg.timeout
        try:
            runtime = Runtime(Path(self.app.cwasm), cfg.guest_env, outbound,
                              max_instance_reuse=cfg.max_instance_reuse,
                              request_timeout=cfg.request_timeout, max_memory=cfg.max_memory,
                              compute_timeout=self.compute_timeout,
                              instances=cfg.max_concurrent_requests + 2 * cfg.threads,
                              metrics=stats)
        except (CompileError, LinkError) as exc:
            # The master checked the component; if it still fails here, respawning won't help.
            self.log.error("cannot load the component: %s", exc)
            sys.exit(self.WORKER_BOOT_ERROR)
        limits = Limits(request_line=cfg.limit_request_line, request_fields=cfg.limit_request_fields,
                        request_field_size=cfg.limit_request_field_size,
                        request_body=cfg.limit_request_body, keep_alive=cfg.keepalive,
                        header_timeout=cfg.header_timeout, min_data_rate=cfg.min_data_rate,
                        data_rate_grace=cfg.data_rate_grace)
        handler = GuestHandler(runtime, limits.request_body, metrics=stats,
                               on_request=self._count_request, trace_context=cfg.trace_context,
                               exporter=exporter)
        self.tls = self.app.tls  # (the master's, loaded from the files it found)
        if self.tls is not None:
            self.tls.metrics = stats
        self.server = Server([s.sock for s in self.sockets], handler, threads=cfg.threads,
                             limits=limits, worker_connections=cfg.worker_connections,
                             max_in_flight=cfg.max_concurrent_requests,
                             on_tick=self._tick, on_idle=runtime.prepare,
                             on_sweep=runtime.trim, workers=cfg.workers, tls=self.tls,
                             http2=http2_settings(cfg),
                             h2c=cfg.http2_cleartext == "prior-knowledge")
        self.runtime, self.outbound = runtime, outbound
        self.log.info("Worker ready: %s, %d event loop%s, up to %d requests at once",
                      self.app.component_name, cfg.threads, "s"[:cfg.threads > 1],
                      cfg.max_concurrent_requests)
        # What exists now lives as long as the worker: keep the cyclic GC from scanning it
        # again and again (wasmtime's and the host's tables are large).
        gc.freeze()
        self.server.serve(graceful_timeout=cfg.graceful_timeout)
        runtime.close()
        outbound.close()
        if exporter is not None:
            exporter.close()

    def _tick(self) -> None:
        stuck = self.runtime.stuck_for()
        if stuck < self.compute_timeout + STUCK_GRACE:
            self.notify()
        elif stuck < self.compute_timeout + STUCK_GRACE + 1:
            self.log.error("a guest has run wasm for %.0f s without being interrupted; "
                           "no more heartbeats, so the master replaces this worker", stuck)
        self.outbound.pool.sweep()
        if self.tls is not None:
            self.tls.check()
        self._report()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False
        if not self.alive:  # also a stop that came before the server existed
            self._retire()

    def _report(self) -> None:
        """Set the gauges that say how much the worker holds now."""
        stats, pool = metrics.get(), self.outbound.pool
        stats.outbound_connections.labels("open").set(pool.open)
        stats.outbound_connections.labels("idle").set(pool.idle)
        busy, idle = self.runtime.instances()
        stats.instances.labels("busy").set(busy)
        stats.instances.labels("idle").set(idle)
        stats.queued.set(self.server.queued())

    def _count_request(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.note_exit("max-requests")
            self._retire()

    def note_exit(self, reason: str) -> None:
        """Tell the master why this worker is about to exit (it reads its heartbeat file)."""
        os.pwrite(self.tmp.fileno(), reason.encode(), 0)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """TERM: graceful stop."""
        self._retire()

    def _retire(self) -> None:
        """Stop taking requests; the server finishes those in flight, then ``run`` returns."""
        self.alive = False
        if self.server is not None:
            self.server.stop()


def http2_settings(cfg: Any) -> Optional[Http2Settings]:
    """What HTTP/2 connections get, if HTTP/2 is served."""
    if "h2" not in cfg.http_protocols:
        return None
    return Http2Settings(max_concurrent_streams=cfg.http2_max_concurrent_streams,
                         initial_window_size=cfg.http2_initial_window_size,
                         max_frame_size=cfg.http2_max_frame_size,
                         max_header_list_size=cfg.http2_max_header_list_size)


def die_with_parent() -> None:
    """Have the kernel kill this worker if the master dies: an orphan would keep serving
    unsupervised and hold the listening socket a restarted master needs."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def share_logging(glog: Any) -> None:
    """Send wasisup's loggers where gunicorn's error log goes, at its level."""
    target = logging.getLogger("wasisup")
    target.handlers = list(glog.error_log.handlers)
    target.setLevel(glog.error_log.level)
    target.propagate = False
