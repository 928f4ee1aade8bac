"""The host state of one wasmtime Store: its resources, waiter, environment and stdio."""

from __future__ import annotations

from typing import Any

from .abi import Resources
from .cli import LogSink
from .io import Waiter


class WasiContext(Resources):
    """Everything WASI functions reach through the Store they are called from."""

    def __init__(self, env: list[tuple[str, str]], outbound: Any) -> None:
        super().__init__()
        self.env = env
        self.outbound = outbound  # wasisup.http.client.OutboundClient: sends guest requests
        self.waiter = Waiter()
        self.request_id = "-"
        self.trace: Any = None  # the request's wasisup.tracing.Trace (None: not traced)
        self.stdout = LogSink("stdout", self._request_id)
        self.stderr = LogSink("stderr", self._request_id)

    def _request_id(self) -> str:
        return self.request_id

    def end_request(self) -> None:
        """Flush what the guest printed without a final newline."""
        self.trace = None
        self.stdout.flush_line()
        self.stderr.flush_line()

    def close(self) -> None:
        self.end_request()
        self.drop_all()
