"""The ``wasisup`` command: serve a wasi:http/proxy component, or precompile one.

    wasisup [OPTIONS] COMPONENT             serve (see ``wasisup --help``)
    wasisup compile IN.wasm [-o OUT.cwasm]  precompile for this wasmtime and engine settings
    wasisup check FILE.cwasm                check that a .cwasm loads and links here

Bad input is reported as one line, ``wasisup: error: ...``, with exit status 2; ``compile``
and ``check`` say in one line what they wrote or checked.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import metrics
from .compile import (ENGINE_SETTINGS, WASMTIME_VERSION, CompileError, compile_component,
                      component_kind)
from .usage import Parser, UsageError, check_startup
from .wasi.linker import LinkError


def check(cwasm: Path, named: Path) -> str:
    """Load and link ``cwasm`` as a worker would; say what it serves. Errors name ``named``."""
    from .runtime import Runtime

    try:
        runtime = Runtime(cwasm, [], None)
    except (CompileError, LinkError) as exc:
        message = str(exc)  # the linker's words do not name the file; wasmtime's do
        raise CompileError(message if message.startswith(str(named)) else f"{named}: {message}")
    imports = len(runtime.component.type.imports(runtime.engine))
    runtime.close()
    return (f"exports {runtime.handler_export}, its {imports} imported interfaces linked "
            f"(wasmtime {WASMTIME_VERSION}, {ENGINE_SETTINGS})")


def compile_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="wasisup compile",
                    description="Precompile a component to a .cwasm for this wasmtime and engine "
                                "settings: wasisup OUT.cwasm then serves it without compiling.")
    parser.add_argument("input", type=Path, metavar="IN.wasm", help="the component")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.cwasm",
                        help="the file to write (default: IN.cwasm, beside IN.wasm)")
    args = parser.parse_args(argv)
    args.output = args.output or args.input.with_suffix(".cwasm")
    if args.output.is_dir():
        raise UsageError(f"-o {args.output} is a directory: give a file name, "
                         f"e.g. {args.output / args.input.with_suffix('.cwasm').name}")
    if not args.output.parent.is_dir():
        raise UsageError(f"-o {args.output}: directory {args.output.parent} does not exist: "
                         "create it, or write elsewhere")
    started = time.monotonic()
    try:
        found = compile_component(args.input, args.output, lambda cwasm: check(cwasm, args.input))
    except OSError as exc:
        raise CompileError(f"cannot write {args.output}: {exc.strerror}") from None
    seconds = time.monotonic() - started
    size = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({size:.1f} MB) in {seconds:.1f} s: {found}")
    return 0


def check_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="wasisup check",
                    description="Check that a .cwasm loads and links here, as a worker would.")
    parser.add_argument("cwasm", type=Path, metavar="FILE.cwasm",
                        help="a precompiled component, from wasisup compile")
    cwasm = parser.parse_args(argv).cwasm
    if component_kind(cwasm) == "wasm":
        raise CompileError(f"{cwasm} is a .wasm, not a precompiled .cwasm: precompile it with "
                           f"`wasisup compile {cwasm} -o OUT.cwasm`, or serve it as it is")
    print(f"{cwasm}: ok, {check(cwasm, cwasm)}")
    return 0


COMMANDS = {"compile": compile_main, "check": check_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_startup(argv)
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        try:
            metrics.setup()
        except OSError as exc:
            raise UsageError(f"cannot use the metrics directory (${metrics.ENV}): {exc}") from None
        from .app import WasiApplication  # (gunicorn, which check_startup had to come before)

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
