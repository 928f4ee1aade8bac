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

import glob
import os
import shutil
import tempfile
import threading
from collections import defaultdict
from typing import Any, Optional

ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
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


_restarts: Any = None


def worker_restarts() -> Any:
    """The master's only metric: workers replaced after dying (at 0 from the start)."""
    global _restarts
    if _restarts is None:
        from prometheus_client import Counter

        _restarts = Counter("wasisup_worker_restarts_total", "Workers replaced after dying")
    return _restarts


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live series; fold its counts into the archives, delete its files."""
    from prometheus_client import multiprocess

    path = os.environ[ENV]
    with _folding:
        multiprocess.mark_process_dead(pid, path)
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


def serve(bind: str) -> Any:
    """Serve the aggregate of every process's metrics on ``bind`` (a thread in the master)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    class Collector(MultiProcessCollector):
        """Never in the middle of a fold, and without the files workers are creating right
        now: one still empty fails to read (prometheus-client reads its header regardless)."""

        def collect(self) -> Any:
            with _folding:
                return self.merge([path for path in glob.glob(os.path.join(self._path, "*.db"))
                                   if _size(path) >= HEADER_SIZE], accumulate=True)

    registry = CollectorRegistry()
    Collector(registry)
    host, _, port = bind.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
