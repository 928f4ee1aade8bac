"""Sends every kind of WIT value through the host (wasisup:test/host) and checks the answers."""

import wit_world
from componentize_py_types import Err, Ok
from wit_world.imports import host as v

SCALARS = (True, -128, 255, -32768, 65535, -2**31, 2**32 - 1, -2**63, 2**64 - 1, 1.5, -0.25, "🦀")
POINTS = [v.Point(1, -2, "a"), v.Point(2**31 - 1, -2**31, "é")]
SHAPES = [v.Shape_Circle(2.5), v.Shape_Square(v.Point(3, 4, "sq")), v.Shape_Empty()]
COLORS = [v.Color.BLUE, v.Color.RED]
NESTED = [Ok(7), Ok(None), Err(v.Color.GREEN)]
# What each host function answers, for the host's hostile answers (the call traps instead).
ANSWER = {
    "text": lambda: v.text("x"),
    "scalars": lambda: v.scalars(*SCALARS),
    "points": lambda: v.points(POINTS),
    "maybe": lambda: v.maybe("x"),
    "shapes": lambda: v.shapes(SHAPES),
    "colors": lambda: v.colors(COLORS),
    "perms": lambda: v.perms(v.Access.READ),
    "nested": lambda: v.nested(NESTED),
    "things": lambda: len(v.things(["a", "b"])),
}


class WitWorld(wit_world.WitWorld):
    def run(self, case: str) -> str:
        if case == "round-trip":
            answers = {
                "scalars": (v.scalars(*SCALARS), SCALARS),
                "text": (v.text("héllo"), "héllo"),
                "empty text": (v.text(""), ""),
                "blob": (v.blob(bytes(range(256))), bytes(range(256))),
                "empty blob": (v.blob(b""), b""),
                "points": (v.points(POINTS), POINTS),
                "some": (v.maybe("x"), "x"),
                "none": (v.maybe(None), None),
                "shapes": (v.shapes(SHAPES), SHAPES),
                "colors": (v.colors(COLORS), COLORS),
                "perms": (v.perms(v.Access.READ | v.Access.EXEC), v.Access.READ | v.Access.EXEC),
                "no perms": (v.perms(v.Access(0)), v.Access(0)),
                "checked": (v.checked(4), 4),
                "nested": (v.nested(NESTED), NESTED),
            }
            wrong = [f"{name}: {got!r} != {want!r}" for name, (got, want) in answers.items()
                     if got != want]
            return "; ".join(wrong) or "ok"
        if case == "checked-err":
            try:
                v.checked(3)
            except Err as err:
                return f"err {err.value}"
            return "no error"
        if case == "broken":
            return str(v.broken())
        if case.startswith("pause "):
            try:
                return f"ok {v.pause(int(case.split()[1]))}"
            except Err as err:
                return f"err {err.value}"
        if case in ANSWER:  # the host decides what comes back: the guest passes it on
            return repr(ANSWER[case]())
        return f"unknown case {case}"
