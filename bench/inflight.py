"""Requests in flight: wasisup vs `wasmtime serve` in front of an upstream that answers late.

    python bench/inflight.py [--seconds 5] [--delay 0.05] [--workers 2]
    python bench/inflight.py --soak 5000 [--soak-delay 9]

The upstream is nginx on loopback with the echo module (bench/upstream.py): /slow answers
after ``--delay`` seconds, and is not itself the bottleneck (one nginx worker answers thousands
of such requests a second). Both servers run the reference guest (guest/proxy) with the default
settings but workers; wrk loads them in turn, each after a warm-up with as many clients (so
the instances they need exist). The table gives req/s with 32 and 256 clients,
with instance reuse and with a fresh instance per request: at 32 clients against `wasmtime
serve`, at 256 against wasisup's own rate in front of an instant upstream with 16 clients (what
waiting costs it); errors are wrk's socket errors plus non-2xx answers.

``--soak N`` sends N requests at once, each on its own connection, to wasisup in front of an
upstream that answers after ``--soak-delay`` seconds, and reports how many were answered 200,
the most in flight at once (the workers' own count) and what the workers' memory grew by per
waiting request: all of it, what an idle instance of the guest costs alone (measured here, in a
pool of the same size), and the rest: what the request itself holds (the pages its guest wrote,
the host's buffers and objects).

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import tracemalloc
import urllib.request
from functools import partial
from pathlib import Path

from harness import (ROOT, build, free_port, print_table, run_cleanly, server, wasisup,
                     wasmtime_serve, warmed_up, wrk)
from upstream import SLOW_PATH, nginx

REUSE = 1000
INSTANT = "/1k"
WARM_UP_SECONDS = 2


def compare(proxy: Path, upstream: str, seconds: float, workers: int) -> list[tuple[str, ...]]:
    rows = []
    env = {"UPSTREAM": upstream}
    for reuse, label in ((REUSE, f"instance reuse ({REUSE})"), (1, "fresh instance per request")):
        with (warmed_up(partial(wasisup, wasm=proxy, workers=workers, reuse=reuse, env=env),
                        SLOW_PATH) as mine_url,
              warmed_up(partial(wasmtime_serve, wasm=proxy, reuse=reuse, env=env),
                        SLOW_PATH) as theirs_url):
            base = wrk(mine_url.replace(SLOW_PATH, INSTANT), seconds, connections=16)
            for clients in (32, 256):
                for url in (mine_url, theirs_url):  # as many instances as clients, warm
                    wrk(url, WARM_UP_SECONDS, connections=clients)
                ours = wrk(mine_url, seconds, connections=clients)
                wasmtime = wrk(theirs_url, seconds, connections=clients)
                if clients == 32:
                    versus, ratio = f"wasmtime serve: {wasmtime.rps:,.0f}", ours.rps / wasmtime.rps
                else:
                    versus = f"wasisup, instant upstream, 16 clients: {base.rps:,.0f}"
                    ratio = ours.rps / base.rps
                rows.append((f"{clients} clients, {label}", f"{ours.rps:,.0f}", versus,
                             f"{ratio:.2f}x", f"{ours.errors:,} / {wasmtime.errors:,}",
                             f"{wasmtime.rps:,.0f}"))
    return rows


async def _one(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    await reader.read()
    writer.close()
    return int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.1 ") else 0


async def _many(port: int, path: str, count: int) -> list[int | str]:
    return await asyncio.gather(*(_one(port, path) for _ in range(count)), return_exceptions=True)


def _workers(master: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                found.append(int(entry))
    return found


def _memory(pids: list[int]) -> dict[str, int]:
    """kB over ``pids``: Pss, and private dirty memory."""
    total = {"pss": 0, "dirty": 0}
    for pid in pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total["pss"] += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
        total["dirty"] += int(re.search(r"^Private_Dirty:\s+(\d+)", rollup, re.M).group(1))
    return total


def idle_instance_cost(proxy: Path, instances: int, count: int = 200) -> tuple[float, float]:
    """kB of private dirty memory per idle instance of ``proxy`` (made here, in a pool sized as
    the workers' is), and kB of Python objects among it."""
    sys.path.insert(0, str(ROOT / "supervisor"))
    from wasisup.compile import prepare
    from wasisup.runtime import Guest, Runtime

    runtime = Runtime(prepare(proxy).cwasm, [("UPSTREAM", "http://127.0.0.1:9")], None,
                      instances=instances)
    before = _memory([os.getpid()])["dirty"]
    tracemalloc.start()
    guests = [Guest(runtime) for _ in range(count)]
    python = sum(stat.size for stat in tracemalloc.take_snapshot().statistics("filename"))
    tracemalloc.stop()
    added = _memory([os.getpid()])["dirty"] - before
    for guest in guests:
        guest.close()
    runtime.close()
    return added / count, python / 1024 / count


def _in_flight(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(v) for v in re.findall(r"wasisup_requests_in_flight\{[^}]*\} ([\d.]+)", text)))


