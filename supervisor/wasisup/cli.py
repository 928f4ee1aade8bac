"""The ``wasisup`` command: serve a wasi:http/proxy component, or precompile one.

    wasisup [OPTIONS] COMPONENT             serve (see ``wasisup --help``)
    wasisup compile IN.wasm -o OUT.cwasm    precompile for this wasmtime and engine settings
    wasisup check COMPONENT.cwasm           verify a .cwasm loads and links here

Bad input is reported as one line, ``wasisup: error: ...``, with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from . import metrics
from .app import Parser, UsageError, WasiApplication
from .compile import CompileError, compile_component
from .wasi.linker import LinkError


def check(cwasm: Path) -> None:
    """Load and link ``cwasm`` as a worker would; raises CompileError/LinkError if it can't."""
    from .runtime import Runtime

    Runtime(cwasm, [], None).close()


def compile_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="wasisup compile", description="Precompile a component to a .cwasm.")
    parser.add_argument("input", type=Path, help="the component (.wasm)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .cwasm to write")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        raise UsageError(f"{args.input} does not exist")
    compile_component(args.input, args.output)
    try:
        check(args.output)
    except (CompileError, LinkError):
        args.output.unlink()
        raise
    return 0


def check_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="wasisup check", description="Check a .cwasm loads and links here.")
    parser.add_argument("cwasm", type=Path)
    check(parser.parse_args(argv).cwasm)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compile"]:
            return compile_main(argv[1:])
        if argv[:1] == ["check"]:
            return check_main(argv[1:])
        try:
            metrics.setup()
        except OSError as exc:
            raise UsageError(f"cannot use the metrics directory (${metrics.ENV}): {exc}") from None
        try:
            WasiApplication(argv).run()
        finally:
            metrics.cleanup()
        return 0
    except (UsageError, CompileError, LinkError) as exc:
        print(f"wasisup: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
