"""The proxy path: wasisup vs `wasmtime serve` running the reference guest in front of nginx.

    python bench/proxy.py [--seconds 3] [--rounds 3] [--workers 2] [--threads 1]
    python bench/proxy.py --sustain 60
    python bench/proxy.py --trace-context

One run starts its own upstreams (nginx on loopback, keep-alive on, one for each server;
bench/upstream.py) and serves guest/proxy with ``UPSTREAM`` pointing at them from wasisup and
from `wasmtime serve`, both at once. Each case warms both up, then loads them with wrk in
turn, round after round, so a burst of noise from the machine falls on one round rather than
on one server. The table gives each server's req/s (MB/s for 1 MiB) over all rounds, the
median of the rounds' ratios and their range, errors (wrk socket errors + non-2xx answers) and
the upstream connections each server opened per 1,000 requests, from nginx's own count.

``--sustain SECONDS`` proxies 1 KiB at full rate through wasisup alone, and compares the
upstream connections it opened (from start-up on) with the bound 2 x clients (a request in
flight holds one): pooled outbound connections should make that a handful, however long the run.

``--trace-context`` measures what taking part in the trace costs: wasisup as it is (reading
each request's ``traceparent``, sending the upstream one of its own) against wasisup
``--no-trace-context``, both in front of their own nginx, in turn, round after round.

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from harness import (ROOT, Load, build, print_table, run_cleanly, wasisup, wasmtime_serve,
                     warmed_up, wrk)
from upstream import Nginx, nginx

FILES = {"1k": 1024, "1m": 1024 * 1024}
REUSE = 1000
CLIENTS = 16  # wrk's connections


@dataclass(frozen=True)
class Case:
    label: str
    guest: str
    path: str
    reuse: int
    column: str  # the Load field reported: "rps" or "mbps"


CASES = (
    Case("proxy 1 KiB, fresh instance per request, req/s", "proxy", "/1k", 1, "rps"),
    Case(f"proxy 1 KiB, instance reuse ({REUSE}), req/s", "proxy", "/1k", REUSE, "rps"),
    Case(f"proxy 1 MiB, instance reuse ({REUSE}), MB/s", "proxy", "/1m", REUSE, "mbps"),
    Case(f"hello guest (16 bytes), instance reuse ({REUSE}), req/s", "hello", "/", REUSE, "rps"),
)


def _per_1k(opened: int, load: Load) -> str:
    return f"{opened * 1000 / load.requests:,.1f}" if load.requests else "-"


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Tally:
    """One server's loads over the rounds of a case, and the upstream connections it opened."""

    def __init__(self) -> None:
        self.loads: list[Load] = []
        self.opened = 0

    def load(self, url: str, seconds: float, upstream: Nginx,
             headers: dict[str, str] = {}) -> Load:
        before = upstream.connections_accepted()
        load = wrk(url, seconds, headers=headers)
        self.opened += upstream.connections_accepted() - before
        self.loads.append(load)
        return load

    def total(self) -> Load:
        """The rounds as one load: requests and errors added up, rates averaged."""
        rounds = len(self.loads)
        return Load(requests=sum(load.requests for load in self.loads),
                    rps=sum(load.rps for load in self.loads) / rounds,
                    mbps=sum(load.mbps for load in self.loads) / rounds,
                    socket_errors=sum(load.socket_errors for load in self.loads),
                    non_2xx=sum(load.non_2xx for load in self.loads))


Command = Callable[[int], list[str]]  # a server's command line, given its port


def side_by_side(case: Case, commands: tuple[Command, Command],
                 upstreams: tuple[Nginx, Nginx], seconds: float, rounds: int,
                 headers: dict[str, str] = {}) -> tuple[str, ...]:
    """One row: two servers (each in front of its own upstream) loaded in turn, ``rounds``
    times."""
    (mine_upstream, theirs_upstream), mine, theirs, ratios = upstreams, Tally(), Tally(), []
    with (warmed_up(commands[0], case.path) as mine_url,
          warmed_up(commands[1], case.path) as theirs_url):
        for _ in range(rounds):
            mine_value = getattr(mine.load(mine_url, seconds, mine_upstream, headers), case.column)
            theirs_value = getattr(theirs.load(theirs_url, seconds, theirs_upstream, headers),
                                   case.column)
            ratios.append(mine_value / theirs_value if theirs_value else 0.0)
    mine_load, theirs_load = mine.total(), theirs.total()
    return (case.label, f"{getattr(mine_load, case.column):,.0f}",
            f"{getattr(theirs_load, case.column):,.0f}",
            f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}",
            f"{mine_load.errors} / {theirs_load.errors}",
            f"{_per_1k(mine.opened, mine_load)} / {_per_1k(theirs.opened, theirs_load)}"
            if case.guest == "proxy" else "n/a")


def compare(guests: dict[str, Path], upstreams: tuple[Nginx, Nginx], seconds: float,
            rounds: int, workers: int, threads: int) -> list[tuple[str, ...]]:
    """One row per case: wasisup and `wasmtime serve`."""
    rows = []
    for case in CASES:
        wasm = guests[case.guest]
        commands = (partial(wasisup, wasm=wasm, workers=workers, threads=threads,
                            reuse=case.reuse, env={"UPSTREAM": upstreams[0].url}),
                    partial(wasmtime_serve, wasm=wasm, reuse=case.reuse,
                            env={"UPSTREAM": upstreams[1].url}))
        rows.append(side_by_side(case, commands, upstreams, seconds, rounds))
    return rows


