"""What one request costs inside a worker, part by part, in microseconds.

    python bench/request_cost.py [--requests 3000] [--guest hello]

One event loop's work for one request, in this process: a real socket pair stands for the client, the
request goes through the same code a worker runs (head read and checked, guest run, response
framed and sent, the connection readied for the next request), with the guest instance reused.
The guest's time is split into the host functions' Python and the rest (wasm, wasmtime's C
API, the C trampoline converting arguments and results); the client's own work is left out.
The server loop's part (epoll, scheduling) is not in here: it is the difference
to the CPU per request `bench/proxy.py` and `bench/run.py` see under load. The last row is the
resident memory the process kept per request (a guest's own heap grows a little while one
instance serves thousands of requests).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import tempfile
import time
from collections import defaultdict
from typing import Callable

from harness import ROOT, build, print_table, run_cleanly

PARTS = ("read and check the head", "guest: host functions",
         "guest: wasm, C API, trampoline",
         "response out, next request readied", "metrics, access log, bookkeeping")


class Clock:
    """Accumulates the time spent in wrapped functions, by part."""

    def __init__(self) -> None:
        self.spent: dict[str, int] = defaultdict(int)

    def wrap(self, part: str, func: Callable) -> Callable:
        spent = self.spent

        def timed(*args, **kwargs):
            started = time.perf_counter_ns()
            try:
                return func(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter_ns() - started
        return timed


def measure(wasm, requests: int) -> list[tuple[str, str, str]]:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="wasisup-bench-"))
    from wasisup import metrics
    from wasisup.compile import prepare
    from wasisup.http.client import OutboundClient
    from wasisup.http.connection import Connection
    from wasisup.http.handler import GuestCall, GuestHandler
    from wasisup.http.request_head import Limits
    from wasisup.runtime import Guest, Runtime
    from wasisup.wasi import abi

    clock = Clock()
    stats = metrics.get()
    runtime = Runtime(prepare(wasm).cwasm, [], OutboundClient(), max_instance_reuse=10**9,
                      metrics=stats)
    for function in abi.FUNCTIONS:
        function.func = clock.wrap("guest: host functions", function.func)
    Guest.poll = clock.wrap("guest", Guest.poll)  # (the guest runs in the call future's polls)
    handler = GuestHandler(runtime, metrics=stats)

    def serve(conn, head) -> None:
        call = GuestCall(handler, conn, head)
        assert call.start()
        while not call.step():  # (the hello guest never waits: its first step ends it)
            pass

    serve = clock.wrap("handler", serve)
    server_end, client = socket.socketpair()
    conn = Connection(server_end, None, Limits())
    read_head = clock.wrap("read and check the head", conn.read_head)
    finish = clock.wrap("response out, next request readied",
                        lambda: conn.flush() and conn.finish_cycle())
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\n\r\n"

    def one() -> None:
        client.sendall(request)
        head = None
        while head is None:
            head = read_head()
        serve(conn, head)
        assert finish()
        client.recv(1 << 16)

    for _ in range(300):
        one()
    gc.freeze()
    clock.spent.clear()
    rss, cpu = _rss(), time.process_time_ns()
    for _ in range(requests):
        one()
    cpu, rss = time.process_time_ns() - cpu, _rss() - rss
    spent = clock.spent
    guest, handled = spent.pop("guest"), spent.pop("handler")
    spent["guest: wasm, C API, trampoline"] = guest - spent["guest: host functions"]
    spent["metrics, access log, bookkeeping"] = handled - guest
    total = sum(spent.values())
    rows = [(part, f"{spent[part] / requests / 1000:.1f}", f"{100 * spent[part] / total:.0f}%")
            for part in PARTS]
    rows.append(("total", f"{total / requests / 1000:.1f}", "100%"))
    rows.append(("CPU of this process per request (client included)",
                 f"{cpu / requests / 1000:.1f}", ""))
    rows.append(("resident memory grown per request, bytes (0: nothing kept)",
                 f"{rss / requests:.0f}", ""))
    return rows


def _rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--guest", default="hello", help="a guest in tests/guests")
    args = parser.parse_args()
    wasm = build(ROOT / "tests" / "guests" / args.guest)
    print_table(f"One request to the {args.guest} guest, instance reused "
                f"({args.requests} requests, one thread)",
                ("part", "µs per request", "share"), measure(wasm, args.requests))


if __name__ == "__main__":
    run_cleanly(main)
