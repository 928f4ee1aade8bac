"""wasi:clocks — monotonic time (with timer pollables) and wall-clock time."""

from __future__ import annotations

import time
from typing import Any

from .abi import Interface
from .io import Pollable


class Timer:
    """Readiness of a monotonic-clock instant, in nanoseconds."""

    def __init__(self, deadline: int) -> None:
        self.deadline = deadline

    def ready(self) -> bool:
        return time.monotonic_ns() >= self.deadline


def monotonic_now(store: Any) -> int:
    return time.monotonic_ns()


def monotonic_resolution(store: Any) -> int:
    return 1


def subscribe_instant(store: Any, when: int) -> Pollable:
    return Pollable(Timer(when), store.waiter)


def subscribe_duration(store: Any, duration: int) -> Pollable:
    return Pollable(Timer(time.monotonic_ns() + duration), store.waiter)


def wall_now(store: Any) -> dict:
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    return {"seconds": seconds, "nanoseconds": nanoseconds}


def wall_resolution(store: Any) -> dict:
    return {"seconds": 0, "nanoseconds": 1}


INTERFACES = [
    Interface("wasi:clocks/monotonic-clock", functions={
        "now": monotonic_now,
        "resolution": monotonic_resolution,
        "subscribe-instant": subscribe_instant,
        "subscribe-duration": subscribe_duration,
    }),
    Interface("wasi:clocks/wall-clock", functions={
        "now": wall_now,
        "resolution": wall_resolution,
    }),
]
