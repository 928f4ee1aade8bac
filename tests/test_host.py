"""The WASI host's surface: whatever 0.2.x interfaces a guest imports are all provided."""

from __future__ import annotations

import logging
import shutil
import socket
from typing import Callable

import pytest
from wasmtime import Engine, Store, WasmtimeError
from wasmtime.component import Component, ComponentInstanceType, FuncType, Linker

from conftest import guest
from wasisup import capi
from wasisup.compile import engine_config, prepare
from wasisup.http.connection import Connection
from wasisup.http.handler import GuestCall, GuestHandler
from wasisup.http.request_head import Limits
from wasisup import runtime as runtime_module
from wasisup.runtime import Runtime
from wasisup.wasi import abi
from wasisup.wasi.abi import Err, Ok
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


def test_a_component_beyond_the_pools_bounds_gets_instances_on_demand(monkeypatch, caplog):
    monkeypatch.setattr(runtime_module, "POOL_TABLES_PER_COMPONENT", 1)  # it has 2
    caplog.set_level(logging.INFO, logger="wasisup.runtime")
    runtime = Runtime(prepare(guest("hello")).cwasm, [], None)
    runtime.release(runtime.acquire())
    assert "exceeds the configured maximum of 1 in the pooling allocator" in caplog.text
    assert "allocated on demand" in caplog.text
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
        instance = runtime.acquire()
        instance.uses += 1  # as start() would
        seen.append(instance)
        runtime.release(instance)
    assert len({id(instance) for instance in seen}) == 3  # 3 + 3 + 1
    runtime.close()


class Thing(abi.Resource):
    """The values guest's own resource type (a host type id beside the WASI host's)."""

    resource_id = 10_000
    dropped = 0

    def drop(self) -> None:
        Thing.dropped += 1


class ValuesGuest:
    """The values guest, its host interface bound to functions that record what they get and
    answer it back, or what ``answers`` holds for them (a callable making the answer); each
    ``run`` in a fresh instance, since a trap spends one."""

    interface = "wasisup:test/host"

    def __init__(self) -> None:
        self.received: dict = {}
        self.answers: dict[str, Callable] = {}
        self.engine = Engine(engine_config())
        self.component = Component(self.engine, guest("values").read_bytes())

        def checked(x: int) -> int:
            if x % 2:
                raise Err("odd")
            return x

        functions = {name: self._record(name) for name in (
            "text", "blob", "points", "maybe", "shapes", "colors", "perms", "nested", "things")}
        functions["scalars"] = self._record("scalars", lambda *scalars: scalars)
        functions["checked"] = self._record("checked", checked)
        functions["broken"] = self._record("broken", lambda: 256)  # does not fit its u8
        functions["pause"] = pause
        self.linker = Linker(self.engine)
        types = self.component.type.imports(self.engine)[self.interface].ty.exports(self.engine)
        with self.linker.root() as root, root.add_instance(self.interface) as instance:
            abi.add_resource(instance.ptr(), "thing", Thing.resource_id)
            for name, func in functions.items():
                params = [t for _, t in types[name].ty.params]
                abi.add_function(instance.ptr(), name,
                                 abi.host_function(f"{self.interface}#{name}", func, params,
                                                   types[name].ty.result))
        link(self.linker, self.component, self.engine, provided={self.interface})
        self.context = WasiContext([], None)

    def _record(self, name: str, answer: Callable = lambda value: value) -> Callable:
        def host_function(store, *args):
            self.received[name] = args[0] if len(args) == 1 else args
            if name in self.answers:
                return self.answers[name]()
            return answer(*args)
        return host_function

    def run(self, case: str) -> str:
        store = Store(self.engine)
        store.set_epoch_deadline(1 << 62)
        self.context = WasiContext([], None)
        ctx = capi.context_address(store)
        abi.STORES[ctx] = self.context
        try:
            instance = capi.instantiate(self.linker, store, self.component, lambda: None)
            return capi.call(instance.get_func(store, "run"), store, case, on_pending=self._pending)
        finally:
            del abi.STORES[ctx]

    def _pending(self) -> None:
        """The guest waits in ``pause``: poll again, unless the host function failed there."""
        if self.context.failed:
            raise WasmtimeError(self.context.failed)


