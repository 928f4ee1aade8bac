"""An event loop for one thread: sockets watched with epoll, timers, and work to run next.

A small, explicit core in the way of asyncio's: ``watch`` an fd once for some events (epoll's
one-shot mode: whoever watches re-arms), ``call_at`` a time, ``call_soon``; ``run_once`` waits
for the first of them and runs what is due (ready work for a slice of time at most, so sockets
are looked at often however long the queue). Callbacks run on the loop's thread; only ``wake``
may be called from another. A ``new_signal`` is watched like an fd but made ready by ``signal``
on the loop's own thread (an HTTP/2 stream's news: no fd, no system call).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import select
import time
from collections import deque
from typing import Callable, Optional

log = logging.getLogger("wasisup.loop")

IN, OUT = select.EPOLLIN, select.EPOLLOUT
# The peer closed its side, or the connection failed (reported whatever was asked for).
CLOSED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
COMPACT_EVERY = 4096  # timers set between clearing out the cancelled ones
# The longest a loop runs ready work before it looks at its sockets and timers again (new
# connections and requests are not kept waiting behind a long queue).
SLICE = 0.005


def _run(callback: Callable[..., None], *args: int) -> None:
    """Run a callback; one that fails is a bug to log, not a reason to stop the loop (and the
    requests on its other connections)."""
    try:
        callback(*args)
    except Exception:
        log.exception("a callback of the event loop failed: %r", callback)


class Timer:
    """A callback due at a time (``time.monotonic``: the loop's heap keeps it), until cancelled."""

    __slots__ = ("callback",)

    def __init__(self, callback: Optional[Callable[[], None]]) -> None:
        self.callback = callback

    def cancel(self) -> None:
        self.callback = None


class Loop:
    """One thread's sockets, timers and ready work."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watchers: dict[int, Callable[[int], None]] = {}  # fd -> what its events go to
        self._registered: set[int] = set()  # fds epoll knows (armed or spent)
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # (ties in the timer heap)
        self._signals = itertools.count(-1, -1)  # (negative: never an fd)
        self._signal_events: dict[int, int] = {}  # what each watched signal waits for
        self._soon: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, IN)

    # -- sockets
    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` once, when ``fd`` is ready for ``events`` (or closed)."""
        self._watchers[fd] = callback
        if fd < 0:  # a signal: ``signal`` runs it
            self._signal_events[fd] = events | CLOSED
            return
        mask = events | select.EPOLLONESHOT
        if fd in self._registered:
            try:
                self._epoll.modify(fd, mask)
                return
            except FileNotFoundError:  # closed and its number reused since
                pass
        self._epoll.register(fd, mask)
        self._registered.add(fd)

    def new_signal(self) -> int:
        """A key to ``watch`` as if it were an fd, for events that ``signal`` raises."""
        return next(self._signals)

    def signal(self, key: int, events: int) -> None:
        """Run what watches ``key`` (a ``new_signal``) for any of ``events``, once, as soon as
        the loop may (CLOSED reaches any watcher)."""
        if self._signal_events.get(key, 0) & events:
            del self._signal_events[key]
            callback = self._watchers.pop(key)
            self._soon.append(functools.partial(callback, events))

    def listen(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` whenever ``fd`` (a listening socket) is readable; with the
        other loops watching the same socket, only one of those waiting is woken."""
        self._watchers[fd] = callback
        self._epoll.register(fd, IN | select.EPOLLEXCLUSIVE)
        self._registered.add(fd)

    def forget(self, fd: int, watcher: Optional[Callable[[int], None]] = None) -> None:
        """Stop watching ``fd`` (before it is closed, or handed to another owner); with a
        ``watcher``, only if that is still what watches it (the fd's number may have passed
        to another socket, and another owner, since)."""
        if watcher is not None and self._watchers.get(fd) is not watcher:
            return
        self._watchers.pop(fd, None)
        self._signal_events.pop(fd, None)
        if fd in self._registered:
            self._registered.discard(fd)
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: epoll forgot it then
                pass

    # -- time
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback)
        order = next(self._order)
        heapq.heappush(self._timers, (when, order, timer))
        if order % COMPACT_EVERY == 0:  # cancelled timers wait in the heap until their time
            self._timers = [entry for entry in self._timers if entry[2].callback is not None]
            heapq.heapify(self._timers)
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    def wake(self) -> None:
        """Return from a ``run_once`` that waits (safe from any thread or a signal handler)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def busy(self) -> bool:
        """Is there work to run without waiting?"""
        return bool(self._soon)

    def run_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a socket or a timer (not at all if work is
        ready), then run the callbacks that are due."""
        if self._soon:
            timeout = 0.0
        elif self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        for fd, events in self._epoll.poll(timeout):
            if fd == self._wake_r:
                self._drain_wakeups()
                continue
            callback = self._watchers.get(fd)
            if callback is not None:
                _run(callback, events)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if timer.callback is not None:
                self._soon.append(timer.callback)
        started = time.monotonic()
        for _ in range(len(self._soon)):  # (what these schedule runs next time)
            _run(self._soon.popleft())
            if time.monotonic() - started > SLICE:  # the rest after a look at the sockets
                break

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
