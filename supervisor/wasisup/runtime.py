"""One process's wasmtime state: the engine, the component, its linker, and guest instances.

Each request runs ``wasi:http/incoming-handler.handle`` in a Store: a fresh one by default, or
one reused for up to ``max_instance_reuse`` requests. The call is a call future (the guest runs
on a fiber): ``Guest.poll`` runs it, with the GIL released, until it returns or waits — for
I/O (a host function that waits, see ``wasi.io``) or for its turn (an epoch tick: a guest that
computes gives its thread back every ``EPOCH_TICK``, so the other guests of its loop run too).
Instances come from wasmtime's pooling allocator (copy-on-write memory images, fiber stacks),
sized for the requests a worker holds at once, as in `wasmtime serve`.

Two limits interrupt wasm (epoch interruption): the request's deadline (``request_timeout``),
and ``compute_timeout``, the longest a guest may run without waiting for I/O — a guest stuck
in a loop gets a 504, a guest streaming a long download keeps going.
"""

from __future__ import annotations

import ctypes
import logging
import resource
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from wasmtime import Config, Engine, Store, WasmtimeError
from wasmtime.component import Linker

from . import capi
from .compile import CompileError, engine_config, load
from .wasi import abi
from .wasi._hostcall import CallFuture, start_call
from .wasi.context import WasiContext
from .wasi.io import DEADLINE_EXCEEDED
from .wasi.linker import LinkError, link

log = logging.getLogger("wasisup.runtime")

HANDLER_INTERFACE = "wasi:http/incoming-handler"
EPOCH_TICK = 0.05  # seconds per engine epoch: how often a computing guest yields; the limits' resolution
# Per-component bounds of the pooling allocator, above what toolchains emit today
# (componentize-py: 14 core instances, 1 memory, 2 tables; jco: 4, 1, 2). A component beyond
# them is served with on-demand allocation instead, as is a pool too big to reserve.
POOL_CORE_INSTANCES_PER_COMPONENT = 32
POOL_MEMORIES_PER_COMPONENT = 2
POOL_TABLES_PER_COMPONENT = 4
POOL_TABLE_ELEMENTS = 100_000
# Each pooled memory reserves wasmtime's default 4 GiB plus a 32 MiB guard of address space;
# the pool may take this much of the 128 TiB a process has (wasmtime aborts if it cannot).
POOL_MEMORY_SLOT = (4 << 30) + (32 << 20)
POOL_ADDRESS_SPACE = 32 << 40
# How long an idle instance is kept for reuse (`wasmtime serve`'s --idle-instance-timeout):
# after a burst, the instances it needed go as soon as they are not needed again.
IDLE_INSTANCE_TIMEOUT = 1.0


class GuestTrap(Exception):
    """The guest trapped (or exited) while handling a request; ``kind`` says how."""

    def __init__(self, message: str, kind: str = "trap") -> None:
        super().__init__(message)
        self.kind = kind  # "trap", "timeout" (a time limit) or "instantiation"


def pooling_config(instances: int) -> Config:
    """``engine_config()`` with wasmtime's pooling allocator, for ``instances`` live instances
    (WasmtimeError if its memories would not fit ``POOL_ADDRESS_SPACE``)."""
    reserved = instances * POOL_MEMORIES_PER_COMPONENT * POOL_MEMORY_SLOT
    if reserved > POOL_ADDRESS_SPACE:
        raise WasmtimeError(f"a pool for {instances} instances would reserve "
                            f"{reserved >> 40} TiB of address space")
    return capi.pooling_config(
        engine_config(),
        total_component_instances=instances,
        total_core_instances=instances * POOL_CORE_INSTANCES_PER_COMPONENT,
        total_memories=instances * POOL_MEMORIES_PER_COMPONENT,
        total_tables=instances * POOL_TABLES_PER_COMPONENT,
        total_stacks=instances,
        max_core_instances_per_component=POOL_CORE_INSTANCES_PER_COMPONENT,
        max_memories_per_component=POOL_MEMORIES_PER_COMPONENT,
        max_tables_per_component=POOL_TABLES_PER_COMPONENT,
        table_elements=POOL_TABLE_ELEMENTS,
    )


