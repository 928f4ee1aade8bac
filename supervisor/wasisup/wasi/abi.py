"""The host side of component-model calls: WIT types, resources, and binding Python callables.

Each imported function is bound to a Python callable through the C trampoline
(``_hostcall.c``): at link time its WIT types become a compact spec the trampoline compiles
once, and at call time it converts values in C, calls the function with the GIL held, and
writes the result back (wasmtime-py's generic ``add_func`` re-reads the function type on every
call and converts ``list<u8>`` one byte at a time).

Python shapes of WIT values:
  bool/ints/floats -> bool/int/float; char, string, enum -> str; list<u8> -> bytes;
  list -> list; tuple -> tuple; record -> dict; flags -> set[str]; option -> value or None;
  variant -> the case name (str) when the case has no payload, else (name, payload);
  result -> Ok(value) / Err(value). A host function whose own result is a ``result``
  returns the ok payload and raises ``Err`` for the error case.
  Resources: a host function returns a ``Resource`` object for ``own<T>``; it receives the
  object for ``borrow<T>`` and ``own<T>`` (``own`` removes it from the store's table).

A host function that may wait is a generator function (see ``wasi.io``): it is bound as an
async host function, and the guest is suspended while it waits.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from wasmtime.component import (
    BorrowType, Bool, Char, EnumType, F32, F64, FlagsType, ListType, OptionType, OwnType,
    RecordType, ResultType, S8, S16, S32, S64, String, TupleType, U8, U16, U32, U64,
    ValType, VariantType,
)

from .. import capi
from . import _hostcall
from ._hostcall import (
    K_BOOL, K_BORROW, K_BYTES, K_CHAR, K_ENUM, K_F32, K_F64, K_FLAGS, K_LIST, K_OPTION, K_OWN,
    K_RECORD, K_RESULT, K_S8, K_S16, K_S32, K_S64, K_STRING, K_TUPLE, K_U8, K_U16, K_U32, K_U64,
    K_VARIANT, HostFunction,
)

log = logging.getLogger("wasisup.host")


class Ok:
    """The ok case of a nested WIT ``result``."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Ok({self.value!r})"


class Err(Exception):
    """The error case of a WIT ``result``: returned when nested, raised from a host function."""

    def __init__(self, value: Any = None) -> None:
        super().__init__(value)
        self.value = value


class Trap(Exception):
    """Raised by a host function to trap the guest with a message."""


class Resource:
    """Base of every host resource type; ``resource_id`` is its wasmtime host type id."""

    resource_id: ClassVar[int] = 0

    def drop(self) -> None:
        """Called when the guest drops its handle; override to release what the object holds."""


@dataclass(frozen=True)
class Interface:
    """A WASI interface as data: its WIT function names bound to Python callables.

    ``resources`` are the resource types it defines (not those it only ``use``s);
    ``default`` serves any function not listed (e.g. a capability that is always denied).
    """

    name: str
    functions: dict[str, Callable[..., Any]]
    resources: dict[str, type[Resource]] = field(default_factory=dict)
    default: Optional[Callable[..., Any]] = None


class Resources:
    """One Store's resource table: the reps (u32) that guest handles point at.

    The WASI host subclasses it with the rest of its per-Store state; host functions that are
    not methods receive that object as their first argument.
    """

    def __init__(self) -> None:
        self._items: list[Any] = [None]  # rep 0 stays unused
        self._free: list[int] = []
        # Why a host function that waited failed (set by the trampoline, which cannot trap the
        # guest from there): whoever drives the guest's call future drops it.
        self.failed: Optional[str] = None

    def add(self, obj: Resource) -> int:
        if self._free:
            rep = self._free.pop()
            self._items[rep] = obj
        else:
            rep = len(self._items)
            self._items.append(obj)
        return rep

    def get(self, rep: int) -> Any:
        obj = self._items[rep]
        if obj is None:
            raise Trap(f"unknown resource handle {rep}")
        return obj

    def remove(self, rep: int) -> Any:
        obj = self.get(rep)
        self._items[rep] = None
        self._free.append(rep)
        return obj

    def __len__(self) -> int:
        return len(self._items) - 1 - len(self._free)

    def drop_all(self) -> None:
        """Release everything still held, for a Store that is going away."""
        for obj in self._items:
            if obj is not None:
                _drop_quietly(obj)
        self._items, self._free = [None], []