def pause(store, times: int):
    """A host function that waits: it suspends the guest ``times`` times, then returns (99:
    raises a bug, 98: the result's error case, 97: a value that does not fit)."""
    for _ in range(times):
        yield
    if times == 99:
        raise RuntimeError("a bug in a host function that waited")
    if times == 98:
        raise Err("no")
    return 2**40 if times == 97 else times


def test_every_kind_of_value_crosses_the_trampoline_both_ways(caplog):
    values = ValuesGuest()
    received, run = values.received, values.run
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


# Answers the trampoline cannot hand over, each failing at a different depth of a value.
HOSTILE = {
    "a lone surrogate": ("text", lambda: "\udcff"),
    "a list broken part-way": ("points", lambda: [{"x": 1, "y": 2, "label": "a"},
                                                  {"x": 1, "y": 2, "label": "\ud800"}]),
    "an integer too wide, after a string": ("points", lambda: [{"x": 1, "y": 2, "label": "a"},
                                                               {"x": 2**40, "y": 2, "label": "b"}]),
    "a record field missing": ("points", lambda: [{"x": 1, "y": 2}]),
    "an option's payload": ("maybe", lambda: "\udcff"),
    "a variant's payload, in a list": ("shapes", lambda: [("circle", 1.0),
                                                          ("square", {"x": 1, "y": 2, "label": "\udcff"})]),
    "a variant case that does not exist": ("shapes", lambda: [("circle", 1.0), ("triangle", 1.0)]),
    "an enum case that does not exist": ("colors", lambda: ["blue", "mauve"]),
    "a flag that is not a name": ("perms", lambda: ["read", 3]),
    "a char that is a surrogate": ("scalars", lambda: (True, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, "\udcff")),
    "a result's payload too wide": ("nested", lambda: [Ok(7), Ok(300)]),
    "a handle handed over, then a string": ("things", lambda: [(Thing(), "a"), (Thing(), "\udcff")]),
}


def test_a_value_the_host_cannot_hand_over_traps_the_guest_and_leaks_nothing(caplog):
    values = ValuesGuest()
    for label, (name, answer) in HOSTILE.items():
        values.answers = {name: answer}
        with pytest.raises(WasmtimeError, match=f"host function {values.interface}#{name} failed"):
            values.run(name)
        assert len(values.context) == 0, label  # no resource left in the Store's table
    assert Thing.dropped == 2  # both handles were taken back and dropped
    values.answers = {}
    assert values.run("round-trip") == "ok"


@pytest.mark.parametrize("text", ["", "a\x00b", "\U0001f980" * 1000, "é" * 1_000_000])
def test_any_unicode_string_crosses_the_trampoline(text):
    values = ValuesGuest()
    values.answers = {"text": lambda: text}
    assert values.run("text") == repr(text)


def test_a_host_function_that_waits_suspends_the_guest_and_fails_cleanly(caplog):
    values = ValuesGuest()
    assert values.run("pause 0") == "ok 0"  # returned without waiting
    assert values.run("pause 3") == "ok 3"  # resumed three times
    assert values.run("pause 98") == "err no"  # the error case, raised after waiting
    for times in (99, 97):  # a bug, or a result that cannot be handed over: a trap, no abort
        with pytest.raises(WasmtimeError, match=f"host function {values.interface}#pause failed"):
            values.run(f"pause {times}")
    assert "a bug in a host function that waited" in caplog.text
    assert values.run("round-trip") == "ok"


@pytest.mark.parametrize("value, status", [
    ("\udcff", 500),  # not UTF-8: get-environment traps the guest (500), the worker lives
    ("a\x00b", 500),  # (the guest's own CPython traps on it: a POSIX environment has no NUL)
    ("\U0001f980" * 100, 200), ("x" * 1_000_000, 200),
])
def test_a_hostile_guest_environment_costs_a_request_at_most(value, status):
    # (the settings refuse the first two at startup; this is what a guest does if one slips by)
    runtime = Runtime(prepare(guest("proxy")).cwasm, [("X", value)], None)
    server_end, client = socket.socketpair()
    conn = Connection(server_end, None, Limits())
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    call = GuestCall(GuestHandler(runtime), conn, conn.read_head())
    if call.start():
        while not call.step():  # (it waits for nothing: each step runs until it ends)
            pass
    conn.flush()
    assert client.recv(65536).startswith(b"HTTP/1.1 %d " % status)
    runtime.close()
