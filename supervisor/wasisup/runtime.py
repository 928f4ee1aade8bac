"""One process's wasmtime state: the engine, the component, its linker, and guest instances.

Each request runs ``wasi:http/incoming-handler.handle`` in a Store: a fresh one by default,
or one reused for up to ``max_instance_reuse`` requests. Wasm runs with the GIL released.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from wasmtime import Engine, Store, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import Linker

from .compile import CompileError, engine_config, load
from .wasi import abi
from .wasi.context import WasiContext
from .wasi.linker import LinkError, link

log = logging.getLogger("wasisup.runtime")

HANDLER_INTERFACE = "wasi:http/incoming-handler"
NO_DEADLINE = 1 << 62


class GuestTrap(Exception):
    """The guest trapped (or exited) while handling a request."""


class Guest:
    """A component instance in its own Store, ready to handle requests."""

    def __init__(self, runtime: "Runtime") -> None:
        self.context = WasiContext(runtime.env, runtime.outbound)
        self.store = Store(runtime.engine)
        self.store.set_epoch_deadline(NO_DEADLINE)
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
            raise GuestTrap(f"instantiating the component failed: {exc}") from None
        if func is None:
            self.close()
            raise LinkError(f"{runtime.handler_export} exports no `handle` function")
        self._func = func._func

    def handle(self, request: abi.Resource, outparam: abi.Resource, request_id: str) -> None:
        """Run the guest's handler; raises GuestTrap if it traps (the instance is then spent)."""
        self.uses += 1
        self.context.request_id = request_id
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
                raise GuestTrap(_trap_message(WasmtimeError._from_ptr(error)))
        finally:
            self.context.end_request()

    def close(self) -> None:
        abi.STORES.pop(self.ctx, None)
        self.context.close()
        self.store = None  # type: ignore[assignment]


def _trap_message(error: WasmtimeError) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    detail = next((l.strip() for l in lines if "trap" in l.lower() or "error" in l.lower()), None)
    return " / ".join(dict.fromkeys(filter(None, [lines[0] if lines else "trap", detail])))


class Runtime:
    """Loads a compiled component once per process and hands out guest instances."""

    def __init__(self, cwasm: Path, env: list[tuple[str, str]], outbound: Any,
                 max_instance_reuse: int = 1) -> None:
        self.engine = Engine(engine_config())
        self.component = load(self.engine, cwasm)
        self.env = env
        self.outbound = outbound
        self.max_instance_reuse = max(1, max_instance_reuse)
        self.handler_export = self._find_handler()
        self.linker = Linker(self.engine)
        link(self.linker, self.component, self.engine)
        self._idle: list[Guest] = []
        self._lock = threading.Lock()

    def _find_handler(self) -> str:
        for name in self.component.type.exports(self.engine):
            if name.split("@")[0] == HANDLER_INTERFACE:
                return name
        raise CompileError("the component does not export wasi:http/incoming-handler: "
                           "build it for the wasi:http/proxy world")

    @contextmanager
    def guest(self) -> Iterator[Guest]:
        """An instance for one request: reused while healthy and under the reuse limit."""
        guest: Optional[Guest] = None
        with self._lock:
            if self._idle:
                guest = self._idle.pop()
        if guest is None:
            guest = Guest(self)
        try:
            yield guest
        finally:
            if guest.healthy and guest.uses < self.max_instance_reuse:
                with self._lock:
                    self._idle.append(guest)
            else:
                guest.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for guest in idle:
            guest.close()
