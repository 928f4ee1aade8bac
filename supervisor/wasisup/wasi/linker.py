"""Bind the WASI host to whatever a component imports, at whatever 0.2.x version it asks for."""

from __future__ import annotations

from typing import Collection

from wasmtime import Engine
from wasmtime.component import Component, ComponentInstanceType, FuncType, Linker, ResourceType

from . import abi, cli, clocks, filesystem, http, io, random, sockets
from .abi import Interface, host_function

INTERFACES: dict[str, Interface] = {
    iface.name: iface
    for module in (io, clocks, random, cli, filesystem, sockets, http)
    for iface in module.INTERFACES
}

# Each host resource type gets a wasmtime host type id, in declaration order.
RESOURCES: dict[str, type[abi.Resource]] = {}
for _iface in INTERFACES.values():
    for _name, _cls in _iface.resources.items():
        RESOURCES[f"{_iface.name}#{_name}"] = _cls
        _cls.resource_id = len(RESOURCES)


class LinkError(Exception):
    """The component needs something this host does not provide."""


def split_version(name: str) -> tuple[str, str]:
    """``wasi:io/poll@0.2.9`` -> (``wasi:io/poll``, ``0.2.9``)."""
    base, _, version = name.partition("@")
    return base, version


def link(linker: Linker, component: Component, engine: Engine,
         provided: Collection[str] = ()) -> None:
    """Define every import of ``component`` in ``linker`` from the host's interface tables.

    ``provided`` names imports the caller has already defined itself (an embedder's own API).
    """
    # A resource an interface ``use``s is the same type as where it is defined; the first
    # interface (in import order) that exports a resource type is its origin.
    seen: list[tuple[ResourceType, int]] = []

    def resource_id(ty: ResourceType, iface: str, name: str) -> int:
        for other, rid in seen:
            if other == ty:
                return rid
        cls = RESOURCES.get(f"{iface}#{name}")
        if cls is None:
            raise LinkError(f"unsupported resource {iface}/{name}")
        seen.append((ty, cls.resource_id))
        return cls.resource_id

    with linker.root() as root:
        for import_name, item in component.type.imports(engine).items():
            if import_name in provided:
                continue
            ty = item.ty
            base, version = split_version(import_name)
            iface = INTERFACES.get(base)
            if not isinstance(ty, ComponentInstanceType) or iface is None:
                raise LinkError(f"the component imports {import_name}, which wasisup does not provide "
                                "(it serves the wasi:http/proxy world)")
            if not version.startswith("0.2"):
                raise LinkError(f"the component imports {import_name}; wasisup hosts WASI 0.2.x")
            with root.add_instance(import_name) as instance:
                ptr = instance.ptr()
                for name, export in ty.exports(engine).items():
                    ety = export.ty
                    if isinstance(ety, ResourceType):
                        abi.add_resource(ptr, name, resource_id(ety, base, name))
                    elif isinstance(ety, FuncType):
                        func = iface.functions.get(name, iface.default)
                        if func is None:
                            raise LinkError(f"{import_name} function {name} is not provided by wasisup")
                        fn = host_function(f"{import_name}#{name}", func,
                                           [t for _, t in ety.params], ety.result)
                        abi.add_function(ptr, name, fn)
