"""The ``wasisup`` command: serve a wasi:http/proxy component, or precompile one."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from .compile import CompileError, compile_component, compiled, is_precompiled
from .http.client import OutboundClient
from .http.handler import GuestHandler
from .http.server import Limits, Server
from .runtime import Runtime
from .wasi.linker import LinkError

log = logging.getLogger("wasisup")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bind address {value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_env(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env {value!r} is not KEY=VALUE")
    return key, val


def listen(address: tuple[str, int], backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot bind {address[0]}:{address[1]}: {exc.strerror}") from None
    sock.listen(backlog)
    return sock


def resolve_component(path: Path) -> Path:
    """A loadable .cwasm for ``path``: compiled (once, cached) when it is a .wasm."""
    if not path.is_file():
        raise UsageError(f"component {path} does not exist")
    return path if is_precompiled(path) else compiled(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wasisup", description=__doc__)
    parser.add_argument("component", type=Path, help="a wasi:http/proxy component (.wasm or .cwasm)")
    parser.add_argument("-b", "--bind", action="append", type=parse_bind, default=[],
                        help="HOST:PORT to listen on (repeatable; default 127.0.0.1:8000)")
    parser.add_argument("--threads", type=int, default=4, help="request threads (default 4)")
    parser.add_argument("--env", action="append", type=parse_env, default=[],
                        help="KEY=VALUE in the guest's environment (repeatable)")
    parser.add_argument("--max-instance-reuse", type=int, default=1,
                        help="requests one guest instance serves before a fresh one (default 1)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical"])
    return parser


def compile_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="wasisup compile",
                                     description="Precompile a component to a .cwasm.")
    parser.add_argument("input", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"{args.input} does not exist")
    compile_component(args.input, args.output)
    return 0


def serve_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    cwasm = resolve_component(args.component)
    runtime = Runtime(cwasm, args.env, OutboundClient(), args.max_instance_reuse)
    listeners = [listen(address) for address in args.bind or [("127.0.0.1", 8000)]]
    server = Server(listeners, GuestHandler(runtime), threads=args.threads, limits=Limits())
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, lambda *_: server.stop())
    for sock in listeners:
        host, port = sock.getsockname()[:2]
        log.info("serving %s on http://%s:%d", args.component.name, host, port)
    server.serve()
    runtime.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compile"]:
            return compile_main(argv[1:])
        return serve_main(argv)
    except (UsageError, CompileError, LinkError) as exc:
        print(f"wasisup: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
