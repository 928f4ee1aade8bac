"""wasi:io — pollables, input/output streams and errors, over host-side byte sources and sinks.

A guest runs as a call future on one of the worker's event loops, and whatever it waits for is
a socket becoming readable or writable (the client's, an upstream's) or a deadline. A host
function that may wait is a generator function: it asks each source to make progress without
blocking and, when none is ready, says on the Store's ``Waiter`` what it waits for and yields.
The guest is then suspended (the trampoline hands wasmtime a continuation) until the loop sees
one of those sockets ready or the deadline pass, polls the guest again, and the function goes
on from its ``yield``. Nothing that waits holds a thread.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from typing import Any, Callable, Generator, Optional, Protocol

from .abi import Err, Interface, Resource, Trap

DEADLINE_EXCEEDED = "the request deadline passed while the guest waited"
# How much a guest may write before it has to wait (check-write's answer); blocking-write's cap.
WRITE_BUDGET = 16 * 1024
BLOCKING_WRITE_LIMIT = 4096
# The most a splice moves per call: bytes that only pass through the host move in big pieces.
SPLICE_BUDGET = 1024 * 1024

READABLE, WRITABLE = select.POLLIN, select.POLLOUT
# A socket to wait on: (fd, READABLE and/or WRITABLE).
Interest = tuple[int, int]
# What a host function that may wait is: it yields while it waits, then returns its result.
Waits = Generator[None, None, Any]


class Waiter:
    """Where one Store's guest says what it waits for: the sockets and the deadline (monotonic
    ns) its loop watches while the guest is suspended — never past the request's deadline."""

    def __init__(self) -> None:
        # Run before the guest waits: the server sends what the guest wrote so far, outbound
        # exchanges put their requests on the wire.
        self.before_sleep: list[Callable[[], None]] = []
        # The current request's deadline (time.monotonic_ns), if it has one.
        self.deadline: Optional[int] = None
        # While the guest is suspended: what it waits on (None: it is not waiting).
        self.interests: Optional[list[Interest]] = None
        self.wake_at: Optional[int] = None

    def sleep(self, sources: list["Readiness"]) -> Waits:
        """Wait for the first of ``sources`` to be ready (unless the hooks, which may make
        progress, made one so)."""
        for hook in list(self.before_sleep):
            hook()
        if any(source.ready() for source in sources):
            return
        interests, deadline = [], None  # (what the sources wait for now, after the hooks)
        for source in sources:
            interest, when = _wait_terms(source)
            if interest is not None:
                interests.append(interest)
            if when is not None:
                deadline = when if deadline is None else min(deadline, when)
        if self.deadline is not None:
            if time.monotonic_ns() >= self.deadline:
                raise Trap(DEADLINE_EXCEEDED)
            deadline = self.deadline if deadline is None else min(deadline, self.deadline)
        if not interests and deadline is None:
            raise Trap("the guest waits for something that can never become ready")
        self.interests, self.wake_at = interests, deadline
        try:
            yield
        finally:
            self.interests = self.wake_at = None


class Readiness(Protocol):
    """What a pollable waits for. ``ready`` may make progress (read or send what it can) but
    never blocks. A source that is not ready may also offer ``interest()`` (the socket to wait
    on) and ``deadline`` (monotonic ns, e.g. a timer or a timeout of its own)."""

    def ready(self) -> bool: ...


def _wait_terms(source: Readiness) -> tuple[Optional[Interest], Optional[int]]:
    interest = getattr(source, "interest", None)
    return (interest() if interest else None), getattr(source, "deadline", None)


class Pollable(Resource):
    """wasi:io/poll pollable: a readiness condition of some host object."""

    def __init__(self, source: Readiness, waiter: Waiter) -> None:
        self.source = source
        self.waiter = waiter

    def ready(self) -> bool:
        return self.source.ready()

    def block(self) -> Waits:
        yield from wait_any([self.source], self.waiter)


def wait_any(sources: list[Readiness], waiter: Waiter) -> Waits:
    """Wait until at least one source is ready; return the indexes of those that are."""
    while True:
        ready = [i for i, source in enumerate(sources) if source.ready()]
        if ready:
            return ready
        yield from waiter.sleep(sources)


def poll(store: Any, pollables: list[Pollable]) -> Waits:
    if not pollables:
        raise Trap("poll needs at least one pollable")
    return (yield from wait_any([p.source for p in pollables], store.waiter))


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
    """Where an input stream's bytes come from. A source may also offer
    ``read_into(view) -> int`` (same contract, into a buffer): splice then moves its bytes
    without an intermediate ``bytes`` object; and ``splice_into(pipe, size) -> int | None``
    (same contract, into a pipe inside the kernel; None when its bytes cannot go that way
    now): splice to a sink with ``write_from_pipe`` then never copies them through Python."""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes available now (b"" if none yet); StreamClosed at the end."""

    def close(self) -> None: ...


class ByteSink(Readiness, Protocol):
    """Where an output stream's bytes go. A sink may also offer ``takes_pipe() -> bool`` and
    ``write_from_pipe(pipe, count)`` (take exactly ``count`` bytes waiting in the pipe)."""

    def capacity(self, limit: int) -> int:
        """How many bytes (at most ``limit``) ``write`` accepts now (0: wait for ready());
        StreamClosed if done."""

    def write(self, data: bytes | memoryview) -> None:
        """Take ``data`` (a view is only valid during the call: copy what is kept)."""

    def flush(self) -> None: ...


class InputStream(Resource):
    """wasi:io/streams input-stream."""

    def __init__(self, source: ByteSource, waiter: Waiter) -> None:
        self.source = source
        self.waiter = waiter

    def read(self, size: int) -> bytes:
        try:
            return self.source.read(size)
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def blocking_read(self, size: int) -> Waits:
        if size == 0:
            return self.read(0)
        while True:
            data = self.read(size)
            if data:
                return data
            yield from wait_any([self.source], self.waiter)

    def skip(self, size: int) -> int:
        return len(self.read(size))

    def blocking_skip(self, size: int) -> Waits:
        return len((yield from self.blocking_read(size)))

    def subscribe(self) -> Pollable:
        return Pollable(self.source, self.waiter)

    def drop(self) -> None:
        self.source.close()


_scratch = threading.local()


def _splice_buffer() -> memoryview:
    """This thread's reusable buffer for splices (a guest runs on one thread at a time)."""
    view = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(SPLICE_BUDGET))
    return view


