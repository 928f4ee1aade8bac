"""Host-call micro-benchmark: wasmtime-py's generic ``add_func`` path vs wasisup's trampoline.

A componentize-py guest (bench/hostcall) calls an imported host function in a loop:
``noop()`` for the cost of a call, ``take(list<u8>)`` and ``give(len) -> list<u8>`` for bytes
moved guest->host and host->guest. The guest loop is the same on both sides, so the
difference between the columns is the host-call path.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from wasmtime import Engine, Store
from wasmtime.component import Component, Linker

from wasisup import capi
from wasisup.compile import engine_config
from wasisup.wasi import abi
from wasisup.wasi.context import WasiContext
from wasisup.wasi.linker import link

BENCH_INTERFACE = "wasisup:bench/host"


def _host_functions() -> dict[str, Callable]:
    blobs: dict[int, bytes] = {}

    def give(size: int) -> bytes:
        if size not in blobs:
            blobs[size] = bytes(size)
        return blobs[size]

    return {"noop": lambda: None, "take": lambda data: None, "give": give}


def _instance(component: Component, engine: Engine, fast: bool):
    """Instantiate with the bench interface bound the generic or the fast way."""
    linker = Linker(engine)
    funcs = _host_functions()
    types = component.type.imports(engine)[BENCH_INTERFACE].ty.exports(engine)
    with linker.root() as root, root.add_instance(BENCH_INTERFACE) as instance:
        for name, func in funcs.items():
            if fast:
                fty = types[name].ty
                abi.add_function(instance.ptr(), name, abi.host_function(
                    f"{BENCH_INTERFACE}#{name}", lambda store, *a, f=func: f(*a),
                    [t for _, t in fty.params], fty.result))
            else:
                instance.add_func(name, lambda store, *a, f=func: f(*a))
    link(linker, component, engine, provided={BENCH_INTERFACE})
    store = Store(engine)
    store.set_epoch_deadline(1 << 62)
    context = WasiContext([], None)
    abi.STORES[capi.context_address(store)] = context
    instance = capi.instantiate(linker, store, component, lambda: None)
    func = instance.get_func(store, "run")
    return store, lambda store, *args: capi.call(func, store, *args)


def measure(component: Component, engine: Engine, fast: bool, op: str, size: int,
            budget: float = 1.0) -> float:
    """Seconds per call of ``op`` (with ``size`` bytes), over about ``budget`` seconds."""
    store, run = _instance(component, engine, fast)
    run(store, op, 1, size)
    iterations, elapsed = 1, 0.0
    while elapsed < budget / 4:
        iterations *= 4
        start = time.perf_counter()
        run(store, op, iterations, size)
        elapsed = time.perf_counter() - start
    return elapsed / iterations


def table(wasm: Path) -> list[tuple[str, str, str, str]]:
    engine = Engine(engine_config())
    component = Component.from_file(engine, str(wasm))
    rows = []
    call_generic = measure(component, engine, False, "noop", 0)
    call_fast = measure(component, engine, True, "noop", 0)
    rows.append(("host call, ns", f"{call_generic * 1e9:,.0f}", f"{call_fast * 1e9:,.0f}",
                 f"{call_generic / call_fast:.1f}x"))
    for op, direction in (("take", "guest->host"), ("give", "host->guest")):
        for size, label in ((64 * 1024, "64 KiB"), (1024 * 1024, "1 MiB")):
            generic = size / measure(component, engine, False, op, size, budget=0.5) / 1e6
            fast = size / measure(component, engine, True, op, size) / 1e6
            rows.append((f"list<u8> {direction} {label}, MB/s", f"{generic:,.1f}", f"{fast:,.0f}",
                         f"{fast / generic:.0f}x"))
    return rows


if __name__ == "__main__":
    for row in table(Path(sys.argv[1])):
        print(" | ".join(row))
