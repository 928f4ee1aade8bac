"""wasmtime's C API where wasmtime-py does not reach: prototypes of our own, and the layout of
component values the host-call trampoline (``wasi/_hostcall.c``) assumes.

Everything wasisup takes from wasmtime-py's private ``_ffi`` goes through here. At import the
layout the trampoline was built for is checked against wasmtime-py's own declarations: a
wasmtime-py whose values look different is one clear error, never memory corruption.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from typing import Any, Callable, Optional

from wasmtime import Config, Store, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Func, Instance, Linker

from .wasi import _hostcall

_vp, _sz, _u32, _u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint64

# The kinds of wasmtime_component_val_t the trampoline writes, by wasmtime-py's names.
_KINDS = ("BOOL", "S8", "U8", "S16", "U16", "S32", "U32", "S64", "U64", "F32", "F64", "CHAR",
          "STRING", "LIST", "RECORD", "TUPLE", "VARIANT", "ENUM", "OPTION", "RESULT", "FLAGS",
          "RESOURCE")


class LayoutMismatch(ImportError):
    """wasmtime-py declares component values unlike what the trampoline was built for."""


def check_layout() -> None:
    """Raise LayoutMismatch unless wasmtime-py's value layout is the trampoline's."""
    expected = {
        "VAL_SIZE": ctypes.sizeof(ffi.wasmtime_component_val_t),
        "RECORD_ENTRY_SIZE": ctypes.sizeof(ffi.wasmtime_component_valrecord_entry_t),
        "NAME_SIZE": ctypes.sizeof(ffi.wasm_name_t),
        **{f"K_{kind}": getattr(ffi, f"WASMTIME_COMPONENT_{kind}").value for kind in _KINDS},
    }
    wrong = [f"{name} {getattr(_hostcall, name)} != {value}" for name, value in expected.items()
             if getattr(_hostcall, name) != value]
    if ffi.wasmtime_component_val_t.of.offset != 8:
        wrong.append(f"payload offset 8 != {ffi.wasmtime_component_val_t.of.offset}")
    if wrong:
        raise LayoutMismatch(
            f"wasisup's host-call trampoline does not fit wasmtime-py "
            f"{importlib.metadata.version('wasmtime')} ({', '.join(wrong)}): install the "
            "wasmtime version wasisup pins (pip install wasisup reinstalls it)")


check_layout()


def address(name: str) -> int:
    """Where wasmtime's C function ``name`` is (for the trampoline, which calls it directly)."""
    return ctypes.cast(ffi.dll[name], ctypes.c_void_p).value or 0


def _proto(name: str, restype: Any, *argtypes: Any) -> Any:
    fn = ffi.dll[name]  # a prototype of our own: wasmtime-py's stays as it declared it
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_add_func = _proto("wasmtime_component_linker_instance_add_func", _vp, _vp, ctypes.c_char_p, _sz,
                   _vp, _vp, _vp)
_add_func_async = _proto("wasmtime_component_linker_instance_add_func_async", _vp, _vp,
                         ctypes.c_char_p, _sz, _vp, _vp, _vp)
_add_resource = _proto("wasmtime_component_linker_instance_add_resource", _vp, _vp,
                       ctypes.c_char_p, _sz, _vp, _vp, _vp, _vp)
_resource_type_new_host = _proto("wasmtime_component_resource_type_new_host", _vp, _u32)
_resource_type_delete = _proto("wasmtime_component_resource_type_delete", None, _vp)
_instantiate_async = _proto("wasmtime_component_linker_instantiate_async", _vp, _vp, _vp, _vp,
                            ctypes.POINTER(ffi.wasmtime_component_instance_t),
                            ctypes.POINTER(_vp))
_call_async = _proto("wasmtime_component_func_call_async", _vp, _vp, _vp, _vp, _sz, _vp, _sz,
                     ctypes.POINTER(_vp))
_future_poll = _proto("wasmtime_call_future_poll", ctypes.c_bool, _vp)
_future_delete = _proto("wasmtime_call_future_delete", None, _vp)


def error(pointer: Optional[int]) -> Optional[WasmtimeError]:
    """The wasmtime_error_t at ``pointer`` (now ours) as a WasmtimeError, or None."""
    if not pointer:
        return None
    return WasmtimeError._from_ptr(ctypes.cast(pointer, ctypes.POINTER(ffi.wasmtime_error_t)))


def _check(pointer: Optional[int], what: str) -> None:
    cause = error(pointer)
    if cause is not None:
        raise WasmtimeError(f"{what}: {cause}")


