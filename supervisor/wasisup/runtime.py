"""One process's wasmtime state: the engine, the component, its linker, and guest instances.

Each request runs ``wasi:http/incoming-handler.handle`` in a Store: a fresh one by default,
or one reused for up to ``max_instance_reuse`` requests. Wasm runs with the GIL released.
Instances come from wasmtime's pooling allocator (copy-on-write memory images), as in
`wasmtime serve`, and a request thread prepares its next one while it waits for work.

Two limits interrupt wasm (epoch interruption): the request's deadline (``request_timeout``),
and ``compute_timeout``, the longest a guest may run without waiting for I/O — a guest stuck
in a loop gets a 504, a guest streaming a long download keeps going.

``wasm_parallelism`` can make a worker's request threads take turns running guests
(``RunSlot``): a guest holds a turn while it runs, gives it up whenever it waits for I/O, and
passes it on every epoch tick while it computes. Wasm runs without the GIL but every host call
takes it back, so guests running side by side hand the GIL to each other at every host call
when the worker has cores to run them on at the same moment (one worker, four threads, 2
cores: ~32 context switches a small request; ~9 in turns).
"""

from __future__ import annotations

import ctypes
import logging
import resource
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from wasmtime import Config, Engine, Store, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import Linker

from .compile import CompileError, engine_config, load
from .wasi import abi
from .wasi.context import WasiContext
from .wasi.io import DEADLINE_EXCEEDED
from .wasi.linker import LinkError, link

log = logging.getLogger("wasisup.runtime")

HANDLER_INTERFACE = "wasi:http/incoming-handler"
EPOCH_TICK = 0.05  # seconds per engine epoch: the resolution of the wasm time limits
# Per-component bounds of the pooling allocator: roomy for what toolchains emit today
# (componentize-py: a few dozen core instances, a handful of memories and tables). A
# component beyond them is served with on-demand allocation instead.
POOL_CORE_INSTANCES_PER_COMPONENT = 64
POOL_MEMORIES_PER_COMPONENT = 8
POOL_TABLES_PER_COMPONENT = 8
POOL_TABLE_ELEMENTS = 100_000
# What a Store's epoch-deadline callback tells wasmtime: carry on (sync mode cannot yield).
UPDATE_DEADLINE_CONTINUE = 0


class GuestTrap(Exception):
    """The guest trapped (or exited) while handling a request; ``kind`` says how."""

    def __init__(self, message: str, kind: str = "trap") -> None:
        super().__init__(message)
        self.kind = kind  # "trap", "timeout" (a time limit) or "instantiation"


def pooling_config(instances: int) -> Config:
    """``engine_config()`` with wasmtime's pooling allocator, for ``instances`` live instances."""
    config = engine_config()
    pool = ffi.wasmtime_pooling_allocation_config_new()
    for setter, value in (
        ("total_component_instances", instances),
        ("total_core_instances", instances * POOL_CORE_INSTANCES_PER_COMPONENT),
        ("total_memories", instances * POOL_MEMORIES_PER_COMPONENT),
        ("total_tables", instances * POOL_TABLES_PER_COMPONENT),
        ("total_stacks", instances),
        ("max_core_instances_per_component", POOL_CORE_INSTANCES_PER_COMPONENT),
        ("max_memories_per_component", POOL_MEMORIES_PER_COMPONENT),
        ("max_tables_per_component", POOL_TABLES_PER_COMPONENT),
        ("table_elements", POOL_TABLE_ELEMENTS),
    ):
        getattr(ffi, f"wasmtime_pooling_allocation_config_{setter}_set")(pool, value)
    ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    ffi.wasmtime_pooling_allocation_config_delete(pool)
    return config


class RunSlot:
    """Turns to run guest code: at most ``size`` threads hold one; the others wait in line
    (first come, first served; a turn given up goes straight to the next in line)."""

    def __init__(self, size: int = 1) -> None:
        self._free = size
        self._lock = threading.Lock()
        self._line: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._lock:
            if self._free:
                self._free -= 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._line.append(turn)
        turn.acquire()  # released by the thread that hands its turn over

    def release(self) -> None:
        with self._lock:
            if self._line:
                self._line.popleft().release()
            else:
                self._free += 1

    def pass_on(self) -> None:
        """Let the threads in line run first, then take a turn again."""
        if self._line:
            self.release()
            self.acquire()


