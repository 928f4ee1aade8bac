"""The supervisor with real processes and signals: workers, titles, restarts, reloads, scaling,
graceful stops, limits and Prometheus metrics."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import (BackgroundClients, free_port, guest, metrics_text, run_cli, title,
                      upstream_peak, wait_until, workers)


class Load(BackgroundClients):
    """Requests in a loop, each on a new connection, recording every outcome."""

    def __init__(self, server, path: str = "/", threads: int = 3) -> None:
        super().__init__(threads)
        self.server, self.path = server, path
        self.results: list[tuple[int, bytes]] = []
        self.errors: list[str] = []
        self.started_before_error: list[float] = []  # when each failed request was sent

    def client(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, _, body = self.server.request("GET", self.path, timeout=30)
                self.results.append((status, body))
            except Exception as exc:  # a failed request is what these tests count
                self.errors.append(repr(exc))
                self.started_before_error.append(started)


def test_workers_and_process_titles(serve):
    server = serve("hello", "-w", "3")
    master = server.proc.pid
    wait_until(lambda: len(workers(master)) == 3, what="3 workers")
    assert title(master).startswith("wasisup: master [hello-")
    for pid in workers(master):
        assert re.fullmatch(r"wasisup: worker \[hello-\w+\.wasm\]", title(pid))


def test_killed_worker_is_replaced_and_only_its_requests_fail(serve):
    server = serve("hello", "-w", "2", "--threads", "2")
    master = server.proc.pid
    before = wait_until(lambda: len(workers(master)) == 2 and workers(master), what="2 workers")
    clients = 4
    with Load(server, threads=clients) as load:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        replaced = wait_until(lambda: (w := workers(master)) and len(w) == 2 and before[0] not in w
                              and w, what="a replacement worker")
        time.sleep(1)
    assert set(replaced) != set(before)
    ok = [r for r in load.results if r == (200, b"hello from wasm\n")]
    assert len(ok) > 20 and len(ok) == len(load.results)
    # Only what the killed worker held at that moment fails (at most one request per client,
    # all sent before the kill); everything after is served by the survivor and the replacement.
    assert len(load.errors) <= clients, load.errors
    assert all(t < killed_at for t in load.started_before_error), (killed_at, load.started_before_error)


def test_hup_swaps_the_component_without_failing_a_request(serve, tmp_path):
    served = tmp_path / "app.wasm"
    shutil.copyfile(guest("hello"), served)
    server = serve(served, "-w", "2")
    with Load(server, threads=3) as load:
        time.sleep(1)
        staged = tmp_path / "staged.wasm"
        shutil.copyfile(guest("hello-js"), staged)
        os.replace(staged, served)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: any(body.startswith(b"hello from js") for _, body in load.results[-5:]),
                   timeout=60, what="answers from the new component")
        time.sleep(1)
    assert not load.errors, load.errors
    assert all(status == 200 for status, _ in load.results)
    assert load.results[-1][1].startswith(b"hello from js")


def test_hup_to_a_broken_config_keeps_the_workers_and_says_why(serve, tmp_path):
    config = tmp_path / "wasisup.conf.py"
    config.write_text('guest_env = {"X": "ok"}\n')
    server = serve("hello", "-w", "2", "-c", str(config))
    master = server.proc.pid
    before = wait_until(lambda: len(workers(master)) == 2 and workers(master), what="2 workers")
    config.write_text('guest_env = {"X": "\\udcff"}\n')
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in server.log(), what="the reload refused")
    assert "the value of X is not valid UTF-8" in server.log()
    assert server.request("GET", "/")[0] == 200
    assert workers(master) == before


def test_ttin_and_ttou_change_the_worker_count(serve):
    server = serve("hello", "-w", "2")
    master = server.proc.pid
    wait_until(lambda: len(workers(master)) == 2, what="2 workers")
    server.send_signal(signal.SIGTTIN)
    wait_until(lambda: len(workers(master)) == 3, what="3 workers after TTIN")
    for count in (2, 1):  # one at a time: the kernel merges a signal sent while one is pending
        server.send_signal(signal.SIGTTOU)
        wait_until(lambda n=count: len(workers(master)) == n, what=f"{count} workers after TTOU")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_graceful_stop_finishes_in_flight_requests(serve, upstream, signum):
    server = serve("proxy", "--env", f"UPSTREAM={upstream}")
    outcomes: list = []
    group = f"graceful-{signum}"

    def slow() -> None:
        try:
            outcomes.append(server.request("GET", f"/slow?seconds=2&group={group}", timeout=30)[0])
        except Exception as exc:
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: upstream_peak(upstream, group) == 3, what="3 requests in flight")
    server.send_signal(signum)
    for thread in threads:
        thread.join(30)
    assert outcomes == [200, 200, 200]
    assert server.proc.wait(30) == 0


def test_int_stops_fast(serve, upstream):
    server = serve("proxy", "--env", f"UPSTREAM={upstream}")
    started = time.monotonic()
    thread = threading.Thread(target=lambda: _quietly(server.request, "GET",
                                                      "/slow?seconds=10&group=int"))
    thread.start()
    wait_until(lambda: upstream_peak(upstream, "int") == 1, what="the request in flight")
    server.send_signal(signal.SIGINT)
    server.proc.wait(30)
    assert time.monotonic() - started < 8
    thread.join(30)


def test_a_stop_sent_to_a_booting_worker_is_not_lost(serve):
    # A TERM that reached a worker between its fork and its own signal handlers was swallowed
    # by the master's handlers it inherited: a stop sent as workers boot (TERM, HUP, TTOU)
    # then waited out the whole graceful timeout. Each new worker gets a TERM the moment it
    # exists, and must leave (the master replaces it).
    server = serve("hello", "-w", "1", "--graceful-timeout", "60", ready=False)
    master, seen = server.proc.pid, set()
    for _ in range(10):
        worker = _next_child(master, seen)
        os.kill(worker, signal.SIGTERM)
        wait_until(lambda: not _alive(worker), timeout=15, what=f"worker {worker} to obey TERM")


def _next_child(pid: int, seen: set) -> int:
    """The first child of ``pid`` not in ``seen``, found within a fraction of a millisecond."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(map(int, children.read_text().split())) - seen
        if new:
            seen.update(new)
            return min(new)
    raise AssertionError("no new worker within 60 s")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _quietly(func, *args):
    try:
        return func(*args)
    except Exception as exc:
        return exc