def add_function(instance_ptr: int, name: str, callback: int, data: int, waits: bool) -> None:
    """Define ``name`` in a linker instance as the C function at ``callback`` with ``data``:
    an async host function (the trampoline's continuation) if it ``waits``."""
    raw = name.encode()
    add = _add_func_async if waits else _add_func
    _check(add(instance_ptr, raw, len(raw), callback, data, _hostcall.NO_FINALIZER),
           f"defining {name}")


def add_resource(instance_ptr: int, name: str, resource_id: int, destructor: int) -> None:
    """Define a host resource type ``resource_id`` in a linker instance."""
    raw = name.encode()
    ty = _resource_type_new_host(resource_id)
    try:
        _check(_add_resource(instance_ptr, raw, len(raw), ty, destructor, None,
                             _hostcall.NO_FINALIZER), f"defining resource {name}")
    finally:
        _resource_type_delete(ty)


def instantiate(linker: Linker, store: Store, component: Component,
                on_pending: Callable[[], None]) -> Instance:
    """Instantiate ``component`` (async: its linker has functions that wait). Its start-up runs
    to the end here; ``on_pending`` is called each time it pauses (an epoch tick, or a wait
    it has no business doing) and may raise to give up."""
    instance = ffi.wasmtime_component_instance_t()
    failure = _vp()
    _run_to_end(_instantiate_async(linker.ptr(), store._context(), component.ptr(),
                                   ctypes.byref(instance), ctypes.byref(failure)),
                failure, on_pending)
    return Instance._from_raw(instance)


def call(func: Func, store: Store, *params: Any,
         on_pending: Callable[[], None] = lambda: None) -> Any:
    """Call a component function to the end, with wasmtime-py's value conversions (for
    exports other than the incoming handler, which ``_hostcall.start_call`` runs): async, as
    its linker has functions that wait; ``on_pending`` as for ``instantiate``."""
    ty = func.type(store)
    args = (ffi.wasmtime_component_val_t * len(params))()
    result = ffi.wasmtime_component_val_t()
    converted = 0
    try:
        for (_, param_ty), value in zip(ty.params, params, strict=True):
            param_ty.convert_to_c(store, value, ctypes.pointer(args[converted]))
            converted += 1
        failure = _vp()
        _run_to_end(_call_async(ctypes.addressof(func._func), store._context(), args, converted,
                                ctypes.addressof(result), ty.result is not None,
                                ctypes.byref(failure)),
                    failure, on_pending)
        return None if ty.result is None else ty.result.convert_from_c(result)
    finally:
        for i in range(converted):
            ffi.wasmtime_component_val_delete(ctypes.byref(args[i]))


def _run_to_end(future: int, failure: Any, on_pending: Callable[[], None]) -> None:
    try:
        while not _future_poll(future):
            on_pending()
    finally:
        _future_delete(future)
    cause = error(failure.value)
    if cause is not None:
        raise cause


def context_address(store: Store) -> int:
    """The address of ``store``'s wasmtime_context_t: what host calls are told they run in."""
    return ctypes.cast(store._context(), ctypes.c_void_p).value or 0


def pooling_config(config: Config, **totals: int) -> Config:
    """Give ``config`` wasmtime's pooling allocator with these bounds (names as in the C API's
    ``wasmtime_pooling_allocation_config_NAME_set``)."""
    pool = ffi.wasmtime_pooling_allocation_config_new()
    for name, value in totals.items():
        getattr(ffi, f"wasmtime_pooling_allocation_config_{name}_set")(pool, value)
    ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    ffi.wasmtime_pooling_allocation_config_delete(pool)
    return config


# What a Store's epoch-deadline callback tells wasmtime after the tick it was called for.
UPDATE_DEADLINE_CONTINUE = 0
UPDATE_DEADLINE_YIELD = 1  # give the thread back to the loop (the call future's poll returns)

EpochCallback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_context_t),
                                 ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                 ctypes.POINTER(ctypes.c_uint8))
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()


def on_epoch_deadline(store: Store, callback: Any) -> None:
    """Have wasmtime call ``callback`` (an ``EpochCallback``) when ``store``'s deadline passes."""
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, _NO_FINALIZER)


def new_error(message: str) -> int:
    """A wasmtime_error_t with ``message``, for wasmtime to take (the address)."""
    return ctypes.cast(ffi.wasmtime_error_new(message.encode()), ctypes.c_void_p).value or 0
