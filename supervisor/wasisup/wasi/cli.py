"""wasi:cli — environment from ``--env``, stdio to the log (prefixed with the request id)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from .abi import Interface, Ok, Resource, Trap
from .io import EmptySource, InputStream, OutputStream

guest_log = logging.getLogger("wasisup.guest")


class LogSink:
    """An output stream that turns guest stdout/stderr into log lines."""

    MAX_LINE = 16 * 1024

    def __init__(self, stream: str, request_id: Callable[[], str]) -> None:
        self.stream = stream
        self.request_id = request_id
        self._partial = b""

    @staticmethod
    def ready() -> bool:
        return True

    @staticmethod
    def capacity(limit: int) -> int:
        return limit

    def write(self, data: bytes | memoryview) -> None:
        *lines, self._partial = (self._partial + bytes(data)).split(b"\n")
        for line in lines:
            self._emit(line)
        if len(self._partial) > self.MAX_LINE:
            self.flush_line()

    def flush(self) -> None:
        pass

    def flush_line(self) -> None:
        """Emit a trailing line without newline (at the end of a request)."""
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        guest_log.info("[%s] %s: %s", self.request_id(), self.stream,
                       line.decode("utf-8", "replace").rstrip("\r"))


class TerminalInput(Resource):
    """Never created: a server's guest has no terminal."""


class TerminalOutput(Resource):
    """Never created: a server's guest has no terminal."""


def get_environment(store: Any) -> list[tuple[str, str]]:
    return store.env


def get_arguments(store: Any) -> list[str]:
    return []


def initial_cwd(store: Any) -> None:
    return None


def exit_(store: Any, status: Any) -> None:
    raise Trap(f"guest exited ({'success' if isinstance(status, Ok) else 'failure'})")


def exit_with_code(store: Any, code: int) -> None:
    raise Trap(f"guest exited with code {code}")


def get_stdin(store: Any) -> InputStream:
    return InputStream(EmptySource(), store.waiter)


def get_stdout(store: Any) -> OutputStream:
    return OutputStream(store.stdout, store.waiter)


def get_stderr(store: Any) -> OutputStream:
    return OutputStream(store.stderr, store.waiter)


def no_terminal(store: Any) -> None:
    return None


INTERFACES = [
    Interface("wasi:cli/environment", functions={
        "get-environment": get_environment,
        "get-arguments": get_arguments,
        "initial-cwd": initial_cwd,
    }),
    Interface("wasi:cli/exit", functions={"exit": exit_, "exit-with-code": exit_with_code}),
    Interface("wasi:cli/stdin", functions={"get-stdin": get_stdin}),
    Interface("wasi:cli/stdout", functions={"get-stdout": get_stdout}),
    Interface("wasi:cli/stderr", functions={"get-stderr": get_stderr}),
    Interface("wasi:cli/terminal-input", resources={"terminal-input": TerminalInput}, functions={}),
    Interface("wasi:cli/terminal-output", resources={"terminal-output": TerminalOutput}, functions={}),
    Interface("wasi:cli/terminal-stdin", functions={"get-terminal-stdin": no_terminal}),
    Interface("wasi:cli/terminal-stdout", functions={"get-terminal-stdout": no_terminal}),
    Interface("wasi:cli/terminal-stderr", functions={"get-terminal-stderr": no_terminal}),
]
