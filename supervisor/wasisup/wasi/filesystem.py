"""wasi:filesystem — no directories are preopened, so a guest never holds a descriptor.

Every descriptor operation is therefore unreachable; the interface answers ``access``
(the filesystem's permission error) where its type allows an error.
"""

from __future__ import annotations

from typing import Any

from .abi import Err, Interface, Resource


class Descriptor(Resource):
    """A file or directory; never created while no directory is preopened."""


class DirectoryEntryStream(Resource):
    """A directory listing; never created while no directory is preopened."""


def get_directories(store: Any) -> list:
    return []


def filesystem_error_code(store: Any, err: Any) -> None:
    return None


def denied(*_args: Any) -> None:
    raise Err("access")


INTERFACES = [
    Interface("wasi:filesystem/types",
              resources={"descriptor": Descriptor, "directory-entry-stream": DirectoryEntryStream},
              functions={"filesystem-error-code": filesystem_error_code},
              default=denied),
    Interface("wasi:filesystem/preopens", functions={"get-directories": get_directories}),
]
