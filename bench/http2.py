"""HTTP/2 beside HTTP/1.1: h2load against the hello guest and the reference proxy, over h2c and
h2 (TLS, ALPN), with one or many streams per connection; and TLS handshakes a second.

    python bench/http2.py [--seconds 3] [--rounds 3] [--workers 2]

Two wasisups serve each guest side by side: one on plain HTTP with ``--http2-cleartext
prior-knowledge`` (HTTP/1.1 and h2c on one port), one over TLS (ALPN picks h2, or HTTP/1.1
for ``--h1``). Every case is h2load (2 threads), so HTTP/1.1 and HTTP/2 meet the same client;
"16 x 1" is 16 connections with one request in flight each, "2 x 64" two connections carrying
64 streams each. The proxy cases go to nginx on loopback: a 1 KiB file, and the same file
after 50 ms (what multiplexing is for: many requests waiting on one connection). The ratio
compares each case with HTTP/1.1 on the same guest and upstream. The last row is wrk with
``Connection: close`` over HTTPS: a full TLS handshake per request.

`wasmtime serve` speaks HTTP/1.1 only: there is no HTTP/2 figure of it to set beside these.
This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from harness import (ROOT, Load, build, certificate, free_port, h2load, print_table,
                     run_cleanly, server, wasisup, wrk)
from upstream import SLOW_PATH, nginx

DELAY = 0.05


def run(args: argparse.Namespace) -> None:
    hello, proxy = build(ROOT / "tests" / "guests" / "hello"), build(ROOT / "guest" / "proxy")
    with (tempfile.TemporaryDirectory(prefix="wasisup-bench-h2-") as tmp,
          nginx({"1k": 1024}, delay=DELAY) as upstream, ExitStack() as servers):
        cert, key = certificate(Path(tmp))
        h2c = ("--http2-cleartext", "prior-knowledge")
        tls = ("--certfile", str(cert), "--keyfile", str(key))
        urls = {}
        for name, wasm, env in (("hello", hello, {}), ("proxy", proxy, {"UPSTREAM": upstream.url})):
            for secure, options in ((False, h2c), (True, tls)):
                port = free_port()
                servers.enter_context(server(wasisup(port, wasm, workers=args.workers,
                                                     reuse=1000, env=env, options=options), port))
                urls[name, secure] = f"{'https' if secure else 'http'}://127.0.0.1:{port}"
        def load(url: str, **kwargs) -> Load:  # the median of the rounds, by req/s
            runs = sorted((h2load(url, args.seconds, **kwargs) for _ in range(args.rounds)),
                          key=lambda run: run.rps)
            return runs[len(runs) // 2]

        cases = []  # (label, the HTTP/1.1 case it is compared with, the measurement)
        for name, path in (("hello", "/"), ("proxy", "/1k"), ("proxy, upstream 50 ms", SLOW_PATH)):
            guest = name.split(",")[0]
            plain, secure = urls[guest, False] + path, urls[guest, True] + path
            wide = 128 if "50 ms" in name else 16
            base = f"{name}: HTTP/1.1, {wide} connections"
            cases += [(base, base, load(plain, clients=wide, http1=True)),
                      (f"{name}: h2c, {wide} x 1", base, load(plain, clients=wide)),
                      (f"{name}: h2c, 2 x {wide // 2}", base, load(plain, clients=2,
                                                                   streams=wide // 2)),
                      (f"{name}: HTTPS HTTP/1.1, {wide} connections", base,
                       load(secure, clients=wide, http1=True)),
                      (f"{name}: h2 (TLS), {wide} x 1", base, load(secure, clients=wide)),
                      (f"{name}: h2 (TLS), 2 x {wide // 2}", base, load(secure, clients=2,
                                                                        streams=wide // 2))]
        handshakes = wrk(urls["hello", True] + "/", args.seconds, 16, {"Connection": "close"})
    measured = {label: result for label, _, result in cases}
    rows = [(label, f"{result.rps:,.0f}", f"{result.rps / args.workers:,.0f}",
             f"{result.rps / measured[base].rps:.2f}x", f"{result.errors:,}")
            for label, base, result in cases]
    rows.append(("TLS handshakes (HTTPS, a connection per request)", f"{handshakes.rps:,.0f}",
                 f"{handshakes.rps / args.workers:,.0f}", "", f"{handshakes.errors:,}"))
    print_table(f"HTTP/2 on {os.cpu_count()} cores: wasisup -w {args.workers} "
                f"--max-instance-reuse 1000 (h2load -t2, median of {args.rounds} runs of "
                f"{args.seconds:g}s a case)",
                ("case", "req/s", "per worker", "vs HTTP/1.1", "errors"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3, help="h2load duration per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per case (the median counts)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="wasisup -w")
    args = parser.parse_args()
    run_cleanly(partial(run, args))


if __name__ == "__main__":
    main()
