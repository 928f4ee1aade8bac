"""Compile a component once to a serialized ``.cwasm``, cached by what makes it valid.

wasmtime compiles on a thread pool, and a forked process that compiles again hangs, so the
compile always runs in a child process (``python -m wasisup compile``); servers only ever
``deserialize_file`` (an mmap whose pages the page cache shares between workers).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from wasmtime import Config, Engine, WasmtimeError
from wasmtime.component import Component

from . import __version__

WASMTIME_VERSION = importlib.metadata.version("wasmtime")
CWASM_MAGIC = b"\x7fELF"
WASM_MAGIC = b"\0asm"
CORE_MODULE_VERSION = b"\x01\0\0\0"


class CompileError(Exception):
    """A component that cannot be compiled or loaded; the message says why and what to do."""


T = TypeVar("T")


def engine_config() -> Config:
    """The engine settings every process uses: a .cwasm is only valid for the same ones."""
    config = Config()
    config.epoch_interruption = True  # request deadlines
    return config


ENGINE_SETTINGS = "epoch-interruption"


def component_kind(path: Path) -> str:
    """"wasm" (a component) or "cwasm" (precompiled), told by the first bytes; anything else
    is a CompileError saying what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CompileError(f"component {path} does not exist") from None
    except IsADirectoryError:
        raise CompileError(f"component {path} is a directory: name the .wasm or .cwasm file "
                           "itself") from None
    except OSError as exc:
        raise CompileError(f"cannot read component {path}: {exc.strerror}") from None
    if head[:4] == CWASM_MAGIC:
        return "cwasm"
    if head[:4] != WASM_MAGIC:
        raise CompileError(f"{path} is not a WebAssembly binary: neither a component (.wasm) "
                           "nor a precompiled one (.cwasm, from `wasisup compile`)")
    if head[4:8] == CORE_MODULE_VERSION:
        raise CompileError(f"{path} is a core WebAssembly module, not a component: build a "
                           "wasi:http/proxy component (e.g. componentize-py, jco, cargo-component)")
    return "wasm"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("WASISUP_CACHE") or Path.home() / ".cache" / "wasisup"
    return Path(base) / "cwasm"


def compile_component(wasm: Path, out: Path, verify: Callable[[Path], T]) -> T:
    """Compile in this process (the ``wasisup compile`` command). The file appears at ``out``
    only once ``verify`` accepted it, written atomically: no half-written or broken .cwasm is
    ever left behind, in the cache or anywhere else."""
    if component_kind(wasm) == "cwasm":
        raise CompileError(f"{wasm} is precompiled already: serve it as it is")
    try:
        component = Component(Engine(engine_config()), wasm.read_bytes())
    except WasmtimeError as exc:
        raise CompileError(f"{wasm} is not a valid WebAssembly component: {_first_line(exc)}") from None
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=out.name, delete=False) as tmp:
        tmp.write(component.serialize())
    try:
        verified = verify(Path(tmp.name))
    except BaseException:
        os.unlink(tmp.name)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o644 & ~umask)  # readable like any file we write, not 0600
    os.replace(tmp.name, out)
    return verified


@dataclass(frozen=True)
class Prepared:
    """A component ready for workers to load."""

    cwasm: Path
    sha256: str  # of the file the user named
    compile_seconds: float  # 0 when it came precompiled or from the cache


def prepare(path: Path, cache_dir: Path | None = None,
            announce: Callable[[str], None] = lambda message: None) -> Prepared:
    """Compile (once, cached) and check ``path`` in a child process, never in this one;
    ``announce`` is told before a compile (it takes seconds)."""
    kind = component_kind(path)
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise CompileError(f"cannot read component {path}: {exc.strerror}") from None
    if kind == "cwasm":
        _child("check", str(path))
        return Prepared(path, digest, 0.0)
    # Only checked files enter the cache, and this host's version is in the key: a hit links.
    key = hashlib.sha256(f"{digest}|wasisup {__version__}|wasmtime-py {WASMTIME_VERSION}|"
                         f"{ENGINE_SETTINGS}".encode())
    cache, name = cache_dir or default_cache_dir(), key.hexdigest()[:32]
    cached = next(cache.glob(f"*-{name}.cwasm"), None)  # the same bytes under any file name
    if cached is not None:
        return Prepared(cached, digest, 0.0)
    out = cache / f"{path.stem}-{name}.cwasm"
    announce(f"compiling {path} for this machine (once: the result is cached in {cache})")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompileError(f"cannot create the compile cache {cache}: {exc.strerror} "
                           "($WASISUP_CACHE chooses another place)") from None
    started = time.monotonic()
    _child("compile", str(path), "-o", str(out))
    return Prepared(out, digest, time.monotonic() - started)


def _child(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "wasisup", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        message = lines[-1] if lines else f"wasisup {args[0]} failed"
        raise CompileError(message.removeprefix("wasisup: error: "))


def load(engine: Engine, path: Path) -> Component:
    """Deserialize a .cwasm, turning wasmtime's complaints into one clear line."""
    try:
        return Component.deserialize_file(engine, str(path))
    except WasmtimeError as exc:
        if "pooling allocator" in str(exc):  # beyond the engine's pool: the caller's to handle
            raise
        raise CompileError(
            f"{path} was precompiled for another wasmtime or other engine settings "
            f"({_root_cause(exc)}); this is wasmtime {WASMTIME_VERSION} with {ENGINE_SETTINGS}: "
            "precompile it with `wasisup compile IN.wasm -o OUT.cwasm`, or serve the .wasm"
        ) from None


def _root_cause(exc: Exception) -> str:
    """wasmtime's reason: the first line under "Caused by:", without its "0: " numbering."""
    text = str(exc)
    _, found, causes = text.partition("Caused by:")
    lines = [line.strip() for line in (causes if found else text).splitlines() if line.strip()]
    return re.sub(r"^\d+: ", "", lines[0]) if lines else type(exc).__name__


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