def test_metrics_show_in_flight_per_worker(serve, upstream):
    metrics_port = free_port()
    server = serve("proxy", "-w", "2", "--env", f"UPSTREAM={upstream}",
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    master = server.proc.pid
    pids = wait_until(lambda: len(workers(master)) == 2 and workers(master), what="2 workers")
    wait_until(lambda: all(f'pid="{pid}"' in metrics_text(metrics_port) for pid in pids),
               what="a series per worker")
    thread = threading.Thread(target=lambda: server.request("GET", "/slow?seconds=3"))
    thread.start()
    busy = wait_until(lambda: re.findall(r'wasisup_requests_in_flight\{pid="(\d+)"\} 1\.0',
                                         metrics_text(metrics_port)), what="a busy worker")
    text = metrics_text(metrics_port)
    series = re.findall(r'wasisup_requests_in_flight\{pid="(\d+)"\} ([\d.]+)', text)
    assert sorted(int(pid) for pid, _ in series) == sorted(pids)
    assert len(busy) == 1 and int(busy[0]) in pids
    thread.join(30)
    assert 'wasisup_requests_total{code="200",method="GET"}' in metrics_text(metrics_port)
    assert "wasisup_component_info{" in text and "wasisup_instantiations_total" in text

    # A dead worker's series goes away with it.
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: f'pid="{pids[0]}"' not in metrics_text(metrics_port)
               and 'wasisup_worker_restarts_total{reason="crash"} 1.0' in metrics_text(metrics_port),
               what="the dead worker's series to go")


METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def in_flight_pids(metrics_port: int) -> set[int]:
    return {int(pid) for pid in re.findall(r'wasisup_requests_in_flight\{pid="(\d+)"\}',
                                           metrics_text(metrics_port))}