def tracing_cost(proxy: Path, upstreams: tuple[Nginx, Nginx], seconds: float, rounds: int,
                 workers: int, threads: int) -> list[tuple[str, ...]]:
    """wasisup with and without --no-trace-context, requests with and without a traceparent."""
    rows = []
    for reuse, traced in ((REUSE, True), (REUSE, False), (1, True)):
        case = Case(f"proxy 1 KiB, {'instance reuse' if reuse > 1 else 'fresh instances'}, "
                    f"{'with' if traced else 'without'} an inbound traceparent, req/s",
                    "proxy", "/1k", reuse, "rps")
        commands = tuple(partial(wasisup, wasm=proxy, workers=workers, threads=threads,
                                 reuse=reuse, env={"UPSTREAM": upstream.url}, options=options)
                         for upstream, options in zip(upstreams, ((), ("--no-trace-context",))))
        rows.append(side_by_side(case, commands, upstreams, seconds, rounds,
                                 {"traceparent": TRACEPARENT} if traced else {}))
    return rows


def sustain(proxy: Path, upstream: Nginx, seconds: float, workers: int,
            threads: int) -> list[tuple[str, str]]:
    """Proxy 1 KiB at full rate through wasisup; count what went wrong and what it opened."""
    bound = 2 * CLIENTS
    before = upstream.connections_accepted()
    command = partial(wasisup, wasm=proxy, workers=workers, threads=threads, reuse=REUSE,
                      env={"UPSTREAM": upstream.url})
    with warmed_up(command, "/1k") as url:
        load = wrk(url, seconds)
        opened = upstream.connections_accepted() - before
    return [
        ("requests", f"{load.requests:,}"),
        ("req/s", f"{load.rps:,.0f}"),
        ("wrk socket errors", f"{load.socket_errors:,}"),
        ("non-2xx answers", f"{load.non_2xx:,}"),
        ("upstream connections opened (warm-up included)", f"{opened:,}"),
        (f"bound: 2 x {CLIENTS} clients", f"{bound:,}"),
        ("verdict", "ok" if opened < bound and not load.errors else "FAIL"),
    ]


def run(args: argparse.Namespace) -> None:
    proxy = build(ROOT / "guest" / "proxy")
    if args.sustain:
        with nginx(FILES) as upstream:
            print_table(f"Sustained proxying, 1 KiB through wasisup -w {args.workers} --threads "
                        f"{args.threads}, instance reuse ({REUSE}) (wrk -t2 -c16, {args.sustain:g}s)",
                        ("measure", "value"),
                        sustain(proxy, upstream, args.sustain, args.workers, args.threads))
        return
    if args.trace_context:
        with nginx(FILES) as mine, nginx(FILES) as theirs:
            print_table(f"What trace context costs on {os.cpu_count()} cores (wrk -t2 -c16, "
                        f"{args.rounds} rounds of {args.seconds:g}s a server per case; "
                        f"wasisup -w {args.workers} --threads {args.threads})",
                        ("case", "wasisup", "wasisup --no-trace-context", "ratio (median)",
                         "ratio range", "errors", "upstream conns per 1k requests"),
                        tracing_cost(proxy, (mine, theirs), args.seconds, args.rounds,
                                     args.workers, args.threads))
        return
    guests = {"proxy": proxy, "hello": build(ROOT / "tests" / "guests" / "hello")}
    # An upstream each: wasmtime serve's connection per request must not crowd out wasisup's
    # pooled ones (nginx closes idle keep-alive connections when it runs short).
    with nginx(FILES) as mine, nginx(FILES) as theirs:
        print_table(f"Proxy path on {os.cpu_count()} cores, upstream nginx on loopback "
                    f"(wrk -t2 -c16, {args.rounds} rounds of {args.seconds:g}s a server per "
                    f"case; wasisup -w {args.workers} --threads {args.threads})",
                    ("case", "wasisup", "wasmtime serve", "ratio (median)", "ratio range",
                     "errors (wasisup / wasmtime)",
                     "upstream conns per 1k requests (wasisup / wasmtime)"),
                    compare(guests, (mine, theirs), args.seconds, args.rounds, args.workers,
                            args.threads))


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3,
                        help="wrk duration per server and round")
    parser.add_argument("--rounds", type=_at_least_one, default=3,
                        help="rounds per case (the ratio is their median)")
    parser.add_argument("--workers", type=_at_least_one, default=os.cpu_count() or 1,
                        help="wasisup -w (default: one per core)")
    parser.add_argument("--threads", type=_at_least_one, default=1, help="wasisup --threads")
    parser.add_argument("--sustain", type=float, metavar="SECONDS",
                        help="only proxy 1 KiB through wasisup for this long, and check the "
                             "upstream connections it opened")
    parser.add_argument("--trace-context", action="store_true",
                        help="only compare wasisup with and without --no-trace-context")
    args = parser.parse_args()
    run_cleanly(partial(run, args))


if __name__ == "__main__":
    main()
