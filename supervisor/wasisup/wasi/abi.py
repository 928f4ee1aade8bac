"""The host-call trampoline: component-model values <-> Python, prepared once per function.

wasmtime-py's generic ``add_func`` re-reads the function type on every call and converts
``list<u8>`` one byte at a time. Here each imported function gets converters built once, at
link time, from its WIT type; they read and write the C API's ``wasmtime_component_val_t``
(32 bytes: a kind byte, then an 8-aligned payload) straight from memory with ``struct``, and
``list<u8>`` moves as one strided slice in either direction.

Python shapes of WIT values:
  bool/ints/floats -> bool/int/float; char, string, enum -> str; list<u8> -> bytes;
  list -> list; tuple -> tuple; record -> dict; flags -> set[str]; option -> value or None;
  variant -> the case name (str) when the case has no payload, else (name, payload);
  result -> Ok(value) / Err(value). A host function whose own result is a ``result``
  returns the ok payload and raises ``Err`` for the error case.
  Resources: a host function returns a ``Resource`` object for ``own<T>``; it receives the
  object for ``borrow<T>`` and ``own<T>`` (``own`` removes it from the store's table).
"""

from __future__ import annotations

import ctypes
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import (
    BorrowType, Bool, Char, EnumType, F32, F64, FlagsType, ListType, OptionType, OwnType,
    RecordType, ResultType, S8, S16, S32, S64, String, TupleType, U8, U16, U32, U64,
    ValType, VariantType,
)

log = logging.getLogger("wasisup.host")

# All of this process's memory as one byte view: addresses from the C API index it directly.
MEM = memoryview((ctypes.c_char * (1 << 47)).from_address(0)).cast("B")
VAL_SIZE = 32
RECORD_ENTRY_SIZE = 48  # wasm_name_t (16) + wasmtime_component_val_t (32)
assert ctypes.sizeof(ffi.wasmtime_component_val_t) == VAL_SIZE
assert ctypes.sizeof(ffi.wasmtime_component_valrecord_entry) == RECORD_ENTRY_SIZE

# Small C helpers keep the GIL (PyDLL): they never run wasm, so releasing it costs more than it saves.
_c = ctypes.PyDLL(ffi.dll._name)
_vp, _sz, _u32, _bool = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_bool