class Guest:
    """A component instance in its own Store, ready to handle requests."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.context = WasiContext(runtime.env, runtime.outbound)
        self.store = Store(runtime.engine)
        self.ctx = ctypes.cast(self.store._context(), ctypes.c_void_p).value
        self._limit = "compute"  # the time limit the running wasm is under
        self._limit_at = time.monotonic() + runtime.compute_timeout
        self._has_turn = False
        _GUESTS[self.ctx] = self
        ffi.wasmtime_store_epoch_deadline_callback(self.store.ptr(), _ON_EPOCH_DEADLINE, None,
                                                   _NO_FINALIZER)
        self.store.set_epoch_deadline(1)
        if runtime.max_memory:
            self.store.set_limits(memory_size=runtime.max_memory)
        abi.STORES[self.ctx] = self.context
        self.uses = 0
        self.healthy = True
        self.running_since: Optional[float] = None  # in wasm since (None: idle or waiting)
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

    def _resume(self) -> None:
        """Wasm runs again (at the start, or after the guest waited for I/O), once it is this
        thread's turn: it may compute for ``compute_timeout`` from now, and never past the
        request's deadline."""
        self.runtime.run_slot.acquire()
        self._has_turn = True
        now = time.monotonic()
        self.running_since = now
        self._limit, self._limit_at = "compute", now + self.runtime.compute_timeout
        deadline = self.context.waiter.deadline
        if deadline is not None and deadline / 1e9 < self._limit_at:
            self._limit, self._limit_at = "request", deadline / 1e9

    def _pause(self) -> None:
        self.running_since = None
        if self._has_turn:
            self._has_turn = False
            self.runtime.run_slot.release()

    def on_epoch_deadline(self) -> Optional[str]:
        """At an epoch tick while wasm runs (the deadline is always the next tick, so the
        limits are checked here, not re-armed when wasm resumes): why it must stop, if it
        must; else let the threads waiting for a turn run first."""
        if time.monotonic() >= self._limit_at:
            return "epoch interrupt"
        if self._has_turn:
            self.runtime.run_slot.pass_on()
        return None

    def handle(self, request: abi.Resource, outparam: abi.Resource, request_id: str) -> None:
        """Run the guest's handler; raises GuestTrap if it traps (the instance is then spent)."""
        self.uses += 1
        self.context.request_id = request_id
        waiter = self.context.waiter
        if self.runtime.request_timeout:
            waiter.deadline = time.monotonic_ns() + int(self.runtime.request_timeout * 1e9)
        waiter.on_sleep, waiter.on_wake = self._pause, self._resume
        self._resume()
        try:
            error = abi.call_handler(self._func, self.ctx, request, outparam, self.context)
            if error is not None:
                self.healthy = False
                raise self._trap(_trap_message(error))
        finally:
            self._pause()
            waiter.deadline = None
            self.context.end_request()

    def _trap(self, message: str) -> GuestTrap:
        if DEADLINE_EXCEEDED in message:
            return GuestTrap(message, "timeout")
        if "interrupt" in message:
            if self._limit == "compute":
                return GuestTrap(f"the guest computed for {self.runtime.compute_timeout:g} s "
                                 "without waiting for I/O", "timeout")
            return GuestTrap("the guest passed the request timeout", "timeout")
        return GuestTrap(message)

    def close(self) -> None:
        abi.STORES.pop(self.ctx, None)
        _GUESTS.pop(self.ctx, None)
        self.context.close()
        self.store = None  # type: ignore[assignment]


# Guests by their Store's context address: how the epoch callback finds its Guest.
_GUESTS: dict[int, Guest] = {}


@ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_context_t), ctypes.c_void_p,
                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))
def _ON_EPOCH_DEADLINE(context: Any, data: Any, delta: Any, kind: Any) -> int:
    """wasmtime's epoch-deadline callback: carry on one more tick, or stop the guest (a
    wasmtime error, which traps it)."""
    delta[0] = 1  # (set first: the next tick is armed whatever happens below)
    kind[0] = UPDATE_DEADLINE_CONTINUE
    guest = _GUESTS.get(ctypes.cast(context, ctypes.c_void_p).value)
    stop = guest.on_epoch_deadline() if guest is not None else None
    if stop is not None:
        return ctypes.cast(ffi.wasmtime_error_new(stop.encode()), ctypes.c_void_p).value or 0
    return 0


_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()


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
                 compute_timeout: float = 30.0, threads: int = 1, wasm_parallelism: int = 0,
                 metrics: Any = None) -> None:
        self.env = env
        self.outbound = outbound
        self.max_instance_reuse = max(1, max_instance_reuse)
        self.request_timeout = request_timeout
        self.compute_timeout = compute_timeout
        self.max_memory = max_memory
        self.metrics = metrics
        self._local = threading.local()
        self._all_idle: list[list[Guest]] = []  # every thread's idle list, for close()
        self._running: set[Guest] = set()
        self._lock = threading.Lock()
        self.run_slot = RunSlot(wasm_parallelism or threads)
        # Per thread: one instance running, one idle (reused or prepared), one being replaced.
        try:
            if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
                # The pool reserves address space up front: under a limit, wasmtime would abort.
                raise WasmtimeError("the address space is limited (ulimit -v)")
            self._load(cwasm, pooling_config(threads * 3 + 2))
            Guest(self).close()  # a component beyond the pool's bounds fails here
        except (WasmtimeError, GuestTrap) as exc:
            log.info("%s: guest instances are allocated on demand instead of from a pool",
                     str(exc).splitlines()[0])
            self._load(cwasm, engine_config())
        threading.Thread(target=self._tick_epochs, daemon=True, name="wasisup-epoch").start()

    def _load(self, cwasm: Path, config: Config) -> None:
        self.engine = Engine(config)
        self.component = load(self.engine, cwasm)
        self.handler_export = self._find_handler()
        self.linker = Linker(self.engine)
        link(self.linker, self.component, self.engine)

    def _tick_epochs(self) -> None:
        """Advance the engine's epoch: wasm past its Store's deadline traps."""
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
        guest = idle.pop() if idle else self._instantiate()
        self._running.add(guest)
        try:
            yield guest
        finally:
            self._running.discard(guest)
            if guest.healthy and guest.uses < self.max_instance_reuse:
                idle.append(guest)
            else:
                guest.close()

    def prepare(self) -> None:
        """Have an instance ready for this thread's next request (it is about to wait for
        one, so instantiating now keeps that off the request's path)."""
        idle = self._idle_here()
        if not idle:
            try:
                idle.append(self._instantiate())
            except GuestTrap as exc:
                log.warning("preparing an instance failed: %s", exc)

    def _instantiate(self) -> Guest:
        started = time.monotonic()
        guest = Guest(self)
        if self.metrics is not None:
            self.metrics.instantiations.inc()
            self.metrics.instantiation_seconds.observe(time.monotonic() - started)
        return guest

    def stuck_for(self) -> float:
        """How long the longest-running guest has been in wasm without waiting (0: none is)."""
        now = time.monotonic()
        return max((now - since for guest in list(self._running)
                    if (since := guest.running_since) is not None), default=0.0)

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
