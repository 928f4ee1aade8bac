"""The WASI host's surface: whatever 0.2.x interfaces a guest imports are all provided."""

from __future__ import annotations

import pytest
from wasmtime import Engine
from wasmtime.component import Component, ComponentInstanceType, FuncType

from conftest import guest
from wasisup.compile import prepare
from wasisup.runtime import Runtime
from wasisup.wasi.linker import INTERFACES, split_version


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


def test_guest_instances_are_reused_only_up_to_the_limit():
    runtime = Runtime(prepare(guest("hello")).cwasm, [], None, max_instance_reuse=3)
    seen = []
    for _ in range(7):
        with runtime.guest() as instance:
            instance.uses += 1  # as handle() would
            seen.append(instance)
    assert len({id(instance) for instance in seen}) == 3  # 3 + 3 + 1
    runtime.close()