def scrape_seconds(metrics_port: int, times: int = 7) -> float:
    """The median time a scrape takes."""
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        metrics_text(metrics_port)
        samples.append(time.perf_counter() - started)
    return sorted(samples)[times // 2]


def restarts(metrics_port: int) -> float:
    """Workers replaced after --max-requests."""
    text = metrics_text(metrics_port)
    return float(re.search(r'^wasisup_worker_restarts_total\{reason="max-requests"\} (\S+)$',
                           text, re.M).group(1))


def restart_workers(server, metrics_port: int, count: int) -> None:
    """Load the server until ``count`` more workers have been replaced (--max-requests 1)."""
    target = restarts(metrics_port) + count
    with Load(server, threads=2) as load:
        deadline = time.monotonic() + 600
        while restarts(metrics_port) < target:
            assert time.monotonic() < deadline, f"fewer than {count} restarts in 600 s"
            time.sleep(0.5)
    assert not load.errors and {status for status, _ in load.results} == {200}


def test_metrics_stay_flat_across_worker_restarts(serve, tmp_path):
    directory = tmp_path / "metrics"
    metrics_port = free_port()
    server = serve("hello", "-w", "2", "--max-requests", "1",
                   "--metrics-bind", f"127.0.0.1:{metrics_port}", env={METRICS_DIR: str(directory)})
    master = server.proc.pid

    def settled() -> bool:  # both current workers are up and have their series
        live = workers(master)
        try:
            return len(live) == 2 and in_flight_pids(metrics_port) == set(live)
        except OSError:  # the metrics server is not up yet
            return False

    wait_until(settled, what="two workers")
    restart_workers(server, metrics_port, 10)  # warm-up: the archives exist
    wait_until(settled, what="two workers")
    files_before, scrape_before = len(os.listdir(directory)), scrape_seconds(metrics_port)
    restart_workers(server, metrics_port, 300)
    wait_until(settled, what="two workers")
    files_after, scrape_after = len(os.listdir(directory)), scrape_seconds(metrics_port)

    assert files_after <= files_before + 10, sorted(os.listdir(directory))
    assert scrape_after <= 3 * scrape_before + 0.01, (scrape_before, scrape_after)
    assert f'pid="{master}"' not in metrics_text(metrics_port)

    def answered() -> float:  # once the last request's counter and histogram are both in
        text = metrics_text(metrics_port)
        count = float(re.search(r'^wasisup_requests_total\{code="200",method="GET"\} (\S+)$',
                                text, re.M)[1])
        seen = float(re.search(r'^wasisup_request_duration_seconds_count\{code="200",method="GET"\} '
                               r'(\S+)$', text, re.M)[1])
        return count if count == seen else 0.0

    # Nothing counted was lost in the folding: every request and every restart is there.
    assert wait_until(answered, what="the counts") >= restarts(metrics_port) >= 310


def test_metrics_directory_is_removed_on_exit(serve, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    default = serve("hello", "-w", "1", env={"TMPDIR": str(temp)})
    assert default.request("GET", "/")[0] == 200
    assert [p.name[:16] for p in temp.iterdir()] == ["wasisup-metrics-"]
    assert default.stop() == 0
    assert list(temp.iterdir()) == []
    given = tmp_path / "given"
    named = serve("hello", "-w", "1", env={METRICS_DIR: str(given)})
    assert named.request("GET", "/")[0] == 200 and list(given.glob("*.db"))
    assert named.stop() == 0
    assert not given.exists()


def test_a_killed_masters_metrics_do_not_carry_over(serve, tmp_path):
    directory = tmp_path / "metrics"
    killed = serve("hello", "-w", "1", env={METRICS_DIR: str(directory)})
    for _ in range(3):
        assert killed.request("GET", "/")[0] == 200
    os.killpg(killed.proc.pid, signal.SIGKILL)  # master and workers: nobody cleans up
    killed.proc.wait()
    assert list(directory.glob("counter_*.db"))
    metrics_port = free_port()
    server = serve("hello", "-w", "1", "--metrics-bind", f"127.0.0.1:{metrics_port}",
                   env={METRICS_DIR: str(directory)})
    assert server.request("GET", "/")[0] == 200
    counted = wait_until(lambda: re.search(r'^wasisup_requests_total\{code="200",method="GET"\} (\S+)$',
                                           metrics_text(metrics_port), re.M), what="the request")
    assert counted[1] == "1.0"  # not 4.0: the killed master's counts are gone
    assert in_flight_pids(metrics_port) == set(workers(server.proc.pid))


def test_request_timeout_interrupts_a_spinning_guest(serve, upstream):
    server = serve("hog", "--request-timeout", "1")
    status, _, _ = server.request("GET", "/spin")
    assert status == 504
    assert server.request("GET", "/")[0] == 200, "the worker lives on"
    proxy = serve("proxy", "--request-timeout", "1", "--env", f"UPSTREAM={upstream}")
    assert proxy.request("GET", "/slow?seconds=5")[0] == 504, "a guest waiting on I/O times out too"


def test_max_memory_fails_the_request_not_the_worker(serve):
    server = serve("hog", "--max-memory", "64M")
    assert server.request("GET", "/alloc?mb=8")[0] == 200
    assert server.request("GET", "/alloc?mb=200")[0] == 500
    assert server.request("GET", "/")[0] == 200


def test_allow_outbound(serve, upstream):
    denied = serve("proxy", "--env", f"UPSTREAM={upstream}", "--allow-outbound", "*.example.com")
    status, _, body = denied.request("GET", "/x")
    assert status == 502 and body == b"upstream error: http-request-denied\n"
    allowed = serve("proxy", "--env", f"UPSTREAM={upstream}", "--allow-outbound", "127.0.0.*")
    assert allowed.request("GET", "/x")[0] == 200


def test_request_limits(serve):
    server = serve("stream", "--limit-request-body", "1000", "--limit-request-line", "100")
    assert server.request("POST", "/upload", body=b"x" * 1000)[0] == 200
    assert server.request("POST", "/upload", body=b"x" * 1001)[0] == 413
    assert server.request("GET", "/" + "a" * 200)[0] == 414


def test_max_requests_restarts_the_worker(serve):
    server = serve("hello", "--max-requests", "5")
    master = server.proc.pid
    first = wait_until(lambda: workers(master), what="a worker")
    for _ in range(8):
        assert server.request("GET", "/")[0] == 200
    wait_until(lambda: (w := workers(master)) and w != first, what="a fresh worker")


def test_config_file_and_env_args(serve, tmp_path, upstream):
    config = tmp_path / "wasisup.conf.py"
    config.write_text(f'guest_env = {{"UPSTREAM": "{upstream}"}}\nthreads = 2\n')
    server = serve("proxy", "-c", str(config), env={"WASISUP_CMD_ARGS": "--max-instance-reuse 3"})
    assert server.request("GET", "/cfg")[0] == 200
    bad = tmp_path / "bad.conf.py"
    bad.write_text("wokers = 3\n")
    result = run_cli("-c", str(bad), str(guest("hello")))
    assert result.returncode == 2 and "unknown setting 'wokers'" in result.stderr


def test_unbindable_address_is_one_line(tmp_path):
    result = run_cli("-b", "no-such-host.invalid:80", str(guest("hello")))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("wasisup: error: cannot bind")


def test_pidfile(serve, tmp_path):
    pidfile = tmp_path / "wasisup.pid"
    server = serve("hello", "--pid", str(pidfile))
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the pidfile")
    assert int(pidfile.read_text()) == server.proc.pid


def test_usr1_reopens_the_access_log(serve, tmp_path):
    access_log = tmp_path / "access.log"
    server = serve("hello", "--access-logfile", str(access_log))
    assert server.request("GET", "/before")[0] == 200
    wait_until(lambda: access_log.exists() and "/before" in access_log.read_text(), what="a log line")
    rotated = access_log.rename(tmp_path / "access.log.1")
    server.send_signal(signal.SIGUSR1)
    wait_until(lambda: access_log.exists(), what="a reopened access log")
    assert server.request("GET", "/after")[0] == 200
    wait_until(lambda: "/after" in access_log.read_text(), what="a line in the new log")
    assert "/after" not in rotated.read_text()


def test_a_guest_loop_is_interrupted_after_the_worker_timeout(serve):
    # --compute-timeout defaults to --timeout; the spinning guests take turns with the others.
    server = serve("hog", "--timeout", "3")
    outcomes: list = []
    spinners = [threading.Thread(target=lambda: outcomes.append(_quietly(server.request, "GET", "/spin")))
                for _ in range(4)]
    for thread in spinners:
        thread.start()
    wait_until(lambda: server.log().count("spinning") == 4, what="4 spinning guests")
    started = time.monotonic()
    assert server.request("GET", "/", timeout=30)[0] == 200
    assert time.monotonic() - started < 10
    for thread in spinners:
        thread.join(30)
    assert [o[0] for o in outcomes] == [504] * 4, outcomes
    assert "computed for 3 s without waiting for I/O" in server.log()


def test_a_guest_waiting_on_io_is_not_a_guest_loop(serve, upstream):
    server = serve("proxy", "--compute-timeout", "1", "--env", f"UPSTREAM={upstream}")
    status, _, body = server.request("GET", "/slow?seconds=3")
    assert status == 200 and b'"path": "/slow?seconds=3"' in body


def test_no_worker_outlives_its_master(serve):
    server = serve("hog", "-w", "2")
    master = server.proc.pid
    pids = wait_until(lambda: len(workers(master)) == 2 and workers(master), what="2 workers")
    spinners = [threading.Thread(target=_quietly, args=(server.request, "GET", "/spin"), daemon=True)
                for _ in range(8)]
    for thread in spinners:
        thread.start()
    wait_until(lambda: "spinning" in server.log(), what="a spinning guest")
    server.send_signal(signal.SIGTERM)
    time.sleep(1)  # (the master is stopping gracefully when it is killed)
    server.send_signal(signal.SIGKILL)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and "wasisup" in title(pid)
                               for pid in pids), timeout=10, what="the workers to exit")


