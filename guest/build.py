"""Build guest components, cached by content hash.

    python guest/build.py DIR [DIR ...]      build each, print the .wasm paths
    python guest/build.py DIR -o OUT.wasm    build one, copy it to OUT

A directory with ``app.py`` is a Python guest (componentize-py); one with ``app.js`` is a
JavaScript guest (jco + ComponentizeJS, installed from npm on first use). Both target the
``wasi:http/proxy`` world, with WIT from the spin-sdk wheel; a directory with its own ``wit/``
is built for the world named like the directory instead. Outputs go to
``$WASISUP_CACHE/guests`` (default ``~/.cache/wasisup``), keyed by a hash of the sources and
the toolchain, so an unchanged guest is never rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

JCO = "@bytecodealliance/jco@1.15.0"
COMPONENTIZE_JS = "@bytecodealliance/componentize-js@0.18.4"
# componentize-py builds against the newest 0.2.x the spin-sdk wheel carries; jco 1.15 can
# only find the incoming-handler export at 0.2.3.
PYTHON_WASI = "0.2.6"
JS_WASI = "0.2.3"
WASI_PACKAGES = ("cli", "clocks", "filesystem", "http", "io", "random", "sockets")


class BuildError(Exception):
    """A guest that could not be built; the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("WASISUP_CACHE") or Path.home() / ".cache" / "wasisup"
    return Path(base)


def _spin_wit() -> Path:
    spec = importlib.util.find_spec("spin_sdk")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("spin-sdk is not installed (pip install -e '.[dev]'): it carries the WASI WIT")
    return Path(next(iter(spec.submodule_search_locations))) / "wit" / "deps"


def _proxy_wit(into: Path, version: str) -> Path:
    """A WIT package whose world ``proxy`` includes wasi:http/proxy@version."""
    deps = into / "deps"
    for package in WASI_PACKAGES:
        shutil.copytree(_spin_wit() / f"{package}@{version}", deps / f"{package}@{version}")
    (into / "world.wit").write_text(
        f"package wasisup:guest;\n\nworld proxy {{\n  include wasi:http/proxy@{version};\n}}\n")
    return into


def _digest(src: Path, toolchain: str) -> str:
    digest = hashlib.sha256(toolchain.encode())
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")


def _componentize_py() -> list[str]:
    script = Path(sys.executable).with_name("componentize-py")
    if not script.exists():
        raise BuildError("componentize-py is not installed (pip install -e '.[dev]')")
    return [str(script)]


def _jco() -> Path:
    """jco and ComponentizeJS, installed once into the cache."""
    prefix = cache_dir() / "npm"
    jco = prefix / "node_modules" / ".bin" / "jco"
    if not jco.exists():
        if shutil.which("npm") is None:
            raise BuildError("npm is needed for JavaScript guests (apt-get install npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        _run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(prefix),
              JCO, COMPONENTIZE_JS], "npm install jco")
    return jco


def build(src: Path) -> Path:
    """The built component for the guest in ``src`` (from the cache when unchanged)."""
    src = src.resolve()
    python_guest = (src / "app.py").exists()
    if not python_guest and not (src / "app.js").exists():
        raise BuildError(f"{src} has neither app.py nor app.js")
    own_wit = src / "wit"
    if python_guest:
        toolchain = f"componentize-py {importlib.metadata.version('componentize-py')} wasi {PYTHON_WASI}"
    else:
        toolchain = f"{JCO} {COMPONENTIZE_JS} wasi {JS_WASI}"
    out = cache_dir() / "guests" / f"{src.name}-{_digest(src, toolchain)}.wasm"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wasisup-guest-") as tmp:
        work = Path(tmp)
        if own_wit.is_dir():
            wit, world = own_wit, src.name
        else:
            wit, world = _proxy_wit(work / "wit", PYTHON_WASI if python_guest else JS_WASI), "proxy"
        built = work / "guest.wasm"
        if python_guest:
            _run([*_componentize_py(), "-d", str(wit), "-w", world, "componentize",
                  "-p", str(src), "app", "-o", str(built)], f"componentize-py {src.name}", cwd=work)
        else:
            _run([str(_jco()), "componentize", str(src / "app.js"), "--wit", str(wit),
                  "--world-name", world, "-o", str(built)], f"jco componentize {src.name}", cwd=work)
        staged = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="guest directories")
    parser.add_argument("-o", "--output", type=Path, help="copy the (single) result here")
    args = parser.parse_args(argv)
    if args.output and len(args.dirs) != 1:
        parser.error("-o takes exactly one guest directory")
    try:
        for src in args.dirs:
            built = build(src)
            if args.output:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built, args.output)
                built = args.output
            print(built)
    except BuildError as exc:
        print(f"build: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
