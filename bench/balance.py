"""Do connections spread over workers? A CPU-bound guest, two keep-alive clients.

    python bench/balance.py [--runs 6] [--seconds 5]

Each run starts a fresh server and loads it with wrk -c2 (two kept-alive connections) on
tests/guests/hog's /work (pure wasm computation, no host calls): `-w 2 --threads 1` should
do about twice `-w 1 --threads 1` in every run — it does only if the two connections land on
different workers, which is what accepting only with a free request thread is for.
"""

from __future__ import annotations

import argparse
import time

from harness import ROOT, build, free_port, print_table, run_cleanly, server, wasisup, wrk

PATH = "/work?n=300000"  # about 0.1 s of wasm a request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration per run")
    args = parser.parse_args()
    hog = build(ROOT / "tests" / "guests" / "hog")
    rows = []
    for run in range(1, args.runs + 1):
        rates = []
        for workers in (1, 2):
            port = free_port()
            with server(wasisup(port, hog, workers=workers, threads=1, reuse=1000), port):
                url = f"http://127.0.0.1:{port}{PATH}"
                wrk(url, 1, connections=2)  # a warm-up as light as the load
                time.sleep(1)  # for what the warm-up left in flight
                rates.append(wrk(url, args.seconds, connections=2).rps)
        rows.append((str(run), f"{rates[0]:.2f}", f"{rates[1]:.2f}", f"{rates[1] / rates[0]:.2f}x"))
    print_table(f"CPU-bound guest, 2 keep-alive clients (wrk -c2, {args.seconds:g} s a run)",
                ("run", "-w 1 --threads 1, req/s", "-w 2 --threads 1, req/s", "ratio"), rows)


if __name__ == "__main__":
    run_cleanly(main)