def soak(proxy: Path, count: int, delay: float, workers: int) -> list[tuple[str, str]]:
    share = -(-count // workers) + 16
    port, metrics_port = free_port(), free_port()
    with nginx({"1k": 1024}, delay=delay) as upstream:
        argv = wasisup(port, proxy, workers=workers, env={"UPSTREAM": upstream.url},
                       options=("--max-concurrent-requests", str(share), "--worker-connections",
                                str(share), "--backlog", str(count),
                                "--metrics-bind", f"127.0.0.1:{metrics_port}"))
        with server(argv, port) as proc:
            asyncio.run(_many(port, "/healthz", 64))  # every worker warm
            pids = _workers(proc.pid)
            before = _memory(pids)
            peak_in_flight, during = 0, before

            async def measure() -> list[int | str]:
                nonlocal peak_in_flight, during
                requests = asyncio.ensure_future(_many(port, SLOW_PATH, count))
                deadline = time.monotonic() + delay * 0.8
                while time.monotonic() < deadline and not requests.done():
                    in_flight = await asyncio.to_thread(_in_flight, metrics_port)
                    if in_flight > peak_in_flight:
                        peak_in_flight, during = in_flight, await asyncio.to_thread(_memory, pids)
                    await asyncio.sleep(0.2)
                return await requests

            started = time.monotonic()
            outcomes = asyncio.run(measure())
            elapsed = time.monotonic() - started
    ok = sum(1 for outcome in outcomes if outcome == 200)
    waiting = max(peak_in_flight, 1)
    instance, python = idle_instance_cost(proxy, share + 2)

    def added(key: str) -> float:
        return (during[key] - before[key]) / waiting

    def per_request(key: str) -> str:
        return f"{added(key):,.0f} kB"

    return [
        ("requests sent at once", f"{count:,}"),
        ("answered 200", f"{ok:,}"),
        ("other outcomes", f"{count - ok:,}"
         + (f" (e.g. {next(o for o in outcomes if o != 200)!r})" if ok < count else "")),
        ("most in flight at once (workers' count)", f"{peak_in_flight:,}"),
        ("all answered after", f"{elapsed:.1f} s (upstream delay {delay:g} s)"),
        ("workers' Pss before / at the peak", f"{before['pss'] / 1024:,.0f} / {during['pss'] / 1024:,.0f} MB"),
        ("added per waiting request: Pss", per_request("pss")),
        ("added per waiting request: private dirty", per_request("dirty")),
        ("  an idle instance of the guest (made apart, same pool)",
         f"{instance:,.0f} kB (of which Python objects {python:,.1f} kB)"),
        ("  the request: pages its guest wrote, host buffers and objects",
         f"{added('dirty') - instance:,.0f} kB"),
    ]


def run(args: argparse.Namespace) -> None:
    proxy = build(ROOT / "guest" / "proxy")
    if args.soak:
        print_table(f"{args.soak:,} requests at once through wasisup -w {args.workers}, upstream "
                    f"answering after {args.soak_delay:g} s (fresh instance per request)",
                    ("measure", "value"), soak(proxy, args.soak, args.soak_delay, args.workers))
        return
    with nginx({"1k": 1024}, delay=args.delay) as upstream:
        print_table(f"Requests in flight on {os.cpu_count()} cores: the reference proxy in front "
                    f"of nginx answering after {args.delay * 1000:g} ms (wrk -t2, {args.seconds:g}s "
                    f"a run; wasisup -w {args.workers}, default settings otherwise)",
                    ("case", "wasisup req/s", "compared with, req/s", "ratio",
                     "errors (wasisup / wasmtime)", "wasmtime serve req/s"),
                    compare(proxy, upstream.url, args.seconds, args.workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per run")
    parser.add_argument("--delay", type=float, default=0.05,
                        help="seconds the upstream takes to answer")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="wasisup -w")
    parser.add_argument("--soak", type=int, metavar="N",
                        help="only send N requests at once and report what they cost")
    parser.add_argument("--soak-delay", type=float, default=9.0,
                        help="seconds the upstream takes to answer in the soak (the reference "
                             "guest gives up after 10; starting 5,000 fresh guests takes "
                             "~10 s of this machine's CPU, so with less they overlap less)")
    args = parser.parse_args()
    if args.soak and args.soak < 1:
        raise SystemExit("bench: error: --soak takes a whole number of at least 1")
    run_cleanly(partial(run, args))


if __name__ == "__main__":
    main()
