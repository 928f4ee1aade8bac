"""wasisup vs `wasmtime serve`, side by side in one run, printed as a table of ratios.

    python bench/run.py [--seconds 5] [--skip-hostcall]

1. host calls: wasmtime-py's generic ``add_func`` path vs wasisup's trampoline (bench/hostcall).
2. HTTP (wrk, loopback): req/s on the hello guest, fresh instance per request and reused;
   MB/s of 64 KiB and 1 MiB response bodies from the stream guest.

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from harness import (ROOT, Load, build, print_table, run_cleanly, wasisup, wasmtime_serve,
                     warmed_up, wrk)


def _measure(command: Callable[[int], list[str]], path: str, seconds: float) -> Load:
    with warmed_up(command, path) as url:
        load = wrk(url, seconds)
    if load.errors:
        print(f"  (wrk: {load.errors} errors or non-2xx for {url})", file=sys.stderr)
    return load


def http_rows(hello: Path, stream: Path, seconds: float) -> list[tuple[str, str, str, str]]:
    workers = os.cpu_count() or 1
    rows = []
    cases = [
        ("hello req/s, fresh instance", hello, "/", 1, "rps"),
        ("hello req/s, instance reuse", hello, "/", 1000, "rps"),
        ("64 KiB body MB/s, reuse", stream, "/download?size=65536", 1000, "mbps"),
        ("1 MiB body MB/s, reuse", stream, "/download?size=1048576", 1000, "mbps"),
    ]
    for label, wasm, path, reuse, column in cases:
        mine, reference = (getattr(_measure(command, path, seconds), column) for command in (
            partial(wasisup, wasm=wasm, workers=workers, reuse=reuse),
            partial(wasmtime_serve, wasm=wasm, reuse=reuse)))
        rows.append((label, f"{mine:,.0f}", f"{reference:,.0f}", f"{mine / reference:.2f}"))
    return rows


def run(seconds: float, skip_hostcall: bool) -> None:
    hello = build(ROOT / "tests" / "guests" / "hello")
    stream = build(ROOT / "tests" / "guests" / "stream")
    if not skip_hostcall:
        import hostcall

        print_table("Host calls (one process, in-process calls)",
                    ("measure", "wasmtime-py add_func", "wasisup trampoline", "speed-up"),
                    hostcall.table(build(ROOT / "bench" / "hostcall")))
    print_table(f"HTTP on {os.cpu_count()} cores (wrk -t2 -c16, {seconds:g}s per case; "
                f"wasisup -w {os.cpu_count()})",
                ("case", "wasisup", "wasmtime serve", "ratio"), http_rows(hello, stream, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    parser.add_argument("--skip-hostcall", action="store_true")
    args = parser.parse_args()
    run_cleanly(partial(run, args.seconds, args.skip_hostcall))


if __name__ == "__main__":
    main()
