"""Do a worker's request threads take turns running guests? One worker, a small guest.

    python bench/turns.py [--runs 2] [--seconds 5]

The hello guest, instance reused, loaded by wrk -c8 on one worker: with 4 threads whose guests
run in turn (--wasm-parallelism 1, the default) and side by side (--wasm-parallelism 4), and
with one thread for reference. Besides req/s it reports what a request cost the worker: CPU
time, and its threads' context switches (from /proc). Guests running side by side hand the
GIL to each other at every host call.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from harness import ROOT, build, free_port, print_table, run_cleanly, server, wasisup, wrk

CASES = {
    "--threads 4, guests in turn": (4, 1),
    "--threads 4 --wasm-parallelism 4": (4, 4),
    "--threads 1": (1, 1),
}


def _worker(master: int) -> int:
    """The pid of the master's one worker."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == master:
                return int(pid)
        time.sleep(0.1)
    raise SystemExit("bench: error: the server started no worker")


def _usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return cpu, switches


def measure(wasm: Path, threads: int, parallelism: int, seconds: float) -> tuple[str, ...]:
    port = free_port()
    options = ("--wasm-parallelism", str(parallelism))
    with server(wasisup(port, wasm, workers=1, threads=threads, reuse=100_000,
                        options=options), port) as proc:
        url = f"http://127.0.0.1:{port}/"
        worker = _worker(proc.pid)
        wrk(url, 1, connections=8)
        cpu, switches = _usage(worker)
        load = wrk(url, seconds, connections=8)
        cpu_after, switches_after = _usage(worker)
    requests = max(1, load.requests)
    return (f"{load.rps:,.0f}", f"{(cpu_after - cpu) / requests * 1e6:.0f}",
            f"{(switches_after - switches) / requests:.1f}", f"{load.errors:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    args = parser.parse_args()
    hello = build(ROOT / "tests" / "guests" / "hello")
    rows = [(str(run), case, *measure(hello, threads, parallelism, args.seconds))
            for run in range(1, args.runs + 1)
            for case, (threads, parallelism) in CASES.items()]
    print_table(f"One worker, the hello guest, instance reused (wrk -c8, {args.seconds:g} s a case)",
                ("run", "wasisup -w 1", "req/s", "worker CPU µs / request",
                 "context switches / request", "errors"), rows)


if __name__ == "__main__":
    run_cleanly(main)
