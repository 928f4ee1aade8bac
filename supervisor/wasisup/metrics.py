"""Prometheus metrics, in prometheus-client's multiprocess mode.

Workers write to files in ``PROMETHEUS_MULTIPROC_DIR``; the master aggregates them and serves
``/metrics`` on ``--metrics-bind``. ``setup`` must run before prometheus_client is imported
anywhere, so this module imports it lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


def setup() -> str:
    """Point prometheus-client at a fresh multiprocess directory (the user's, if set)."""
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        global _owner_pid
        path = tempfile.mkdtemp(prefix="wasisup-metrics-")
        os.environ[ENV] = path
        _owner_pid = os.getpid()
    return path


_owner_pid = 0


def cleanup(path: str) -> None:
    """Remove a directory ``setup`` created — from the master only (workers unwind through
    the same stack when they exit)."""
    if os.getpid() == _owner_pid and "wasisup-metrics-" in os.path.basename(path):
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The metric families wasisup records; one instance per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.in_flight = Gauge("wasisup_requests_in_flight", "Requests being handled, per worker",
                               multiprocess_mode="liveall")
        self.requests = Counter("wasisup_requests_total", "Requests answered, by status code",
                                ["code"])
        self.duration = Histogram("wasisup_request_duration_seconds",
                                  "Time from request head to end of response",
                                  buckets=DURATION_BUCKETS)
        self.instantiations = Counter("wasisup_instantiations_total", "Guest instances created")
        self.instantiation_seconds = Histogram("wasisup_instantiation_seconds",
                                               "Time to instantiate a guest",
                                               buckets=DURATION_BUCKETS)
        self.traps = Counter("wasisup_guest_traps_total", "Requests whose guest failed, by kind",
                             ["kind"])
        self.worker_restarts = Counter("wasisup_worker_restarts_total",
                                       "Workers replaced after dying")
        self.component = Gauge("wasisup_component_info", "The component being served",
                               ["name", "sha256"], multiprocess_mode="liveall")
        self.compile_seconds = Gauge("wasisup_component_compile_seconds",
                                     "How long compiling the served component took (0: cached)",
                                     multiprocess_mode="liveall")


_metrics: Optional[Metrics] = None


def get() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live series."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def serve(bind: str) -> Any:
    """Serve the aggregate of every process's metrics on ``bind`` (a thread in the master)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    host, _, port = bind.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