def _drop_quietly(obj: Resource) -> None:
    try:
        obj.drop()
    except Exception:
        log.exception("dropping %s failed", type(obj).__name__)


# ---------------------------------------------------------------------------------------------
# WIT types as the trampoline's specs: (kind, ...) tuples, the kinds _hostcall exports

_SIMPLE_KINDS: dict[type, int] = {
    Bool: K_BOOL, S8: K_S8, U8: K_U8, S16: K_S16, U16: K_U16, S32: K_S32, U32: K_U32,
    S64: K_S64, U64: K_U64, F32: K_F32, F64: K_F64, Char: K_CHAR, String: K_STRING,
}

Spec = tuple


def type_spec(ty: Optional[ValType]) -> Optional[Spec]:
    """The trampoline's description of WIT type ``ty`` (None for no type)."""
    if ty is None:
        return None
    kind = _SIMPLE_KINDS.get(type(ty))
    if kind is not None:
        return (kind,)
    if isinstance(ty, ListType):
        return (K_BYTES,) if isinstance(ty.element, U8) else (K_LIST, type_spec(ty.element))
    if isinstance(ty, TupleType):
        return (K_TUPLE, tuple(type_spec(t) for t in ty.elements))
    if isinstance(ty, RecordType):
        return (K_RECORD, tuple((name, type_spec(t)) for name, t in ty.fields))
    if isinstance(ty, VariantType):
        return (K_VARIANT, tuple((name, type_spec(t)) for name, t in ty.cases))
    if isinstance(ty, EnumType):
        return (K_ENUM, tuple(ty.names))
    if isinstance(ty, FlagsType):
        return (K_FLAGS, tuple(ty.names))
    if isinstance(ty, OptionType):
        return (K_OPTION, type_spec(ty.payload))
    if isinstance(ty, ResultType):
        return (K_RESULT, type_spec(ty.ok), type_spec(ty.err))
    if isinstance(ty, BorrowType):
        return (K_BORROW,)
    if isinstance(ty, OwnType):
        return (K_OWN,)
    raise NotImplementedError(f"no host support for WIT type {type(ty).__name__}")


def host_function(name: str, func: Callable[..., Any], params: list[ValType],
                  result: Optional[ValType]) -> HostFunction:
    """Bind ``func`` to the import ``name`` (a method gets its resource first; any other
    function gets the Store's state first)."""
    return HostFunction(name, func, tuple(type_spec(t) for t in params), type_spec(result),
                        "[method]" not in name)


# ---------------------------------------------------------------------------------------------
# Linking

# The per-Store resource tables, by wasmtime_context_t address (the ctx a callback receives).
STORES: dict[int, Resources] = {}
# Every bound function, kept alive: wasmtime holds its address as the callback's data.
FUNCTIONS: list[HostFunction] = []


def _host_function_failed(name: str, exc: BaseException) -> None:
    log.error("host function %s failed", name, exc_info=exc)


def _resource_dropped(ctx: int, rep: int) -> None:
    res = STORES.get(ctx)
    if res is not None:
        _drop_quietly(res.remove(rep))


_hostcall.setup(
    address=capi.address, ok=Ok, err=Err, trap=Trap, stores=STORES,
    on_failure=_host_function_failed, on_drop=_resource_dropped,
)


def add_function(instance_ptr: int, name: str, fn: HostFunction) -> None:
    """Define ``fn`` as ``name`` in a linker instance, called through the C trampoline: a
    function that may wait (a generator function, see ``wasi.io``) as an async host function."""
    FUNCTIONS.append(fn)
    waits = inspect.isgeneratorfunction(fn.func)
    capi.add_function(instance_ptr, name, _hostcall.ASYNC_TRAMPOLINE if waits else _hostcall.TRAMPOLINE,
                      id(fn), waits)


def add_resource(instance_ptr: int, name: str, resource_id: int) -> None:
    """Define a host resource type in a linker instance; guest drops release the table entry."""
    capi.add_resource(instance_ptr, name, resource_id, _hostcall.RESOURCE_DTOR)