def _proto(name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(_c, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_byte_vec_new = _proto("wasm_byte_vec_new", None, _vp, _sz, ctypes.c_char_p)
_vallist_new_uninit = _proto("wasmtime_component_vallist_new_uninit", None, _vp, _sz)
_valtuple_new_uninit = _proto("wasmtime_component_valtuple_new_uninit", None, _vp, _sz)
_valrecord_new_uninit = _proto("wasmtime_component_valrecord_new_uninit", None, _vp, _sz)
_valflags_new_uninit = _proto("wasmtime_component_valflags_new_uninit", None, _vp, _sz)
_val_new = _proto("wasmtime_component_val_new", _vp, _vp)
_host_new = _proto("wasmtime_component_resource_host_new", _vp, _bool, _u32, _u32)
_host_rep = _proto("wasmtime_component_resource_host_rep", _u32, _vp)
_host_delete = _proto("wasmtime_component_resource_host_delete", None, _vp)
_any_to_host = _proto("wasmtime_component_resource_any_to_host", _vp, _vp, _vp, _vp)
_host_to_any = _proto("wasmtime_component_resource_host_to_any", _vp, _vp, _vp, _vp)
_error_new = _proto("wasmtime_error_new", _vp, ctypes.c_char_p)
_error_delete = _proto("wasmtime_error_delete", None, _vp)

# wasmtime_component_val_t kinds
K_BOOL, K_S8, K_U8, K_S16, K_U16, K_S32, K_U32, K_S64, K_U64, K_F32, K_F64, K_CHAR = range(12)
K_STRING, K_LIST, K_RECORD, K_TUPLE, K_VARIANT, K_ENUM, K_OPTION, K_RESULT, K_FLAGS = range(12, 21)
K_RESOURCE = 21

_Q = struct.Struct("<Q")  # pointers and sizes
_QQ = struct.Struct("<QQ")  # (size, data) pairs: strings, lists, records, tuples, flags
_read_q, _write_q, _read_qq = _Q.unpack_from, _Q.pack_into, _QQ.unpack_from

Lift = Callable[[int, "Resources"], Any]
Lower = Callable[[Any, int, "Resources"], None]


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
        self.ctx = 0  # the Store's wasmtime_context_t*, as the trampoline last saw it
        # Where the C API writes a pointer it returns (a Store's host calls run on one thread
        # at a time, so one slot serves them all without allocating a ctypes object per call).
        self._slot = ctypes.c_void_p()
        self.slot = ctypes.addressof(self._slot)
        self._items: list[Any] = [None]  # rep 0 stays unused
        self._free: list[int] = []

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
# Lifting: guest value in C memory -> Python


def _read_name(addr: int) -> bytes:
    size, data = _read_qq(MEM, addr)
    return MEM[data:data + size].tobytes() if size else b""


def _struct_lift(fmt: str) -> Lift:
    unpack = struct.Struct(fmt).unpack_from
    return lambda addr, res: unpack(MEM, addr + 8)[0]


def _lift_bool(addr: int, res: Resources) -> bool:
    return MEM[addr + 8] != 0


def _lift_char(addr: int, res: Resources) -> str:
    return chr(struct.unpack_from("<I", MEM, addr + 8)[0])


def _lift_string(addr: int, res: Resources) -> str:
    return _read_name(addr + 8).decode()


def _lift_bytes(addr: int, res: Resources) -> bytes:
    size, data = _read_qq(MEM, addr + 8)
    return MEM[data + 8:data + 8 + size * VAL_SIZE:VAL_SIZE].tobytes()


def _resource_rep(addr: int, res: Resources) -> int:
    slot = res.slot
    err = _any_to_host(res.ctx, _read_q(MEM, addr + 8)[0], slot)
    if err:
        _error_delete(err)
        raise Trap("a resource of the wrong type was passed to the host")
    host = _read_q(MEM, slot)[0]
    rep = _host_rep(host)
    _host_delete(host)
    return rep


def _lift_borrow(addr: int, res: Resources) -> Any:
    return res.get(_resource_rep(addr, res))


def _lift_own(addr: int, res: Resources) -> Any:
    return res.remove(_resource_rep(addr, res))


def lifter(ty: ValType) -> Lift:
    """Build the function that reads a value of type ``ty`` from C memory."""
    simple = _SIMPLE_LIFTS.get(type(ty))
    if simple is not None:
        return simple
    if isinstance(ty, ListType):
        element = ty.element
        if isinstance(element, U8):
            return _lift_bytes
        item = lifter(element)

        def lift_list(addr: int, res: Resources) -> list:
            size, data = _read_qq(MEM, addr + 8)
            return [item(data + i * VAL_SIZE, res) for i in range(size)]
        return lift_list
    if isinstance(ty, TupleType):
        items = [lifter(t) for t in ty.elements]

        def lift_tuple(addr: int, res: Resources) -> tuple:
            _, data = _read_qq(MEM, addr + 8)
            return tuple(lift(data + i * VAL_SIZE, res) for i, lift in enumerate(items))
        return lift_tuple
    if isinstance(ty, RecordType):
        fields = [(name, lifter(t)) for name, t in ty.fields]

        def lift_record(addr: int, res: Resources) -> dict:
            _, data = _read_qq(MEM, addr + 8)
            return {name: lift(data + i * RECORD_ENTRY_SIZE + 16, res)
                    for i, (name, lift) in enumerate(fields)}
        return lift_record
    if isinstance(ty, OptionType):
        payload = lifter(ty.payload)

        def lift_option(addr: int, res: Resources) -> Any:
            ptr = _read_q(MEM, addr + 8)[0]
            return payload(ptr, res) if ptr else None
        return lift_option
    if isinstance(ty, ResultType):
        ok = lifter(ty.ok) if ty.ok is not None else None
        err = lifter(ty.err) if ty.err is not None else None

        def lift_result(addr: int, res: Resources) -> Any:
            is_ok, ptr = MEM[addr + 8], _read_q(MEM, addr + 16)[0]
            if is_ok:
                return Ok(ok(ptr, res) if ok and ptr else None)
            return Err(err(ptr, res) if err and ptr else None)
        return lift_result
    if isinstance(ty, VariantType):
        cases = {name.encode(): (name, lifter(t) if t is not None else None) for name, t in ty.cases}

        def lift_variant(addr: int, res: Resources) -> Any:
            name, payload = cases[_read_name(addr + 8)]
            if payload is None:
                return name
            return name, payload(_read_q(MEM, addr + 24)[0], res)
        return lift_variant
    if isinstance(ty, EnumType):
        return lambda addr, res: _read_name(addr + 8).decode()
    if isinstance(ty, FlagsType):
        def lift_flags(addr: int, res: Resources) -> set:
            size, data = _read_qq(MEM, addr + 8)
            return {_read_name(data + i * 16).decode() for i in range(size)}
        return lift_flags
    if isinstance(ty, BorrowType):
        return _lift_borrow
    if isinstance(ty, OwnType):
        return _lift_own
    raise NotImplementedError(f"no host support for WIT type {type(ty).__name__}")


_SIMPLE_LIFTS: dict[type, Lift] = {
    Bool: _lift_bool, S8: _struct_lift("<b"), U8: _struct_lift("<B"), S16: _struct_lift("<h"),
    U16: _struct_lift("<H"), S32: _struct_lift("<i"), U32: _struct_lift("<I"),
    S64: _struct_lift("<q"), U64: _struct_lift("<Q"), F32: _struct_lift("<f"),
    F64: _struct_lift("<d"), Char: _lift_char, String: _lift_string,
}

# ---------------------------------------------------------------------------------------------
# Lowering: Python -> value in C memory (nested storage allocated by the C API, freed by wasmtime)


def _write_name(addr: int, data: bytes) -> None:
    _byte_vec_new(addr, len(data), data)


def _struct_lower(kind: int, fmt: str) -> Lower:
    pack = struct.Struct(fmt).pack_into

    def lower(value: Any, addr: int, res: Resources) -> None:
        MEM[addr] = kind
        pack(MEM, addr + 8, value)
    return lower


def _lower_string(value: str, addr: int, res: Resources) -> None:
    MEM[addr] = K_STRING
    _write_name(addr + 8, value.encode())


def _lower_char(value: str, addr: int, res: Resources) -> None:
    MEM[addr] = K_CHAR
    struct.pack_into("<I", MEM, addr + 8, ord(value))


def _lower_bytes(value: bytes, addr: int, res: Resources) -> None:
    size = len(value)
    MEM[addr] = K_LIST
    _vallist_new_uninit(addr + 8, size)
    if size:
        data = _read_q(MEM, addr + 16)[0]
        end = data + size * VAL_SIZE
        MEM[data:end:VAL_SIZE] = bytes((K_U8,)) * size
        MEM[data + 8:end + 8:VAL_SIZE] = value


def _lower_own(value: Resource, addr: int, res: Resources) -> None:
    host = _host_new(True, res.add(value), value.resource_id)
    err = _host_to_any(res.ctx, host, res.slot)
    _host_delete(host)
    if err:
        _error_delete(err)
        raise Trap(f"cannot hand a {type(value).__name__} to the guest")
    MEM[addr] = K_RESOURCE
    _write_q(MEM, addr + 8, _read_q(MEM, res.slot)[0])


def lower_resource(value: Resource, addr: int, res: Resources, ctx: int) -> None:
    """Write ``own<value>`` for a call into the guest (the incoming-handler's arguments)."""
    res.ctx = ctx
    _lower_own(value, addr, res)


_FALSE = (ctypes.c_char * VAL_SIZE)()  # a val holding `false`: nothing to free when overwritten


def _boxed(lower: Lower, value: Any, res: Resources) -> int:
    """Lower ``value`` into a heap-allocated val (for option/result/variant payloads)."""
    boxed = _val_new(_FALSE)
    lower(value, boxed, res)
    return boxed


def lowerer(ty: ValType, top_level_result: bool = False) -> Lower:
    """Build the function that writes a Python value of type ``ty`` into C memory.

    With ``top_level_result`` a ``result`` takes its ok payload bare (a host function's return
    value) and an ``Err`` for the error case.
    """
    simple = _SIMPLE_LOWERS.get(type(ty))
    if simple is not None:
        return simple
    if isinstance(ty, ListType):
        element = ty.element
        if isinstance(element, U8):
            return _lower_bytes
        item = lowerer(element)

        def lower_list(value: Any, addr: int, res: Resources) -> None:
            MEM[addr] = K_LIST
            _vallist_new_uninit(addr + 8, len(value))
            data = _read_q(MEM, addr + 16)[0]
            for i, v in enumerate(value):
                item(v, data + i * VAL_SIZE, res)
        return lower_list
    if isinstance(ty, TupleType):
        items = [lowerer(t) for t in ty.elements]
        count = len(items)

        def lower_tuple(value: Any, addr: int, res: Resources) -> None:
            MEM[addr] = K_TUPLE
            _valtuple_new_uninit(addr + 8, count)
            data = _read_q(MEM, addr + 16)[0]
            for i, (lower, v) in enumerate(zip(items, value)):
                lower(v, data + i * VAL_SIZE, res)
        return lower_tuple
    if isinstance(ty, RecordType):
        fields = [(name, name.encode(), lowerer(t)) for name, t in ty.fields]

        def lower_record(value: dict, addr: int, res: Resources) -> None:
            MEM[addr] = K_RECORD
            _valrecord_new_uninit(addr + 8, len(fields))
            data = _read_q(MEM, addr + 16)[0]
            for i, (name, raw_name, lower) in enumerate(fields):
                entry = data + i * RECORD_ENTRY_SIZE
                _write_name(entry, raw_name)
                lower(value.get(name), entry + 16, res)
        return lower_record
    if isinstance(ty, OptionType):
        payload = lowerer(ty.payload)

        def lower_option(value: Any, addr: int, res: Resources) -> None:
            MEM[addr] = K_OPTION
            _write_q(MEM, addr + 8, 0 if value is None else _boxed(payload, value, res))
        return lower_option
    if isinstance(ty, ResultType):
        ok = lowerer(ty.ok) if ty.ok is not None else None
        err = lowerer(ty.err) if ty.err is not None else None

        def lower_result(value: Any, addr: int, res: Resources) -> None:
            MEM[addr] = K_RESULT
            if type(value) is Err:
                MEM[addr + 8] = 0
                payload, lower = value.value, err
            else:
                MEM[addr + 8] = 1
                payload, lower = (value if top_level_result else value.value), ok
            _write_q(MEM, addr + 16, _boxed(lower, payload, res) if lower else 0)
        return lower_result
    if isinstance(ty, VariantType):
        cases = {name: (name.encode(), lowerer(t) if t is not None else None) for name, t in ty.cases}

        def lower_variant(value: Any, addr: int, res: Resources) -> None:
            name, payload = (value, None) if type(value) is str else value
            raw_name, lower = cases[name]
            MEM[addr] = K_VARIANT
            _write_name(addr + 8, raw_name)
            _write_q(MEM, addr + 24, _boxed(lower, payload, res) if lower else 0)
        return lower_variant
    if isinstance(ty, EnumType):
        def lower_enum(value: str, addr: int, res: Resources) -> None:
            MEM[addr] = K_ENUM
            _write_name(addr + 8, value.encode())
        return lower_enum
    if isinstance(ty, FlagsType):
        def lower_flags(value: set, addr: int, res: Resources) -> None:
            MEM[addr] = K_FLAGS
            _valflags_new_uninit(addr + 8, len(value))
            data = _read_q(MEM, addr + 16)[0]
            for i, name in enumerate(value):
                _write_name(data + i * 16, name.encode())
        return lower_flags
    if isinstance(ty, OwnType):
        return _lower_own
    raise NotImplementedError(f"no host support for returning WIT type {type(ty).__name__}")


_SIMPLE_LOWERS: dict[type, Lower] = {
    Bool: _struct_lower(K_BOOL, "<?"), S8: _struct_lower(K_S8, "<b"), U8: _struct_lower(K_U8, "<B"),
    S16: _struct_lower(K_S16, "<h"), U16: _struct_lower(K_U16, "<H"), S32: _struct_lower(K_S32, "<i"),
    U32: _struct_lower(K_U32, "<I"), S64: _struct_lower(K_S64, "<q"), U64: _struct_lower(K_U64, "<Q"),
    F32: _struct_lower(K_F32, "<f"), F64: _struct_lower(K_F64, "<d"), Char: _lower_char,
    String: _lower_string,
}

# ---------------------------------------------------------------------------------------------
# The trampoline


class HostFunction:
    """One imported function bound to a Python callable, with its converters prepared."""

    __slots__ = ("name", "func", "arguments", "lower", "lower_err")

    def __init__(self, name: str, func: Callable[..., Any], params: list[ValType],
                 result: Optional[ValType]) -> None:
        self.name = name
        self.func = func
        # A method gets its resource first; any other function gets the Store's state first.
        self.arguments = _argument_reader([lifter(t) for t in params], "[method]" not in name)
        self.lower = lowerer(result, top_level_result=True) if result is not None else None
        self.lower_err = self.lower if isinstance(result, ResultType) else None


def _argument_reader(lifts: list[Lift], pass_store: bool) -> Callable[[int, Resources], tuple]:
    """The function that reads a call's arguments (most calls take one or two: those get a
    reader without a loop)."""
    if len(lifts) == 1:
        (first,) = lifts
        if pass_store:
            return lambda args, res: (res, first(args, res))
        return lambda args, res: (first(args, res),)
    if len(lifts) == 2:
        first, second = lifts
        if pass_store:
            return lambda args, res: (res, first(args, res), second(args + VAL_SIZE, res))
        return lambda args, res: (first(args, res), second(args + VAL_SIZE, res))
    offsets = [(i * VAL_SIZE, lift) for i, lift in enumerate(lifts)]
    if pass_store:
        return lambda args, res: (res, *[lift(args + at, res) for at, lift in offsets])
    return lambda args, res: tuple(lift(args + at, res) for at, lift in offsets)


# The per-Store resource tables, by wasmtime_context_t address (the ctx a callback receives).
STORES: dict[int, Resources] = {}
_FUNCTIONS: list[HostFunction] = []

_CALLBACK = ctypes.CFUNCTYPE(_sz, _vp, _vp, _vp, _vp, _sz, _vp, _sz)
_DTOR = ctypes.CFUNCTYPE(_sz, _vp, _vp, _u32)
_FINALIZER = ctypes.CFUNCTYPE(None, _vp)


def _trap(message: str) -> int:
    return _error_new(message.encode())


@_CALLBACK
def _trampoline(data: int, ctx: int, _ty: int, args: int, _nargs: int, results: int,
                _nresults: int) -> int:
    fn = _FUNCTIONS[data or 0]
    try:
        res = STORES[ctx]
        res.ctx = ctx
        try:
            value = fn.func(*fn.arguments(args, res))
        except Err as err:
            if fn.lower_err is None:
                raise Trap(f"{fn.name}: error {err.value!r}") from None
            fn.lower_err(err, results, res)
            return 0
        if fn.lower is not None:
            fn.lower(value, results, res)
        return 0
    except Trap as trap:
        return _trap(f"{fn.name}: {trap}")
    except Exception:
        log.exception("host function %s failed", fn.name)
        return _trap(f"host function {fn.name} failed")


@_DTOR
def _resource_dtor(_data: int, ctx: int, rep: int) -> int:
    res = STORES.get(ctx)
    if res is not None:
        _drop_quietly(res.remove(rep))
    return 0


@_FINALIZER
def _no_finalizer(_data: int) -> None:
    return None


_add_func = _proto("wasmtime_component_linker_instance_add_func", _vp, _vp, ctypes.c_char_p, _sz,
                   _CALLBACK, _vp, _FINALIZER)
_add_resource = _proto("wasmtime_component_linker_instance_add_resource", _vp, _vp,
                       ctypes.c_char_p, _sz, _vp, _DTOR, _vp, _FINALIZER)
_resource_type_new_host = _proto("wasmtime_component_resource_type_new_host", _vp, _u32)
_resource_type_delete = _proto("wasmtime_component_resource_type_delete", None, _vp)


def _check(err: Optional[int], what: str) -> None:
    if err:
        cause = WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))
        raise WasmtimeError(f"{what}: {cause}")


def add_function(instance_ptr: int, name: str, fn: HostFunction) -> None:
    """Define ``fn`` as ``name`` in a linker instance, called through the shared trampoline."""
    _FUNCTIONS.append(fn)
    raw = name.encode()
    _check(_add_func(instance_ptr, raw, len(raw), _trampoline, len(_FUNCTIONS) - 1, _no_finalizer),
           f"defining {fn.name}")


def add_resource(instance_ptr: int, name: str, resource_id: int) -> None:
    """Define a host resource type in a linker instance; guest drops release the table entry."""
    raw = name.encode()
    ty = _resource_type_new_host(resource_id)
    try:
        _check(_add_resource(instance_ptr, raw, len(raw), ty, _resource_dtor, None, _no_finalizer),
               f"defining resource {name}")
    finally:
        _resource_type_delete(ty)
