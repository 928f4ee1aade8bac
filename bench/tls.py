"""What TLS costs: the hello guest over HTTP and HTTPS, on kept connections and with a
handshake per request.

    python bench/tls.py [--seconds 5] [--workers 2]

Two wasisups serve the hello guest side by side: one over HTTP, one over HTTPS with a
throwaway certificate (made with openssl, EC P-256). wrk loads each case in turn; "handshake
per request" sends ``Connection: close``, so every request is a new TCP connection and a full
TLS handshake (wrk resumes no sessions), and its req/s is the handshakes a second. The ratio
compares each case with plain HTTP on kept connections.

This machine is noisy: compare the ratio column, not absolute numbers between runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from functools import partial
from pathlib import Path

from harness import ROOT, SetupError, build, free_port, print_table, run_cleanly, server, wasisup, wrk

CLIENTS = 16


def certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.pem", directory / "tls.key"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       check=True, capture_output=True)
    except FileNotFoundError:
        raise SetupError("openssl is missing (apt-get install openssl)") from None
    return cert, key


def run(args: argparse.Namespace) -> None:
    hello = build(ROOT / "tests" / "guests" / "hello")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wasisup-bench-tls-") as tmp:
        cert, key = certificate(Path(tmp))
        plain_port, tls_port = free_port(), free_port()
        command = partial(wasisup, wasm=hello, workers=args.workers, reuse=1000)
        with (server(command(plain_port), plain_port),
              server(command(tls_port, options=("--certfile", str(cert), "--keyfile", str(key))),
                     tls_port)):
            cases = (("HTTP, kept connections", f"http://127.0.0.1:{plain_port}/", {}),
                     ("HTTPS, kept connections", f"https://127.0.0.1:{tls_port}/", {}),
                     ("HTTP, a connection per request", f"http://127.0.0.1:{plain_port}/",
                      {"Connection": "close"}),
                     ("HTTPS, a handshake per request", f"https://127.0.0.1:{tls_port}/",
                      {"Connection": "close"}))
            for _, url, headers in cases:  # warm-up
                wrk(url, 1, CLIENTS, headers)
            loads = [wrk(url, args.seconds, CLIENTS, headers) for _, url, headers in cases]
    base = loads[0].rps
    for (label, _, _), load in zip(cases, loads):
        rows.append((label, f"{load.rps:,.0f}", f"{load.rps / args.workers:,.0f}",
                     f"{load.rps / base:.2f}x", f"{load.errors:,}"))
    print_table(f"TLS on {os.cpu_count()} cores: the hello guest, wasisup -w {args.workers} "
                f"(wrk -t2 -c{CLIENTS}, {args.seconds:g}s a case; TLS 1.3, EC P-256)",
                ("case", "req/s", "per worker", "vs HTTP kept", "errors"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per case")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="wasisup -w")
    args = parser.parse_args()
    run_cleanly(partial(run, args))


if __name__ == "__main__":
    main()