def test_heartbeat_files_live_in_dev_shm(serve):
    server = serve("hello")
    worker = wait_until(lambda: workers(server.proc.pid), what="a worker")[0]
    targets = [os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")]
    assert any(target.startswith("/dev/shm/") for target in targets), targets


def test_restarts_are_counted_by_reason(serve):
    metrics_port = free_port()
    server = serve("hello", "-w", "1", "--max-requests", "2",
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    master = server.proc.pid

    def counted(reason: str) -> float:
        found = re.search(rf'^wasisup_worker_restarts_total\{{reason="{reason}"\}} (\S+)$',
                          metrics_text(metrics_port), re.M)
        return float(found[1]) if found else -1.0

    first = wait_until(lambda: workers(master), what="a worker")[0]
    assert [counted(reason) for reason in ("crash", "timeout", "max-requests", "reload")] == [0] * 4
    for _ in range(2):
        assert server.request("GET", "/")[0] == 200
    wait_until(lambda: counted("max-requests") == 1, what="a max-requests restart")
    second = wait_until(lambda: [pid for pid in workers(master) if pid != first], what="its successor")
    os.kill(second[0], signal.SIGKILL)
    wait_until(lambda: counted("crash") == 1, what="a crash")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: counted("reload") == 1, what="a reload")
    assert counted("max-requests") == 1 and counted("timeout") == 0
    assert "wasisup_workers 1.0" in metrics_text(metrics_port)


def test_a_worker_that_misses_its_heartbeats_is_counted_as_a_timeout(serve):
    metrics_port = free_port()
    server = serve("hello", "-w", "1", "--timeout", "5",
                   "--metrics-bind", f"127.0.0.1:{metrics_port}")
    master = server.proc.pid
    assert server.request("GET", "/")[0] == 200  # (booted, and beating)
    stuck = workers(master)[0]
    os.kill(stuck, signal.SIGSTOP)  # no more heartbeats; the master aborts, then kills it
    counted = wait_until(lambda: re.search(r'^wasisup_worker_restarts_total\{reason="timeout"\} '
                                           r'([1-9][\d.]*)$', metrics_text(metrics_port), re.M),
                         timeout=60, what="a timeout restart")
    assert counted and 'wasisup_worker_restarts_total{reason="crash"} 0.0' in metrics_text(
        metrics_port)
    wait_until(lambda: workers(master) and stuck not in workers(master), what="its successor")
    assert server.request("GET", "/")[0] == 200
