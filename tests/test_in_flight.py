"""Requests in flight as guest calls on the worker's event loops (real workers, a real upstream):
a waiting request holds no thread, a computing guest does not stall the others, a client that
leaves cancels its call, requests beyond the cap wait their turn, and a name being resolved
holds up nothing else."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port, guest, metrics_text, upstream_peak, wait_until


def in_flight(metrics_port: int) -> float:
    return sum(float(value) for value in re.findall(
        r'wasisup_requests_in_flight\{pid="\d+"\} ([\d.]+)', metrics_text(metrics_port)))


def test_one_loop_holds_many_waiting_requests(serve, upstream):
    server = serve("proxy", "-w", "1", "--threads", "1", "--env", f"UPSTREAM={upstream}")
    count = 100  # each is answered only once all of them wait at the upstream at once
    with ThreadPoolExecutor(count) as pool:
        statuses = list(pool.map(lambda _: server.request("GET", f"/gate?n={count}&group=many")[0],
                                 range(count)))
    assert statuses == [200] * count


def test_a_computing_guest_does_not_stall_the_others_on_its_loop(serve):
    server = serve("hog", "-w", "1", "--threads", "1", "--compute-timeout", "8",
                   "--graceful-timeout", "1")
    with ThreadPoolExecutor(1) as pool:
        spinner = pool.submit(server.request, "GET", "/spin")
        wait_until(lambda: "spinning" in server.log(), what="the spinning guest")
        assert server.request("GET", "/")[0] == 200
        assert not spinner.done(), "served only once the spinning guest was stopped"
        assert spinner.result()[0] == 504


def test_a_client_that_leaves_cancels_its_waiting_request(serve, upstream):
    metrics_port = free_port()
    server = serve("proxy", "-w", "1", "--log-level", "debug", "--metrics-bind", f"127.0.0.1:{metrics_port}",
                   "--env", f"UPSTREAM={upstream}")
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"GET /slow?seconds=30&group=left HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: upstream_peak(upstream, "left") == 1, what="the guest waiting upstream")
        assert in_flight(metrics_port) == 1
    wait_until(lambda: in_flight(metrics_port) == 0, timeout=10, what="the call dropped")
    assert "went away: the guest's call was dropped" in server.log()
    assert server.request("GET", "/healthz")[0] == 200


def test_requests_beyond_the_cap_wait_their_turn(serve, upstream):
    server = serve("proxy", "-w", "1", "--max-concurrent-requests", "2",
                   "--env", f"UPSTREAM={upstream}")
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(
            lambda _: server.request("GET", "/slow?seconds=0.5&group=capped")[0], range(6)))
    assert statuses == [200] * 6  # none refused, none failed
    assert upstream_peak(upstream, "capped") == 2


def test_the_request_timeout_ends_a_waiting_guest(serve, upstream):
    server = serve("proxy", "--request-timeout", "1", "--env", f"UPSTREAM={upstream}")
    status, _, body = server.request("GET", "/slow?seconds=10")
    assert status == 504 and b"the request deadline passed while the guest waited" in body


# A client to run inside the namespace: prints the body of whatever answer it gets.
FETCH = """import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())
except urllib.error.HTTPError as error:
    print(error.read().decode())"""


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def network_namespace() -> Iterator[list[str]]:
    """A network namespace of the test's own (its loopback, its /etc/resolv.conf pointing at
    127.0.0.1): yields the command prefix that runs a program inside it."""
    name = f"wasisup-test-{os.getpid()}"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
        yield ["ip", "netns", "exec", name]
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                    reason="a network namespace of its own needs root and iproute2")
def test_names_are_resolved_and_a_slow_lookup_holds_up_no_other_request(tmp_path):
    release = tmp_path / "release"
    with network_namespace() as inside, contextlib.ExitStack() as running:
        def start(*argv: str) -> subprocess.Popen:
            proc = subprocess.Popen([*inside, *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            running.callback(stop, proc)
            return proc

        def fetch(url: str) -> subprocess.CompletedProcess:
            return subprocess.run([*inside, sys.executable, "-c", FETCH, url],
                                  capture_output=True, text=True, timeout=60)

        dns = start(sys.executable, str(ROOT / "tests" / "dns_server.py"), str(release))
        said = dns.stdout.readline().strip()
        assert said == "ready", said + dns.stdout.read()
        start(sys.executable, str(ROOT / "guest" / "echo_upstream.py"), "--port", "9000")
        start(sys.executable, "-m", "wasisup", "-w", "1", "-b", "127.0.0.1:8000",
              str(guest("outbound")))
        proxied = "http://127.0.0.1:8000/?url=http://{}:9000/{}"
        wait_until(lambda: "upstream 200" in fetch(proxied.format("127.0.0.1", "up")).stdout,
                   timeout=60, what="wasisup in the namespace")
        assert "upstream 200" in fetch(proxied.format("resolved.test", "named")).stdout
        assert "outbound error: dns-error" in fetch(proxied.format("missing.test", "x")).stdout
        named = start(sys.executable, "-c", FETCH, proxied.format("held.test", "named"))
        assert dns.stdout.readline().strip() == "held held.test"
        # The worker's only loop waits for that name; it serves another request meanwhile.
        assert "upstream 200" in fetch(proxied.format("127.0.0.1", "meanwhile")).stdout
        assert named.poll() is None
        release.touch()
        assert "upstream 200" in named.communicate(timeout=30)[0]