class Guest:
    """A component instance in its own Store, ready to handle requests (one at a time)."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.context = WasiContext(runtime.env, runtime.outbound)
        self.store = Store(runtime.engine)
        self.ctx = capi.context_address(self.store)
        self._limit = "compute"  # the time limit the running wasm is under
        self._limit_at = time.monotonic() + runtime.compute_timeout
        self._call: Optional[CallFuture] = None
        _GUESTS[self.ctx] = self
        capi.on_epoch_deadline(self.store, _ON_EPOCH_DEADLINE)
        self.store.set_epoch_deadline(1)
        if runtime.max_memory:
            self.store.set_limits(memory_size=runtime.max_memory)
        abi.STORES[self.ctx] = self.context
        self.uses = 0
        self.healthy = True
        self.running_since: Optional[float] = None  # in wasm since (None: not running)
        self.idle_since = 0.0
        self.run_seconds = 0.0  # in wasm for the current request (and the host functions it calls)
        try:
            instance = capi.instantiate(runtime.linker, self.store, runtime.component,
                                        self._starting_up)
            export = instance.get_export_index(self.store, runtime.handler_export)
            handle_index = instance.get_export_index(self.store, "handle", export)
            func = instance.get_func(self.store, handle_index) if handle_index else None
        except (WasmtimeError, GuestTrap) as exc:
            self.close()
            message = exc if isinstance(exc, GuestTrap) else _trap_message(exc)
            raise GuestTrap(f"instantiating the component failed: {message}",
                            "instantiation") from None
        if func is None:
            self.close()
            raise LinkError(f"{runtime.handler_export} exports no `handle` function")
        self._func = func._func

    def _starting_up(self) -> None:
        """The component's start-up paused: an epoch tick (go on) or a wait (give up)."""
        if self.context.waiter.interests is not None or self.context.failed:
            raise GuestTrap(self.context.failed or "it waits for I/O while starting up")

    def start(self, request: abi.Resource, outparam: abi.Resource, request_id: str,
              trace: Any = None) -> None:
        """Begin the guest's handler for one request (in ``trace``, a wasisup.tracing.Trace,
        if it is traced); ``poll`` runs it."""
        self.uses += 1
        self.context.request_id = request_id
        self.context.trace = trace
        if self.runtime.request_timeout:
            self.context.waiter.deadline = (time.monotonic_ns()
                                            + int(self.runtime.request_timeout * 1e9))
        self._computing()
        self._call = start_call(self._func, self.ctx, request, outparam, self.context)

    def _computing(self) -> None:
        """Wasm runs again after waiting for I/O (or at the start): it may compute for
        ``compute_timeout`` from now, and never past the request's deadline."""
        now = time.monotonic()
        self._limit, self._limit_at = "compute", now + self.runtime.compute_timeout
        deadline = self.context.waiter.deadline
        if deadline is not None and deadline / 1e9 < self._limit_at:
            self._limit, self._limit_at = "request", deadline / 1e9

    @property
    def waiting(self) -> bool:
        """Is the guest suspended in a host function, waiting for I/O (not for its turn)?"""
        return self.context.waiter.interests is not None

    def poll(self) -> bool:
        """Run the guest until it returns (True) or waits for I/O or its turn (False). Raises
        GuestTrap if it trapped, or if a host function failed while it waited; the instance
        is then spent."""
        if self.waiting:
            self._computing()
        self.running_since = started = time.monotonic()
        try:
            done = self._call.poll()
        finally:
            self.running_since = None
            self.run_seconds += time.monotonic() - started
        if not done:
            if self.context.failed:
                message, self.context.failed = self.context.failed, None
                self.cancel()
                raise self._trap(message)
            return False
        error = capi.error(self._call.take_error())
        self._call = None
        if error is not None:
            self.healthy = False
            raise self._trap(_trap_message(error))
        return True

    def cancel(self) -> None:
        """Drop the call (the guest is unwound wherever it waits); the instance is spent."""
        if self._call is not None:
            self._call.close()
            self._call = None
        self.healthy = False

    def end(self) -> None:
        """After a request: what the guest printed without a final newline goes to the log."""
        self.context.waiter.deadline = None
        self.context.end_request()

    def on_epoch_deadline(self) -> tuple[int, Optional[str]]:
        """At an epoch tick while wasm runs: yield (it has had a tick's run: the other guests
        of the loop go first), go on (it was resumed just now, after a tick its previous turn
        ran into), or stop, and why."""
        now = time.monotonic()
        if now >= self._limit_at:
            return capi.UPDATE_DEADLINE_CONTINUE, "epoch interrupt"
        running = self.running_since
        if running is not None and now - running < EPOCH_TICK / 2:
            return capi.UPDATE_DEADLINE_CONTINUE, None
        if self.runtime.metrics is not None:
            self.runtime.metrics.epoch_yields.inc()
        return capi.UPDATE_DEADLINE_YIELD, None

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
        self.cancel()  # (a call still under way goes before its Store)
        abi.STORES.pop(self.ctx, None)
        _GUESTS.pop(self.ctx, None)
        self.context.close()
        self.store = None  # type: ignore[assignment]


# Guests by their Store's context address: how the epoch callback finds its Guest.
_GUESTS: dict[int, Guest] = {}


