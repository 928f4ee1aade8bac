"""wasi:random — secure bytes from the OS; the insecure variants from a per-process PRNG."""

from __future__ import annotations

import os
import random
from typing import Any

from .abi import Interface

_insecure = random.Random()
_SEED = (_insecure.getrandbits(64), _insecure.getrandbits(64))


def get_random_bytes(store: Any, length: int) -> bytes:
    return os.urandom(length)


def get_random_u64(store: Any) -> int:
    return int.from_bytes(os.urandom(8), "little")


def get_insecure_random_bytes(store: Any, length: int) -> bytes:
    return _insecure.randbytes(length)


def get_insecure_random_u64(store: Any) -> int:
    return _insecure.getrandbits(64)


def insecure_seed(store: Any) -> tuple[int, int]:
    return _SEED


INTERFACES = [
    Interface("wasi:random/random", functions={
        "get-random-bytes": get_random_bytes,
        "get-random-u64": get_random_u64,
    }),
    Interface("wasi:random/insecure", functions={
        "get-insecure-random-bytes": get_insecure_random_bytes,
        "get-insecure-random-u64": get_insecure_random_u64,
    }),
    Interface("wasi:random/insecure-seed", functions={"insecure-seed": insecure_seed}),
]
