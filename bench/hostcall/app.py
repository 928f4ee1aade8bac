"""Calls a host function in a loop, so the host's per-call and per-byte costs can be timed."""

import wit_world
from wit_world.imports import host


class WitWorld(wit_world.WitWorld):
    def run(self, op: str, iterations: int, size: int) -> int:
        moved = 0
        if op == "noop":
            for _ in range(iterations):
                host.noop()
        elif op == "take":
            data = bytes(size)
            for _ in range(iterations):
                host.take(data)
                moved += size
        elif op == "give":
            for _ in range(iterations):
                moved += len(host.give(size))
        return moved
