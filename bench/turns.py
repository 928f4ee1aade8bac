"""Should a worker's request threads take turns running guests? A small guest, 4 threads.

    python bench/turns.py [--runs 2] [--seconds 5]

The hello guest, instance reused, loaded by wrk with 8 connections per worker: one worker and
then a worker per core, with four threads whose guests run side by side (the default) and in
turn (--wasm-parallelism 1), and one worker with one thread for reference. Besides req/s it
reports what a request cost the workers: CPU time, and their threads' context switches (from
/proc). Guests running side by side hand the GIL to each other at every host call; in turns
they do not, but a turn can sit with a thread the system is not running.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from harness import ROOT, build, free_port, print_table, run_cleanly, server, wasisup, wrk

CONNECTIONS_PER_WORKER = 8


def cases() -> dict[str, tuple[int, int, int]]:
    """Label -> (workers, threads, wasm parallelism)."""
    cores = os.cpu_count() or 1
    return {
        "-w 1 --threads 4": (1, 4, 0),
        "-w 1 --threads 4 --wasm-parallelism 1": (1, 4, 1),
        "-w 1 --threads 1": (1, 1, 0),
        f"-w {cores} --threads 4": (cores, 4, 0),
        f"-w {cores} --threads 4 --wasm-parallelism 1": (cores, 4, 1),
    }


def _workers(master: int, count: int) -> list[int]:
    """The pids of the master's ``count`` workers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == master:
                found.append(int(pid))
        if len(found) == count:
            return found
        time.sleep(0.1)
    raise SystemExit(f"bench: error: the server did not start {count} workers")


def _usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, context switches) of processes and all their threads so far."""
    cpu, switches = 0.0, 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
    return cpu, switches


def measure(wasm: Path, workers: int, threads: int, parallelism: int,
            seconds: float) -> tuple[str, ...]:
    port = free_port()
    options = ("--wasm-parallelism", str(parallelism))
    connections = CONNECTIONS_PER_WORKER * workers
    with server(wasisup(port, wasm, workers=workers, threads=threads, reuse=100_000,
                        options=options), port) as proc:
        url = f"http://127.0.0.1:{port}/"
        pids = _workers(proc.pid, workers)
        wrk(url, 1, connections=connections)
        cpu, switches = _usage(pids)
        load = wrk(url, seconds, connections=connections)
        cpu_after, switches_after = _usage(pids)
    requests = max(1, load.requests)
    return (f"{load.rps:,.0f}", f"{(cpu_after - cpu) / requests * 1e6:.0f}",
            f"{(switches_after - switches) / requests:.1f}", f"{load.errors:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    args = parser.parse_args()
    hello = build(ROOT / "tests" / "guests" / "hello")
    rows = [(str(run), case, *measure(hello, *setup, args.seconds))
            for run in range(1, args.runs + 1) for case, setup in cases().items()]
    print_table(f"The hello guest, instance reused (wrk, {CONNECTIONS_PER_WORKER} connections "
                f"per worker, {args.seconds:g} s a case)",
                ("run", "wasisup", "req/s", "workers' CPU µs / request",
                 "context switches / request", "errors"), rows)


if __name__ == "__main__":
    run_cleanly(main)
