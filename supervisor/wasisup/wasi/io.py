"""wasi:io — pollables, input/output streams and errors, over host-side byte sources and sinks.

A guest runs on one thread; everything it waits for is either a file descriptor (the client
socket) or state changed by another thread (an outbound request's pump), which pokes the
Store's ``Waker``. ``poll`` sleeps in ``select`` on both, with the GIL released.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Protocol

from .abi import Err, Interface, Resource, Trap

DEADLINE_EXCEEDED = "the request deadline passed while the guest waited"
# How much a guest may write before it has to wait (check-write's answer); blocking-write's cap.
WRITE_BUDGET = 16 * 1024
BLOCKING_WRITE_LIMIT = 4096


class Waker:
    """An eventfd that other threads poke when something a Store's guest may wait on changed."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Run before the guest sleeps: the server sends what the guest wrote so far.
        self.before_sleep: Optional[Callable[[], None]] = None
        # The current request's deadline (time.monotonic_ns), if it has one.
        self.deadline: Optional[int] = None

    def wake(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except (BlockingIOError, OSError):
            pass

    def wait(self, fds: list[tuple[int, bool]], timeout: Optional[float]) -> None:
        """Sleep until woken, one of ``fds`` (fd, for_write) is ready, or ``timeout`` passes."""
        if self.before_sleep is not None:
            self.before_sleep()
        readers = [self.fd] + [fd for fd, for_write in fds if not for_write]
        writers = [fd for fd, for_write in fds if for_write]
        ready, _, _ = select.select(readers, writers, [], timeout)
        if self.fd in ready:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass

    def close(self) -> None:
        os.close(self.fd)


class Readiness(Protocol):
    """What a pollable waits for."""

    def ready(self) -> bool: ...


def wait_hint(source: Readiness) -> tuple[Optional[tuple[int, bool]], Optional[float]]:
    """The fd (and direction) and the monotonic deadline a not-yet-ready source sleeps on."""
    fd = getattr(source, "wait_fd", None)
    deadline = getattr(source, "deadline", None)
    return (fd() if fd else None), deadline


class Pollable(Resource):
    """wasi:io/poll pollable: a readiness condition of some host object."""

    def __init__(self, source: Readiness, waker: Waker) -> None:
        self.source = source
        self.waker = waker

    def ready(self) -> bool:
        return self.source.ready()

    def block(self) -> None:
        wait_any([self], self.waker)


def wait_any(pollables: list[Pollable], waker: Waker) -> list[int]:
    """Block until at least one pollable is ready; return the indexes of those that are."""
    while True:
        ready = [i for i, p in enumerate(pollables) if p.source.ready()]
        if ready:
            return ready
        fds, deadline = [], None
        for p in pollables:
            fd, when = wait_hint(p.source)
            if fd is not None:
                fds.append(fd)
            if when is not None:
                deadline = when if deadline is None else min(deadline, when)
        if waker.deadline is not None:
            if time.monotonic_ns() >= waker.deadline:
                raise Trap(DEADLINE_EXCEEDED)
            deadline = waker.deadline if deadline is None else min(deadline, waker.deadline)
        timeout = None if deadline is None else max(0.0, (deadline - time.monotonic_ns()) / 1e9)
        waker.wait(fds, timeout)


def poll(store: Any, pollables: list[Pollable]) -> list[int]:
    if not pollables:
        raise Trap("poll needs at least one pollable")
    return wait_any(pollables, store.waker)


class StreamClosed(Exception):
    """The stream ended (input) or can take no more data (output)."""


class StreamFailed(Exception):
    """The stream broke; ``error`` is what the guest gets as its wasi:io error."""

    def __init__(self, error: "IoError") -> None:
        super().__init__(error.message)
        self.error = error


class IoError(Resource):
    """wasi:io/error error; may carry a wasi:http error-code for ``http-error-code``."""

    def __init__(self, message: str, http_error_code: Any = None) -> None:
        self.message = message
        self.http_error_code = http_error_code

    def to_debug_string(self) -> str:
        return self.message


def _stream_error(exc: Exception) -> Err:
    if isinstance(exc, StreamFailed):
        return Err(("last-operation-failed", exc.error))
    return Err("closed")


class ByteSource(Readiness, Protocol):
    """Where an input stream's bytes come from."""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes available now (b"" if none yet); StreamClosed at the end."""

    def close(self) -> None: ...


class ByteSink(Readiness, Protocol):
    """Where an output stream's bytes go."""

    def capacity(self) -> int:
        """How many bytes ``write`` accepts now (0: wait for ready()); StreamClosed if done."""

    def write(self, data: bytes) -> None: ...

    def flush(self) -> None: ...


class InputStream(Resource):
    """wasi:io/streams input-stream."""

    def __init__(self, source: ByteSource, waker: Waker) -> None:
        self.source = source
        self.waker = waker

    def read(self, size: int) -> bytes:
        try:
            return self.source.read(size)
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def blocking_read(self, size: int) -> bytes:
        if size == 0:
            return self.read(0)
        while True:
            data = self.read(size)
            if data:
                return data
            wait_any([Pollable(self.source, self.waker)], self.waker)

    def skip(self, size: int) -> int:
        return len(self.read(size))

    def blocking_skip(self, size: int) -> int:
        return len(self.blocking_read(size))

    def subscribe(self) -> Pollable:
        return Pollable(self.source, self.waker)

    def drop(self) -> None:
        self.source.close()


class OutputStream(Resource):
    """wasi:io/streams output-stream."""

    def __init__(self, sink: ByteSink, waker: Waker) -> None:
        self.sink = sink
        self.waker = waker

    def check_write(self) -> int:
        try:
            return self.sink.capacity()
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def write(self, data: bytes) -> None:
        if len(data) > self.check_write():
            raise Trap("write exceeds what check-write permitted")
        try:
            self.sink.write(data)
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def _wait_writable(self) -> None:
        while self.check_write() == 0:
            wait_any([Pollable(self.sink, self.waker)], self.waker)

    def blocking_write_and_flush(self, data: bytes) -> None:
        if len(data) > BLOCKING_WRITE_LIMIT:
            raise Trap(f"blocking-write-and-flush takes at most {BLOCKING_WRITE_LIMIT} bytes")
        view = memoryview(data)
        while view:
            self._wait_writable()
            chunk = view[:self.check_write()]
            self.write(bytes(chunk))
            view = view[len(chunk):]
        self.blocking_flush()

    def flush(self) -> None:
        try:
            self.sink.flush()
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def blocking_flush(self) -> None:
        self.flush()
        self._wait_writable()

    def write_zeroes(self, size: int) -> None:
        self.write(bytes(size))

    def blocking_write_zeroes_and_flush(self, size: int) -> None:
        self.blocking_write_and_flush(bytes(size))

    def splice(self, src: InputStream, size: int) -> int:
        budget = min(size, self.check_write())
        data = src.read(budget) if budget else b""
        if data:
            self.write(data)
        return len(data)

    def blocking_splice(self, src: InputStream, size: int) -> int:
        self._wait_writable()
        data = src.blocking_read(min(size, self.check_write()))
        if data:
            self.write(data)
        return len(data)

    def subscribe(self) -> Pollable:
        return Pollable(self.sink, self.waker)


class _Pipe:
    """A bounded byte queue between a guest and a host thread; each side wakes the other."""

    def __init__(self, waker: Waker, limit: int = 1024 * 1024) -> None:
        self.waker = waker
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False  # the writer finished
        self._abandoned = False  # the reader went away
        self._error: Optional[IoError] = None
        self._cond = threading.Condition()

    def _changed(self) -> None:
        self._cond.notify_all()
        self.waker.wake()


class InboundPipe(_Pipe):
    """Host thread -> guest: the body of an outbound request's response."""

    def ready(self) -> bool:
        return bool(self._chunks) or self._eof or self._abandoned

    def read(self, size: int) -> bytes:
        with self._cond:
            if not self._chunks:
                if self._error is not None:
                    raise StreamFailed(self._error)
                if self._eof or self._abandoned:
                    raise StreamClosed()
                return b""
            chunk = self._chunks.popleft()
            if len(chunk) > size:
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self._size -= len(chunk)
            self._cond.notify_all()
            return chunk

    def close(self) -> None:
        with self._cond:
            self._abandoned = True
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()

    def put(self, data: bytes) -> bool:
        """Queue ``data`` once there is room (back-pressure); False if the guest went away."""
        with self._cond:
            self._cond.wait_for(lambda: self._size < self.limit or self._abandoned)
            if self._abandoned:
                return False
            self._chunks.append(data)
            self._size += len(data)
            self._changed()
            return True

    def finish(self, error: Optional[IoError] = None) -> None:
        with self._cond:
            self._error = error
            self._eof = True
            self._changed()

    @staticmethod
    def trailers() -> None:
        """Upstream trailers are not kept (urllib3 drops them)."""
        return None


class OutboundPipe(_Pipe):
    """Guest -> host thread: the body of an outbound request."""

    aborted = False

    def ready(self) -> bool:
        return self._size < self.limit or self._abandoned or self._eof

    def capacity(self) -> int:
        if self._abandoned or self._eof:
            raise StreamClosed()
        return max(0, min(WRITE_BUDGET, self.limit - self._size))

    def write(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()

    def flush(self) -> None:
        pass

    def finish(self, trailers: Any = None) -> None:
        """The guest finished the body (trailers are not sent: urllib3 cannot)."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abort(self) -> None:
        """The guest dropped the body unfinished: the request must fail, not end short."""
        with self._cond:
            self.aborted = True
            self._eof = True
            self._cond.notify_all()

    def take(self) -> Optional[bytes]:
        """The next chunk, waiting for the guest to write it; None once it finished."""
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self._eof or self._abandoned)
            if not self._chunks:
                return None
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            self._changed()
            return chunk

    def abandon(self) -> None:
        """The consumer gave up (the connection failed): further guest writes see closed."""
        with self._cond:
            self._abandoned = True
            self._chunks.clear()
            self._size = 0
            self._changed()


class EmptySource:
    """An input stream with nothing in it (stdin)."""

    @staticmethod
    def ready() -> bool:
        return True

    @staticmethod
    def read(size: int) -> bytes:
        raise StreamClosed()

    @staticmethod
    def close() -> None:
        pass


INTERFACES = [
    Interface("wasi:io/poll", resources={"pollable": Pollable}, functions={
        "[method]pollable.ready": Pollable.ready,
        "[method]pollable.block": Pollable.block,
        "poll": poll,
    }),
    Interface("wasi:io/error", resources={"error": IoError}, functions={
        "[method]error.to-debug-string": IoError.to_debug_string,
    }),
    Interface("wasi:io/streams", resources={"input-stream": InputStream, "output-stream": OutputStream},
              functions={
        "[method]input-stream.read": InputStream.read,
        "[method]input-stream.blocking-read": InputStream.blocking_read,
        "[method]input-stream.skip": InputStream.skip,
        "[method]input-stream.blocking-skip": InputStream.blocking_skip,
        "[method]input-stream.subscribe": InputStream.subscribe,
        "[method]output-stream.check-write": OutputStream.check_write,
        "[method]output-stream.write": OutputStream.write,
        "[method]output-stream.blocking-write-and-flush": OutputStream.blocking_write_and_flush,
        "[method]output-stream.flush": OutputStream.flush,
        "[method]output-stream.blocking-flush": OutputStream.blocking_flush,
        "[method]output-stream.write-zeroes": OutputStream.write_zeroes,
        "[method]output-stream.blocking-write-zeroes-and-flush":
            OutputStream.blocking_write_zeroes_and_flush,
        "[method]output-stream.splice": OutputStream.splice,
        "[method]output-stream.blocking-splice": OutputStream.blocking_splice,
        "[method]output-stream.subscribe": OutputStream.subscribe,
    }),
]
