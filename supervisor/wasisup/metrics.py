"""Prometheus metrics, in prometheus-client's multiprocess mode.

Workers write to files in ``PROMETHEUS_MULTIPROC_DIR`` (one per metric type and pid); the
master aggregates them and serves ``/metrics`` on ``--metrics-bind``. When a worker exits, the
master folds its counters and histograms into one archive file per type and deletes its files,
so the directory — and the cost of a scrape — stays the size the live workers make it, however
many workers have come and gone. The master creates no worker metric, so no series carries its
pid. ``setup`` must run before prometheus_client is imported anywhere, so this module imports
it lazily.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections import defaultdict
from typing import Any, Callable, Optional

ENV = "PROMETHEUS_MULTIPROC_DIR"
# OpenTelemetry's HTTP duration buckets (0.005 ... 10 s), with finer ones below and longer above.
DURATION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10,
                    30, 60)
SIZE_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
# Methods with a label of their own; any other is "_OTHER" (OpenTelemetry's convention), so a
# client cannot make series up.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
# Upstream origins labelled by name, per worker; the rest are "other".
ORIGINS_PER_WORKER = 50
TCP_INFO_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info
# Types whose values add up across processes: a dead worker's go into "{type}_archive.db".
SUMMED_TYPES = ("counter", "histogram", "summary")
_OUR_FILES = (".db", ".db.tmp")
HEADER_SIZE = 8  # a file's "bytes used" and padding, written when a process creates it

# A scrape and a fold both run in the master: the lock keeps a scrape from seeing a dead
# worker's values twice (archive and own file) or not at all.
_folding = threading.Lock()
_owner: Optional[tuple[int, str, bool]] = None  # (master pid, directory, created by us)


def setup() -> None:
    """Point prometheus-client at an empty multiprocess directory (the user's, if set).

    Files left in the user's directory by a master that was killed are removed: a new worker
    could otherwise inherit a dead one's pid, and its counts with it.
    """
    global _owner
    path = os.environ.get(ENV)
    if path:
        created = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        _remove_our_files(path)
    else:
        path, created = tempfile.mkdtemp(prefix="wasisup-metrics-"), True
        os.environ[ENV] = path
    _owner = (os.getpid(), path, created)


def cleanup() -> None:
    """At the master's exit: remove the directory ``setup`` created, or empty the user's.

    Workers unwind through the same stack when they exit; only the master cleans up.
    """
    if _owner is None or _owner[0] != os.getpid():
        return
    _, path, created = _owner
    if created:
        shutil.rmtree(path, ignore_errors=True)
    else:
        _remove_our_files(path)


def _remove_our_files(path: str) -> None:
    for name in os.listdir(path):
        if name.endswith(_OUR_FILES):
            os.unlink(os.path.join(path, name))


def method_label(method: str) -> str:
    return method if method in METHODS else "_OTHER"


class Metrics:
    """The metric families a worker records; one instance per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # the requests served
        self.in_flight = Gauge("wasisup_requests_in_flight",
                               "Requests whose guest call has started and not ended, per worker",
                               multiprocess_mode="liveall")
        self.queued = Gauge("wasisup_requests_queued",
                            "Requests waiting for their turn (--max-concurrent-requests), per worker",
                            multiprocess_mode="liveall")
        self.requests = Counter("wasisup_requests_total", "Requests answered, by method and status "
                                "code (0: no response was sent)", ["method", "code"])
        self.duration = Histogram("wasisup_request_duration_seconds",
                                  "Time from the request head to the end of the response",
                                  ["method", "code"], buckets=DURATION_BUCKETS)
        self.wait = Histogram("wasisup_request_wait_seconds",
                              "Time from the request head to its guest starting: its turn under "
                              "--max-concurrent-requests and its instance", buckets=DURATION_BUCKETS)
        self.request_bytes = Histogram("wasisup_request_body_bytes",
                                       "Request body bytes the client sent", buckets=SIZE_BUCKETS)
        self.response_bytes = Histogram("wasisup_response_body_bytes",
                                        "Response body bytes the guest wrote", buckets=SIZE_BUCKETS)
        # the upstream hop
        self.outbound_duration = Histogram(
            "wasisup_outbound_request_duration_seconds",
            "Guests' outbound requests: time from the request to its response head (code) or its "
            "failure (error, the wasi:http error-code)", ["method", "origin", "code", "error"],
            buckets=DURATION_BUCKETS)
        self.outbound_body_errors = Counter(
            "wasisup_outbound_response_body_errors_total",
            "Upstream response bodies that failed after the head, by wasi:http error-code",
            ["origin", "error"])
        self.outbound_connections = Gauge("wasisup_outbound_connections",
                                          "Upstream connections open, and of them idle, per worker",
                                          ["state"], multiprocess_mode="liveall")
        self.outbound_opened = Counter("wasisup_outbound_connections_opened_total",
                                       "Upstream connections opened")
        self.outbound_reused = Counter("wasisup_outbound_connections_reused_total",
                                       "Outbound requests sent on a pooled connection")
        # the guests
        self.guest_seconds = Counter("wasisup_guest_seconds_total",
                                     "Time threads spent running guests (wasm, and the host "
                                     "functions it calls): a guest never blocks its thread, so "
                                     "this is CPU time (and any the OS took the core away)")
        self.epoch_yields = Counter("wasisup_guest_epoch_yields_total",
                                    "Times a computing guest gave its thread to the others")
        self.instances = Gauge("wasisup_guest_instances",
                               "Guest instances alive, busy with a request or idle, per worker",
                               ["state"], multiprocess_mode="liveall")
        self.instantiations = Counter("wasisup_instantiations_total", "Guest instances created")
        self.instantiation_seconds = Histogram("wasisup_instantiation_seconds",
                                               "Time to instantiate a guest",
                                               buckets=DURATION_BUCKETS)
        self.traps = Counter("wasisup_guest_traps_total", "Requests whose guest failed, by kind",
                             ["kind"])
        self.component = Gauge("wasisup_component_info", "The component being served",
                               ["name", "sha256"], multiprocess_mode="liveall")
        self.compile_seconds = Gauge("wasisup_component_compile_seconds",
                                     "How long compiling the served component took (0: cached)",
                                     multiprocess_mode="liveall")
        self.tls_handshake_failures = Counter("wasisup_tls_handshake_failures_total",
                                              "TLS handshakes that failed or were refused")
        self.tls_reloads = Counter("wasisup_tls_reloads_total", "Certificate files that "
                                   "changed on disk, by outcome: ok (new connections get them) "
                                   "or failed (they keep the previous ones)", ["outcome"])
        self.http2_goaways = Counter("wasisup_http2_goaways_total", "HTTP/2 connections the "
                                     "server ended, by error code: no_error (a drain, idle), "
                                     "enhance_your_calm (a flood of control frames or resets, an "
                                     "HPACK bomb), protocol_error, ...", ["error"])
        self.http2_client_resets = Counter("wasisup_http2_client_resets_total", "HTTP/2 streams "
                                           "the client reset before their response was whole")
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, remembered: on the request path, prometheus-client's
        own lookup (it checks the labels each time) costs more than the update."""
        key = (family, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found


@functools.cache
def get() -> Metrics:
    """This process's metrics (made on first use)."""
    return Metrics()


RESTART_REASONS = ("crash", "timeout", "max-requests", "reload")


class MasterMetrics:
    """The master's metrics: its workers. (It records no worker metric, so no series carries
    its pid.)"""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.workers = Gauge("wasisup_workers", "Worker processes alive", multiprocess_mode="max")
        self.restarts = Counter("wasisup_worker_restarts_total",
                                "Workers replaced, by reason: crash (it died), timeout (it missed "
                                "its heartbeats), max-requests, reload (HUP)", ["reason"])
        for reason in RESTART_REASONS:  # every series from 0
            self.restarts.labels(reason)


@functools.cache
def master() -> MasterMetrics:
    """The master's metrics (made on first use, before the first fork)."""
    return MasterMetrics()


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live series; fold its counts into the archives, delete its files."""
    from prometheus_client import multiprocess

    path = os.environ[ENV]
    with _folding:
        multiprocess.mark_process_dead(pid, path)
        # Its other gauge files hold the master's gauges at 0 (prometheus-client writes every
        # metric a process has into its own files once the pid changes).
        for dead in glob.glob(os.path.join(path, f"gauge_*_{pid}.db")):
            os.unlink(dead)
        for kind in SUMMED_TYPES:
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if os.path.exists(dead):
                _fold(dead, os.path.join(path, f"{kind}_archive.db"))


def _fold(dead: str, archive: str) -> None:
    """Add ``dead``'s values to ``archive`` (replaced atomically), then delete ``dead``."""
    from prometheus_client.mmap_dict import MmapedDict

    totals: dict[str, float] = defaultdict(float)
    for path in (archive, dead):
        if os.path.exists(path):
            for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(path):
                totals[key] += value
    staging = archive + ".tmp"  # not *.db: a scrape ignores it
    if os.path.exists(staging):
        os.unlink(staging)
    merged = MmapedDict(staging)
    try:
        for key, value in totals.items():
            merged.write_value(key, value, 0.0)
    finally:
        merged.close()
    os.replace(staging, archive)
    os.unlink(dead)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _accept_queue(sock: socket.socket) -> Optional[int]:
    """Connections waiting in a listening TCP socket's accept queue (Linux puts its length in
    ``tcpi_unacked``, as ``ss -lt`` shows it); None for other sockets."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_UNACKED + 4)
    return struct.unpack_from("I", info, TCP_INFO_UNACKED)[0]


def serve(bind: str, listeners: Callable[[], list[Any]]) -> Any:
    """Serve the aggregate of every process's metrics on ``bind`` (a thread in the master),
    and the accept queues of the ``listeners`` it binds (gunicorn's sockets)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    class Collector(MultiProcessCollector):
        """Never in the middle of a fold, and without the files workers are creating right
        now: one still empty fails to read (prometheus-client reads its header regardless)."""

        def collect(self) -> Any:
            with _folding:
                return self.merge([path for path in glob.glob(os.path.join(self._path, "*.db"))
                                   if _size(path) >= HEADER_SIZE], accumulate=True)

    class Backlog:
        """Read at each scrape: requests beyond every worker's --max-concurrent-requests wait
        here, as connections no worker has taken yet."""

        def collect(self) -> Any:
            family = GaugeMetricFamily(
                "wasisup_listen_backlog", "Connections the kernel accepted that no worker has "
                "taken yet, per listener", labels=["listener"])
            for listener in listeners():
                queued = _accept_queue(listener.sock)
                if queued is not None:
                    family.add_metric([str(listener)], queued)
            yield family

    registry = CollectorRegistry()
    Collector(registry)
    registry.register(Backlog())
    host, _, port = bind.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