@capi.EpochCallback
def _ON_EPOCH_DEADLINE(context: Any, data: Any, delta: Any, kind: Any) -> int:
    """wasmtime's epoch-deadline callback: yield to the loop until the next tick, or stop the
    guest (a wasmtime error, which traps it)."""
    stop = None
    delta[0] = 1  # (set first: the next tick is armed whatever happens below)
    kind[0] = capi.UPDATE_DEADLINE_CONTINUE
    try:
        guest = _GUESTS.get(ctypes.cast(context, ctypes.c_void_p).value)
        if guest is not None:
            kind[0], stop = guest.on_epoch_deadline()
    except Exception as exc:  # (an exception must not cross into wasmtime)
        stop = f"the epoch callback failed: {exc!r}"
    return capi.new_error(stop) if stop is not None else 0


def _trap_message(error: WasmtimeError) -> str:
    """The root cause of a trap (wasmtime puts it under "Caused by:", after the backtrace)."""
    text = str(error)
    _, found, cause = text.partition("Caused by:")
    lines = [line.strip() for line in (cause if found else text).splitlines() if line.strip()]
    return lines[0] if lines else "trap"


class Runtime:
    """Loads a compiled component once per process and hands out guest instances.

    ``instances`` is how many may be alive at once (the requests a worker holds, and one
    prepared per loop): the pooling allocator is sized for it.
    """

    def __init__(self, cwasm: Path, env: list[tuple[str, str]], outbound: Any,
                 max_instance_reuse: int = 1, request_timeout: float = 0, max_memory: int = 0,
                 compute_timeout: float = 30.0, instances: int = 16,
                 metrics: Any = None) -> None:
        self.env = env
        self.outbound = outbound
        self.max_instance_reuse = max(1, max_instance_reuse)
        self.request_timeout = request_timeout
        self.compute_timeout = compute_timeout
        self.max_memory = max_memory
        self.metrics = metrics
        self._local = threading.local()
        self._all_idle: list[deque[Guest]] = []  # every loop's idle instances, for close()
        self._running: set[Guest] = set()
        self._lock = threading.Lock()
        try:
            if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
                # The pool reserves address space up front: under a limit, wasmtime would abort.
                raise WasmtimeError("the address space is limited (ulimit -v)")
            self._load(cwasm, pooling_config(instances))  # one beyond its bounds fails here
            Guest(self).close()
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
        """Advance the engine's epoch: wasm past its Store's deadline yields or traps."""
        while True:
            time.sleep(EPOCH_TICK)
            self.engine.increment_epoch()

    def _find_handler(self) -> str:
        for name in self.component.type.exports(self.engine):
            if name.split("@")[0] == HANDLER_INTERFACE:
                return name
        raise CompileError("the component does not export wasi:http/incoming-handler: "
                           "build it for the wasi:http/proxy world")

    def acquire(self) -> Guest:
        """An instance for one request: the one this loop used last, else a new one.

        Idle instances are kept per loop (thread): a Store that stays on one thread stays in
        that core's caches.
        """
        idle = self._idle_here()
        guest = idle.pop() if idle else self._instantiate()
        self._running.add(guest)
        return guest

    def release(self, guest: Guest) -> None:
        """A request is done with ``guest``: kept for the next while healthy and under the
        reuse limit, else closed."""
        self._running.discard(guest)
        guest.end()
        if self.metrics is not None:
            self.metrics.guest_seconds.inc(guest.run_seconds)
        guest.run_seconds = 0.0
        if guest.healthy and guest.uses < self.max_instance_reuse:
            guest.idle_since = time.monotonic()
            self._idle_here().append(guest)
        else:
            guest.close()

    def trim(self) -> None:
        """Close this loop's instances idle for longer than ``IDLE_INSTANCE_TIMEOUT`` but the
        last one (the next request's)."""
        idle = self._idle_here()
        cutoff = time.monotonic() - IDLE_INSTANCE_TIMEOUT
        while len(idle) > 1 and idle[0].idle_since < cutoff:  # (the oldest come first)
            idle.popleft().close()

    def prepare(self) -> None:
        """Have an instance ready for this loop's next request (it has nothing else to do, so
        instantiating now keeps that off the request's path)."""
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

    def instances(self) -> tuple[int, int]:
        """Instances alive now: (busy with a request, idle)."""
        return len(self._running), sum(map(len, list(self._all_idle)))

    def stuck_for(self) -> float:
        """How long the longest-running guest has been in wasm without yielding (0: none is)."""
        now = time.monotonic()
        return max((now - since for guest in list(self._running)
                    if (since := guest.running_since) is not None), default=0.0)

    def _idle_here(self) -> deque[Guest]:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = deque()
            with self._lock:
                self._all_idle.append(idle)
        return idle

    def close(self) -> None:
        with self._lock:
            lists, self._all_idle = self._all_idle, []
        for idle in lists:
            while idle:
                idle.pop().close()
