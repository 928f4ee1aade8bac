"""The event loop's own contract, on real sockets in this process."""

from __future__ import annotations

import socket

from wasisup.loop import IN, Loop


def test_a_finished_watcher_does_not_unwatch_the_socket_that_took_its_number():
    loop = Loop()
    first, peer = socket.socketpair()
    fired: list[str] = []
    old = lambda events: fired.append("old")  # noqa: E731
    loop.watch(first.fileno(), IN, old)
    number = first.fileno()
    first.close()  # (epoll forgets a closed socket)
    peer.close()
    second, writer = socket.socketpair()
    assert second.fileno() == number  # the lowest free number: the same one
    loop.watch(second.fileno(), IN, lambda events: fired.append("new"))
    loop.forget(number, old)  # the old wait ends late: its socket's number is another's now
    writer.send(b"x")
    loop.run_once(1.0)
    assert fired == ["new"]
    loop.close()


def test_ready_work_runs_in_order_and_what_it_schedules_runs_next_time():
    loop = Loop()
    ran: list[int] = []
    loop.call_soon(lambda: (ran.append(1), loop.call_soon(lambda: ran.append(3))))
    loop.call_soon(lambda: ran.append(2))
    loop.run_once(0)
    assert ran == [1, 2]
    loop.run_once(0)
    assert ran == [1, 2, 3]
    loop.close()
