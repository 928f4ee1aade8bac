"""Compile a component once to a serialized ``.cwasm``, cached by what makes it valid.

wasmtime compiles on a thread pool, and a forked process that compiles again hangs, so the
compile always runs in a child process (``python -m wasisup compile``); servers only ever
``deserialize_file`` (an mmap whose pages the page cache shares between workers).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from wasmtime import Config, Engine, WasmtimeError
from wasmtime.component import Component

WASMTIME_VERSION = importlib.metadata.version("wasmtime")
CWASM_MAGIC = b"\x7fELF"


class CompileError(Exception):
    """A component that cannot be compiled or loaded; the message says why and what to do."""


def engine_config() -> Config:
    """The engine settings every process uses: a .cwasm is only valid for the same ones."""
    config = Config()
    config.epoch_interruption = True  # request deadlines
    return config


ENGINE_SETTINGS = "epoch-interruption"


def is_precompiled(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == CWASM_MAGIC


def cache_key(wasm: Path) -> str:
    digest = hashlib.sha256()
    with open(wasm, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"|wasmtime-py {WASMTIME_VERSION}|{ENGINE_SETTINGS}".encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("WASISUP_CACHE") or Path.home() / ".cache" / "wasisup"
    return Path(base) / "cwasm"


def compile_component(wasm: Path, out: Path) -> None:
    """Compile in this process (the ``wasisup compile`` command); written atomically."""
    try:
        component = Component(Engine(engine_config()), wasm.read_bytes())
    except WasmtimeError as exc:
        raise CompileError(f"{wasm} is not a valid WebAssembly component: {_first_line(exc)}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=out.name, delete=False) as tmp:
        tmp.write(component.serialize())
    os.replace(tmp.name, out)


def compiled(wasm: Path, cache_dir: Path | None = None) -> Path:
    """The .cwasm for ``wasm``: from the cache, else compiled in a child process."""
    cache_dir = cache_dir or default_cache_dir()
    out = cache_dir / f"{wasm.stem}-{cache_key(wasm)[:32]}.cwasm"
    if out.exists():
        return out
    proc = subprocess.run([sys.executable, "-m", "wasisup", "compile", str(wasm), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()
        raise CompileError(message[-1] if message else f"compiling {wasm} failed")
    return out


def load(engine: Engine, path: Path) -> Component:
    """Deserialize a .cwasm, turning wasmtime's complaints into one clear line."""
    try:
        return Component.deserialize_file(engine, str(path))
    except WasmtimeError as exc:
        raise CompileError(
            f"{path} cannot be loaded by this wasmtime ({WASMTIME_VERSION}): {_first_line(exc)}; "
            f"recompile it with `wasisup compile` or serve the .wasm") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
