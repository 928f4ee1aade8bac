"""One process's wasmtime state: the engine, the component, its linker, and guest instances.

Each request runs ``wasi:http/incoming-handler.handle`` in a Store: a fresh one by default,
or one reused for up to ``max_instance_reuse`` requests. Wasm runs with the GIL released.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from wasmtime import Engine, Store, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import Linker

from .compile import CompileError, engine_config, load
from .wasi import abi
from .wasi.context import WasiContext
from .wasi.io import DEADLINE_EXCEEDED
from .wasi.linker import LinkError, link

log = logging.getLogger("wasisup.runtime")

HANDLER_INTERFACE = "wasi:http/incoming-handler"
NO_DEADLINE = 1 << 62
EPOCH_TICK = 0.01  # seconds per engine epoch: the resolution of request deadlines


class GuestTrap(Exception):
    """The guest trapped (or exited) while handling a request; ``kind`` says how."""

    def __init__(self, message: str, kind: str = "trap") -> None:
        super().__init__(message)
        self.kind = kind  # "trap", "timeout" (deadline) or "instantiation"


def _trap_kind(message: str) -> str:
    return "timeout" if "interrupt" in message or DEADLINE_EXCEEDED in message else "trap"


class Guest:
    """A component instance in its own Store, ready to handle requests."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.context = WasiContext(runtime.env, runtime.outbound)
        self.store = Store(runtime.engine)
        self.store.set_epoch_deadline(NO_DEADLINE)
        if runtime.max_memory:
            self.store.set_limits(memory_size=runtime.max_memory)
        self.ctx = ctypes.cast(self.store._context(), ctypes.c_void_p).value
        abi.STORES[self.ctx] = self.context
        self.uses = 0
        self.healthy = True
        try:
            instance = runtime.linker.instantiate(self.store, runtime.component)
            export = instance.get_export_index(self.store, runtime.handler_export)
            handle_index = instance.get_export_index(self.store, "handle", export)
            func = instance.get_func(self.store, handle_index) if handle_index else None
        except WasmtimeError as exc:
            self.close()
            raise GuestTrap(f"instantiating the component failed: {_trap_message(exc)}",
                            "instantiation") from None
        if func is None:
            self.close()
            raise LinkError(f"{runtime.handler_export} exports no `handle` function")
        self._func = func._func

    def handle(self, request: abi.Resource, outparam: abi.Resource, request_id: str) -> None:
        """Run the guest's handler; raises GuestTrap if it traps (the instance is then spent)."""
        self.uses += 1
        self.context.request_id = request_id
        timeout = self.runtime.request_timeout
        if timeout:
            self.store.set_epoch_deadline(max(1, round(timeout / EPOCH_TICK)))
            self.context.waiter.deadline = time.monotonic_ns() + int(timeout * 1e9)
        params = (ffi.wasmtime_component_val_t * 2)()
        for i, resource in enumerate((request, outparam)):
            abi.lower_resource(resource, ctypes.addressof(params[i]), self.context, self.ctx)
        try:
            error = ffi.wasmtime_component_func_call(ctypes.byref(self._func), self.store._context(),
                                                     params, 2, None, 0)
            if not error:
                error = ffi.wasmtime_component_func_post_return(ctypes.byref(self._func),
                                                                self.store._context())
            if error:
                self.healthy = False
                message = _trap_message(WasmtimeError._from_ptr(error))
                raise GuestTrap(message, _trap_kind(message))
        finally:
            self.context.waiter.deadline = None
            self.context.end_request()

    def close(self) -> None:
        abi.STORES.pop(self.ctx, None)
        self.context.close()
        self.store = None  # type: ignore[assignment]


def _trap_message(error: WasmtimeError) -> str:
    """The root cause of a trap (wasmtime puts it under "Caused by:", after the backtrace)."""
    text = str(error)
    _, found, cause = text.partition("Caused by:")
    lines = [line.strip() for line in (cause if found else text).splitlines() if line.strip()]
    return lines[0] if lines else "trap"


class Runtime:
    """Loads a compiled component once per process and hands out guest instances."""

    def __init__(self, cwasm: Path, env: list[tuple[str, str]], outbound: Any,
                 max_instance_reuse: int = 1, request_timeout: float = 0, max_memory: int = 0,
                 metrics: Any = None) -> None:
        self.engine = Engine(engine_config())
        self.component = load(self.engine, cwasm)
        self.env = env
        self.outbound = outbound
        self.max_instance_reuse = max(1, max_instance_reuse)
        self.request_timeout = request_timeout
        self.max_memory = max_memory
        self.metrics = metrics
        if request_timeout:
            threading.Thread(target=self._tick_epochs, daemon=True, name="wasisup-epoch").start()
        self.handler_export = self._find_handler()
        self.linker = Linker(self.engine)
        link(self.linker, self.component, self.engine)
        self._local = threading.local()
        self._all_idle: list[list[Guest]] = []  # every thread's idle list, for close()
        self._lock = threading.Lock()

    def _tick_epochs(self) -> None:
        """Advance the engine's epoch: wasm past its Store's deadline traps (--request-timeout)."""
        while True:
            time.sleep(EPOCH_TICK)
            self.engine.increment_epoch()

    def _find_handler(self) -> str:
        for name in self.component.type.exports(self.engine):
            if name.split("@")[0] == HANDLER_INTERFACE:
                return name
        raise CompileError("the component does not export wasi:http/incoming-handler: "
                           "build it for the wasi:http/proxy world")

    @contextmanager
    def guest(self) -> Iterator[Guest]:
        """An instance for one request: reused while healthy and under the reuse limit.

        Idle instances are kept per thread: a Store that stays on one thread stays in that
        core's caches (moving it between threads doubles a small request's cost).
        """
        idle = self._idle_here()
        guest = idle.pop() if idle else None
        if guest is None:
            started = time.monotonic()
            guest = Guest(self)
            if self.metrics is not None:
                self.metrics.instantiations.inc()
                self.metrics.instantiation_seconds.observe(time.monotonic() - started)
        try:
            yield guest
        finally:
            if guest.healthy and guest.uses < self.max_instance_reuse:
                idle.append(guest)
            else:
                guest.close()

    def _idle_here(self) -> list[Guest]:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = []
            with self._lock:
                self._all_idle.append(idle)
        return idle

    def close(self) -> None:
        with self._lock:
            lists, self._all_idle = self._all_idle, []
        for idle in lists:
            while idle:
                idle.pop().close()