def _splice_pipe() -> tuple[int, int]:
    """This thread's pipe for splices socket -> socket, as big as a splice's budget if the
    system allows (else the default 64 KiB: splices then move that much per step)."""
    pipe = getattr(_scratch, "pipe", None)
    if pipe is None:
        pipe = _scratch.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, SPLICE_BUDGET)
        except OSError:
            pass
    return pipe


def _drain(pipe: int) -> None:
    """Empty a splice pipe whose bytes found no taker: the next splice must not send them."""
    try:
        while os.read(pipe, SPLICE_BUDGET):
            pass
    except BlockingIOError:
        pass


class OutputStream(Resource):
    """wasi:io/streams output-stream."""

    def __init__(self, sink: ByteSink, waiter: Waiter) -> None:
        self.sink = sink
        self.waiter = waiter
        self._permitted = 0  # what the last check-write allowed and was not written yet

    def _capacity(self, limit: int) -> int:
        try:
            return self.sink.capacity(limit)
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def check_write(self) -> int:
        self._permitted = self._capacity(WRITE_BUDGET)
        return self._permitted

    def _put(self, data: bytes | memoryview) -> None:
        self._permitted = max(0, self._permitted - len(data))
        try:
            self.sink.write(data)
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def write(self, data: bytes) -> None:
        # What check-write permitted is a promise, kept even if the sink's room shrank since
        # (an HTTP/2 stream shares its connection's output, which the loop may fill while an
        # epoch yield holds the guest between the two calls).
        capacity = self._capacity(WRITE_BUDGET)  # (a stream that closed says so)
        if len(data) > max(capacity, self._permitted):
            raise Trap("write exceeds what check-write permitted")
        self._put(data)

    def _wait_writable(self) -> Waits:
        while self.check_write() == 0:
            yield from wait_any([self.sink], self.waiter)

    def blocking_write_and_flush(self, data: bytes) -> Waits:
        if len(data) > BLOCKING_WRITE_LIMIT:
            raise Trap(f"blocking-write-and-flush takes at most {BLOCKING_WRITE_LIMIT} bytes")
        view = memoryview(data)
        while view:
            yield from self._wait_writable()
            chunk = view[:self.check_write()]
            self._put(chunk)
            view = view[len(chunk):]
        yield from self.blocking_flush()

    def flush(self) -> None:
        try:
            self.sink.flush()
        except (StreamClosed, StreamFailed) as exc:
            raise _stream_error(exc) from None

    def blocking_flush(self) -> Waits:
        self.flush()
        yield from self._wait_writable()

    def write_zeroes(self, size: int) -> None:
        self.write(bytes(size))

    def blocking_write_zeroes_and_flush(self, size: int) -> Waits:
        yield from self.blocking_write_and_flush(bytes(size))

    def splice(self, src: InputStream, size: int) -> int:
        """Move what is available now, up to ``size``, without passing it through the guest:
        piece after piece while the source has bytes ready and the sink takes them (each
        call the guest saves is a trip through its own bindings)."""
        moved = 0
        while moved < size:
            budget = self._capacity(min(size - moved, SPLICE_BUDGET))
            if not budget:
                break
            try:
                count = self._move(src.source, budget)
            except (StreamClosed, StreamFailed) as exc:
                if moved:
                    break  # the guest hears of the end on its next call
                raise _stream_error(exc) from None
            if not count:
                break
            moved += count
        return moved

    def _move(self, source: ByteSource, budget: int) -> int:
        takes_pipe = getattr(self.sink, "takes_pipe", None)
        splice_into = getattr(source, "splice_into", None)
        if takes_pipe is not None and splice_into is not None and takes_pipe():
            pipe_out, pipe_in = _splice_pipe()
            count = splice_into(pipe_in, budget)
            if count is not None:
                if count:
                    self._put_from_pipe(pipe_out, count)
                return count
        read_into = getattr(source, "read_into", None)
        if read_into is None:
            data: bytes | memoryview = source.read(budget)
        else:
            view = _splice_buffer()[:budget]
            data = view[:read_into(view)]
        if data:
            self._put(data)
        return len(data)

    def _put_from_pipe(self, pipe: int, count: int) -> None:
        try:
            self.sink.write_from_pipe(pipe, count)  # type: ignore[attr-defined]
        except BaseException as exc:
            _drain(pipe)
            if isinstance(exc, (StreamClosed, StreamFailed)):
                raise _stream_error(exc) from None
            raise

    def blocking_splice(self, src: InputStream, size: int) -> Waits:
        while True:
            yield from self._wait_writable()
            moved = self.splice(src, size)
            if moved or not size:
                return moved
            yield from wait_any([src.source], self.waiter)

    def subscribe(self) -> Pollable:
        return Pollable(self.sink, self.waiter)


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
