"""What TLS costs: the hello guest over HTTP and HTTPS, on kept connections and with a
handshake per request, and 1 MiB proxied from nginx (MB/s).

    python bench/tls.py [--seconds 5] [--workers 2]

Two wasisups serve the hello guest side by side: one over HTTP, one over HTTPS with a
throwaway certificate (made with openssl, EC P-256). wrk loads each case in turn; "handshake
per request" sends ``Connection: close``, so every request is a new TCP connection and a full
TLS handshake (wrk resumes no sessions), and its req/s is the handshakes a second. The ratio
compares each case with plain HTTP on kept connections. The 1 MiB case runs the reference
proxy in front of nginx on loopback (bench/upstream.py): over HTTP its body goes socket to
socket inside the kernel (splice); over HTTPS it is encrypted on the way.

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial
from pathlib import Path

from harness import (ROOT, build, certificate, free_port, print_table, run_cleanly, server,
                     wasisup, wrk)
from upstream import nginx

CLIENTS = 16


def run(args: argparse.Namespace) -> None:
    hello, proxy = build(ROOT / "tests" / "guests" / "hello"), build(ROOT / "guest" / "proxy")
    with (tempfile.TemporaryDirectory(prefix="wasisup-bench-tls-") as tmp,
          nginx({"1m": 1 << 20}) as upstream):
        cert, key = certificate(Path(tmp))
        tls = ("--certfile", str(cert), "--keyfile", str(key))
        ports = {name: free_port() for name in ("hello", "hello-tls", "proxy", "proxy-tls")}
        hello_command = partial(wasisup, wasm=hello, workers=args.workers, reuse=1000)
        proxy_command = partial(wasisup, wasm=proxy, workers=args.workers, reuse=1000,
                                env={"UPSTREAM": upstream.url})
        with (server(hello_command(ports["hello"]), ports["hello"]),
              server(hello_command(ports["hello-tls"], options=tls), ports["hello-tls"]),
              server(proxy_command(ports["proxy"]), ports["proxy"]),
              server(proxy_command(ports["proxy-tls"], options=tls), ports["proxy-tls"])):
            hello_url = f"http://127.0.0.1:{ports['hello']}/"
            hello_tls_url = f"https://127.0.0.1:{ports['hello-tls']}/"
            cases = (("HTTP, kept connections, req/s", hello_url, {}, "rps"),
                     ("HTTPS, kept connections, req/s", hello_tls_url, {}, "rps"),
                     ("HTTP, a connection per request, req/s", hello_url,
                      {"Connection": "close"}, "rps"),
                     ("HTTPS, a handshake per request, req/s", hello_tls_url,
                      {"Connection": "close"}, "rps"),
                     ("proxy 1 MiB over HTTP, MB/s", f"http://127.0.0.1:{ports['proxy']}/1m",
                      {}, "mbps"),
                     ("proxy 1 MiB over HTTPS, MB/s", f"https://127.0.0.1:{ports['proxy-tls']}/1m",
                      {}, "mbps"))
            for _, url, headers, _ in cases:  # warm-up
                wrk(url, 1, CLIENTS, headers)
            loads = [wrk(url, args.seconds, CLIENTS, headers) for _, url, headers, _ in cases]
    rows = []
    for (label, _, _, column), load in zip(cases, loads):
        base = getattr(loads[4 if column == "mbps" else 0], column)
        value = getattr(load, column)
        rows.append((label, f"{value:,.0f}", f"{value / args.workers:,.0f}",
                     f"{value / base:.2f}x", f"{load.errors:,}"))
    print_table(f"TLS on {os.cpu_count()} cores: wasisup -w {args.workers} (wrk -t2 -c{CLIENTS}, "
                f"{args.seconds:g}s a case; TLS 1.3, EC P-256)",
                ("case", "value", "per worker", "vs HTTP, kept connections", "errors"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="wasisup -w")
    args = parser.parse_args()
    run_cleanly(partial(run, args))


if __name__ == "__main__":
    main()
