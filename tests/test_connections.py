"""Connections under pressure, with real worker processes and default settings: slow clients
hold no request thread, connections spread over workers, and a graceful stop or a reload
loses no request that reached a worker."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from conftest import BackgroundClients, guest, wait_until, workers


# A request beside slow clients must be answered well within the time a slow client could
# otherwise hold what serves it (the 20 s header timeout; ~10 s of a slow reader): here, at all.
PROMPT = 10.0


def timed_get(port: int, path: str = "/", timeout: float = PROMPT) -> float:
    """Seconds one request on a new connection took; raises if it failed or took too long."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
    finally:
        conn.close()
    return time.monotonic() - started


def normal_requests(port: int, count: int, spacing: float, path: str = "/") -> list:
    """``count`` requests a ``spacing`` apart: each one's duration, or the error it got."""
    outcomes = []
    for _ in range(count):
        try:
            outcomes.append(timed_get(port, path))
        except Exception as exc:  # what these tests count
            outcomes.append(repr(exc))
        time.sleep(spacing)
    return outcomes


def test_slowloris_holds_no_thread(serve):
    server = serve("hello", "-w", "2")
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    attackers = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head[:1])
        attackers.append(sock)
    stop = threading.Event()

    def drip() -> None:  # one more byte of the head every 2 s, on every connection
        sent = 1
        while not stop.wait(2):
            for sock in attackers:
                try:
                    sock.sendall(head[sent:sent + 1])
                except OSError:
                    pass
            sent += 1

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        outcomes = normal_requests(server.port, 20, 0.2)
    finally:
        stop.set()
        dripper.join()
        for sock in attackers:
            sock.close()
    assert all(isinstance(o, float) and o < PROMPT for o in outcomes), outcomes


def test_header_timeout_answers_408(serve):
    server = serve("hello", "--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 < time.monotonic() - started < 5


class SlowReader(threading.Thread):
    """Downloads a large response at about 100 bytes a second."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.stop = threading.Event()

    def run(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            while not self.stop.wait(1) and sock.recv(100):
                pass
        except OSError:
            pass
        finally:
            sock.close()


def test_slow_readers_are_cut_off(serve):
    server = serve("stream", "-w", "2")
    readers = [SlowReader(server.port, "/download?size=67108864") for _ in range(16)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(10)
        outcomes = normal_requests(server.port, 20, 0.2, "/download?size=100")
    finally:
        for reader in readers:
            reader.stop.set()
    assert all(isinstance(o, float) and o < PROMPT for o in outcomes), outcomes


def test_slow_request_body_gets_408(serve):
    server = serve("stream")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        reply = b""
        try:
            while not reply:
                sock.sendall(b"x" * 10)
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    reply = sock.recv(4096)
                except BlockingIOError:
                    pass
                sock.setblocking(True)
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert time.monotonic() - started < 15


def held_by(master: int, client: socket.socket) -> int | None:
    """The worker holding the server end of ``client``'s connection (None: none yet)."""
    port = client.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:  # the remote end is the client
                inodes.add(fields[9])
    for pid in workers(master):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def test_a_busy_worker_leaves_new_connections_to_the_others(serve):
    server = serve("hog", "-w", "2", "--threads", "1")
    master = server.proc.pid
    wait_until(lambda: len(workers(master)) == 2, what="2 workers")
    for _ in range(5):
        clients = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(2)]
        clients[0].request("GET", "/work?n=3000000")
        wait_until(lambda: held_by(master, clients[0].sock), what="the first request at a worker")
        clients[1].request("GET", "/work?n=3000000")
        wait_until(lambda: held_by(master, clients[1].sock), what="the second request at a worker")
        owners = {held_by(master, client.sock) for client in clients}
        for client in clients:
            assert client.getresponse().read() == b"done\n"
            client.close()
        assert len(owners) == 2, "both connections went to one worker"


class KeepAliveClients(BackgroundClients):
    """Clients on kept-alive connections, a request every 20 ms. A request sent on an open
    connection that gets no answer is lost; a new connection refused after the server closed
    its listener is not."""

    def __init__(self, port: int, count: int = 8) -> None:
        super().__init__(count)
        self.port = port
        self.answers: list[bytes] = []
        self.lost: list[str] = []

    def client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            if conn.sock is None:
                try:
                    conn.connect()
                except OSError:
                    return  # refused: the server stopped listening
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.lost.append(f"status {response.status}")
                self.answers.append(body)
            except Exception as exc:
                self.lost.append(repr(exc))
                conn.close()
            time.sleep(0.02)
        conn.close()


def test_term_under_keep_alive_load_loses_nothing(serve):
    server = serve("hello", "-w", "2")
    with KeepAliveClients(server.port) as clients:
        time.sleep(1.5)
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(40) == 0
    assert len(clients.answers) > 50
    assert not clients.lost, clients.lost


def test_hup_swap_under_keep_alive_load_loses_nothing(serve, tmp_path: Path):
    served = tmp_path / "app.wasm"
    shutil.copyfile(guest("hello"), served)
    server = serve(served, "-w", "2")
    with KeepAliveClients(server.port) as clients:
        time.sleep(1)
        staged = tmp_path / "staged.wasm"
        shutil.copyfile(guest("hello-js"), staged)
        os.replace(staged, served)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: any(body.startswith(b"hello from js") for body in clients.answers[-8:]),
                   timeout=60, what="answers from the new component")
        time.sleep(2)
    assert not clients.lost, clients.lost


def test_term_serves_connections_waiting_in_the_backlog(serve):
    server = serve("hog", "--threads", "1")
    outcomes: list = []

    sent = threading.Semaphore(0)

    def get(path: str) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", path)
            sent.release()
            outcomes.append(conn.getresponse().read())
        except Exception as exc:
            outcomes.append(repr(exc))

    busy = threading.Thread(target=get, args=("/work?n=3000000",))
    busy.start()
    wait_until(lambda: "working" in server.log(), what="the busy guest")
    waiting = [threading.Thread(target=get, args=("/",)) for _ in range(3)]
    for thread in waiting:
        thread.start()
    for _ in range(4):  # the busy request and the three behind it, sent
        assert sent.acquire(timeout=30)
    server.send_signal(signal.SIGTERM)
    for thread in [busy, *waiting]:
        thread.join(30)
    assert outcomes == [b"done\n"] * 4, outcomes
    assert server.proc.wait(30) == 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_downloads_reset_mid_stream_leave_nothing_spinning(serve):
    server = serve("stream", "-w", "1", "--min-data-rate", "0")
    worker = wait_until(lambda: workers(server.proc.pid), what="a worker")[0]
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /download?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 1_000_000:
            received += len(sock.recv(65536))
        time.sleep(0.2)  # the server fills what the kernel will queue for a client not reading
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # with linger 0: a reset
    time.sleep(1)
    before = cpu_seconds(worker)
    time.sleep(2)
    assert cpu_seconds(worker) - before < 0.2, "a worker thread is still busy after the resets"
    assert timed_get(server.port, "/download?size=10") < 3
