"""The WASI host's surface: whatever 0.2.x interfaces a guest imports are all provided."""

from __future__ import annotations

import ctypes
import shutil
from typing import Callable

import pytest
from wasmtime import Engine, Store, WasmtimeError
from wasmtime.component import Component, ComponentInstanceType, FuncType, Linker

from conftest import guest
from wasisup.compile import engine_config, prepare
from wasisup.runtime import Runtime
from wasisup.wasi import abi
from wasisup.wasi.abi import Err
from wasisup.wasi.context import WasiContext
from wasisup.wasi.linker import INTERFACES, link, split_version


def imported_functions(component: Component, engine: Engine) -> dict[str, list[str]]:
    found = {}
    for name, item in component.type.imports(engine).items():
        assert isinstance(item.ty, ComponentInstanceType)
        found[name] = [f for f, e in item.ty.exports(engine).items() if isinstance(e.ty, FuncType)]
    return found


@pytest.mark.parametrize("name, version, at_least", [("hello", "0.2.9", 165), ("hello-js", "0.2.3", 40)])
def test_every_import_is_provided_at_its_version(name, version, at_least):
    runtime = Runtime(prepare(guest(name)).cwasm, [], None)  # links every import, or raises LinkError
    imports = imported_functions(runtime.component, runtime.engine)
    assert sum(map(len, imports.values())) >= at_least
    versions = {split_version(name)[1] for name in imports if name.startswith("wasi:")}
    assert versions == {version}
    for name, functions in imports.items():
        interface = INTERFACES[split_version(name)[0]]
        for function in functions:
            assert function in interface.functions or interface.default is not None, (name, function)
    runtime.close()


def test_the_compile_cache_knows_a_component_by_its_bytes_not_its_name(tmp_path):
    first = prepare(guest("hello"))
    renamed = tmp_path / "renamed.wasm"  # e.g. a new release copied over the served path
    shutil.copyfile(guest("hello"), renamed)
    again = prepare(renamed)
    assert (again.cwasm, again.compile_seconds) == (first.cwasm, 0.0)


def test_guest_instances_are_reused_only_up_to_the_limit():
    runtime = Runtime(prepare(guest("hello")).cwasm, [], None, max_instance_reuse=3)
    seen = []
    for _ in range(7):
        with runtime.guest() as instance:
            instance.uses += 1  # as handle() would
            seen.append(instance)
    assert len({id(instance) for instance in seen}) == 3  # 3 + 3 + 1
    runtime.close()


def _values_guest(received: dict) -> Callable[[str], str]:
    """The values guest with its host interface bound to functions that record what they get."""
    engine = Engine(engine_config())
    component = Component(engine, guest("values").read_bytes())
    interface = "wasisup:test/host"

    def record(name: str, answer: Callable = lambda value: value) -> Callable:
        def host_function(store, *args):
            received[name] = args[0] if len(args) == 1 else args
            return answer(*args)
        return host_function

    def checked(x: int) -> int:
        if x % 2:
            raise Err("odd")
        return x

    functions = {name: record(name) for name in (
        "text", "blob", "points", "maybe", "shapes", "colors", "perms", "nested")}
    functions["scalars"] = record("scalars", lambda *scalars: scalars)
    functions["checked"] = record("checked", checked)
    functions["broken"] = record("broken", lambda: 256)  # does not fit its u8
    linker = Linker(engine)
    types = component.type.imports(engine)[interface].ty.exports(engine)
    with linker.root() as root, root.add_instance(interface) as instance:
        for name, func in functions.items():
            params = [t for _, t in types[name].ty.params]
            abi.add_function(instance.ptr(), name,
                             abi.host_function(f"{interface}#{name}", func, params,
                                               types[name].ty.result))
    link(linker, component, engine, provided={interface})
    store = Store(engine)
    store.set_epoch_deadline(1 << 62)
    context = WasiContext([], None)
    abi.STORES[ctypes.cast(store._context(), ctypes.c_void_p).value] = context
    run = linker.instantiate(store, component).get_func(store, "run")
    return lambda case: run(store, case)


def test_every_kind_of_value_crosses_the_trampoline_both_ways(caplog):
    received: dict = {}
    run = _values_guest(received)
    assert run("round-trip") == "ok"  # the guest got back what it sent
    point = {"x": 3, "y": 4, "label": "sq"}
    assert received["scalars"] == (True, -128, 255, -32768, 65535, -2**31, 2**32 - 1, -2**63,
                                   2**64 - 1, 1.5, -0.25, "🦀")
    assert received["text"] == "" and received["blob"] == b""  # the last calls of each
    assert received["points"] == [{"x": 1, "y": -2, "label": "a"},
                                  {"x": 2**31 - 1, "y": -2**31, "label": "é"}]
    assert received["maybe"] is None
    assert received["shapes"] == [("circle", 2.5), ("square", point), "empty"]
    assert received["colors"] == ["blue", "red"]
    assert received["perms"] == set()
    assert received["checked"] == 4
    assert [(type(r).__name__, r.value) for r in received["nested"]] == [
        ("Ok", 7), ("Ok", None), ("Err", "green")]

    assert run("checked-err") == "err odd"  # Err raised by the host is the result's error case
    with pytest.raises(WasmtimeError, match="host function wasisup:test/host#broken failed"):
        run("broken")
    assert "OverflowError" in caplog.text  # the cause is logged, the guest sees a trap
