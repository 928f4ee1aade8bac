"""The command line as a newcomer meets it: the real ``wasisup`` command, its help, version and
errors (one line naming the fix, exit 2, at once), compile and check, the dev wasmtime CLI, the
README's option table, and deploy/local-docker.sh."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from gunicorn.config import Config

from conftest import ROOT, build_guest, error_line, guest, run_cli, wasmtime_cli
from wasisup.app import exposed_settings
from wasisup.settings import adopt

VERSION = importlib.metadata.version("wasisup")
WASMTIME = importlib.metadata.version("wasmtime")
GUNICORN = importlib.metadata.version("gunicorn")


# -- 1. counts that would serve nothing


@pytest.mark.parametrize("flag", ["-w", "--threads"])
def test_zero_workers_or_threads_is_an_error(flag):
    line = error_line(flag, "0", str(guest("hello")))
    assert "at least 1" in line and "'0'" in line


# -- 2. addresses


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:notaport", "'notaport' is not a valid port number; use HOST:PORT"),
    ("[::1", "write an IPv6 address as [IPV6]:PORT"),
    ("127.0.0.1:70000", "port 70000 is out of range"),
    ("unix:/missing/dir/s.sock", "directory /missing/dir does not exist: create it"),
    ("fd://987", "fd://987: it is not an open socket"),
])
def test_bad_address_is_one_line(address, says):
    assert says in error_line("-b", address, str(guest("hello")))


def test_address_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = error_line("-b", f"127.0.0.1:{port}", str(guest("hello")))
    assert f"cannot bind 127.0.0.1:{port}" in line and "choose another port" in line


def test_an_allow_outbound_url_is_told_apart_from_a_pattern():
    line = error_line("--allow-outbound", "http://example.com", str(guest("hello")))
    assert "'http://example.com' is a URL: a pattern is HOST or HOST:PORT" in line


def test_bad_metrics_address_is_one_line():
    assert "is not HOST:PORT" in error_line("--metrics-bind", "localhost", str(guest("hello")))


# -- 3. --help is wasisup's


def test_help_is_wasisups_own():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for gunicorns in ("``", ":ref:", "Gunicorn", "gunicorn.conf.py", "[None]", "[[]]"):
        assert gunicorns not in text
    assert "--threads INT event loops per worker" in text and "(config file: threads; default: 1)" in text
    assert "wasisup compile IN.wasm [-o OUT.cwasm]" in text and "wasisup check FILE.cwasm" in text
    assert "(config file: workers; default: 1)" in text  # a pip install's user needs no README
    cfg = Config()
    adopt(cfg.settings)
    for setting in exposed_settings(cfg):
        assert setting.cli[-1] in text


def test_subcommands_have_help():
    for command in ("compile", "check"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and f"usage: wasisup {command}" in result.stdout


def test_unknown_flag_suggests_the_close_one():
    assert "did you mean --workers?" in error_line("--wrokers", "2", str(guest("hello")))


# -- 4. versions


def test_version_names_wasisup_wasmtime_and_gunicorn():
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (
        0, f"wasisup {VERSION} (wasmtime {WASMTIME}, gunicorn {GUNICORN})\n")


def test_startup_log_names_wasisup(serve):
    log = serve("hello").log()
    assert f"Starting wasisup {VERSION} (wasmtime {WASMTIME}, gunicorn {GUNICORN})" in log
    assert "Starting gunicorn" not in log


# -- 5. levels and paths


def test_unknown_log_level_lists_the_levels():
    line = error_line("--log-level", "loud", str(guest("hello")))
    assert "'loud' is not a log level: use one of debug, info, warning, error, critical" in line


def test_directory_as_component(tmp_path):
    assert f"component {tmp_path} is a directory" in error_line(str(tmp_path))


def test_config_file_value_names_file_and_key(tmp_path):
    config = tmp_path / "wasisup.conf.py"
    config.write_text("workers = 0\n")
    line = error_line("-c", str(config), str(guest("hello")))
    assert f"config file {config}: workers: give a whole number of at least 1" in line
    config.write_text("wokers = 3\n")
    assert "did you mean 'workers'?" in error_line("-c", str(config), str(guest("hello")))


def test_startup_values_gunicorn_reads_itself_are_one_line():
    says = "$WEB_CONCURRENCY: give a whole number of at least 1, not 'x'"
    assert says in error_line("--version", env={"WEB_CONCURRENCY": "x"})
    says = "$PORT: give a port number (0-65535), not 'abc'"
    assert says in error_line(str(guest("hello")), env={"PORT": "abc"})


NOT_UTF8 = os.fsdecode(b"\xfe")  # a byte the shell may pass that is not UTF-8


def test_text_that_is_not_utf8_is_one_line(tmp_path):
    line = error_line(f"--env=X={NOT_UTF8}", str(guest("hello")))
    assert "argument 1" in line and "is not valid UTF-8 (byte 0xfe at character 8)" in line
    named = tmp_path / f"h{NOT_UTF8}.wasm"
    named.write_bytes(guest("hello").read_bytes())
    assert "argument 1" in error_line(str(named))
    line = error_line(str(guest("hello")), env={"WASISUP_CMD_ARGS": f"--env Y={NOT_UTF8}"})
    assert "$WASISUP_CMD_ARGS is not valid UTF-8" in line


def test_a_guest_environment_that_is_not_utf8_is_refused_wherever_it_comes_from(tmp_path):
    config = tmp_path / "wasisup.conf.py"
    config.write_text('guest_env = {"X": "\\udcff"}\n')
    line = error_line("-c", str(config), str(guest("hello")))
    assert "guest_env: the value of X is not valid UTF-8 (byte 0xff at character 0)" in line
    config.write_text('guest_env = {"X": "a\\x00b"}\n')
    assert "the value of X holds a NUL character" in error_line("-c", str(config), str(guest("hello")))
    line = error_line("-c", str(ROOT / "deploy" / "wasisup.conf.py"),
                      env={"UPSTREAM": f"http://127.0.0.1:9000/{NOT_UTF8}"})
    assert "guest_env: the value of UPSTREAM is not valid UTF-8" in line


# -- 6. compile and check say what they did


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, str]:
    cwasm = tmp_path_factory.mktemp("compiled") / "hello.cwasm"
    result = run_cli("compile", str(guest("hello")), "-o", str(cwasm))
    assert result.returncode == 0, result.stderr
    return cwasm, result.stdout


def test_compile_says_what_it_wrote(compiled):
    cwasm, said = compiled
    match = re.fullmatch(rf"wrote {re.escape(str(cwasm))} \((\d+\.\d) MB\) in \d+\.\d s: "
                         r"exports wasi:http/incoming-handler@0\.2\.\d+, "
                         r"its \d+ imported interfaces linked "
                         rf"\(wasmtime {WASMTIME}, epoch-interruption\)\n", said)
    assert match and float(match.group(1)) == round(cwasm.stat().st_size / 1e6, 1)


def test_compile_writes_beside_its_input_unless_told_and_makes_no_directory(tmp_path):
    wasm = tmp_path / "app.wasm"
    wasm.write_bytes(guest("hello").read_bytes())
    missing = tmp_path / "missing" / "app.cwasm"
    assert f"directory {missing.parent} does not exist: create it" in error_line(
        "compile", str(wasm), "-o", str(missing))
    assert not missing.parent.exists()
    result = run_cli("compile", str(wasm))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'app.cwasm'} (")


def test_serving_a_wasm_says_it_compiles_it_once(serve, tmp_path):
    server = serve("hello", env={"WASISUP_CACHE": str(tmp_path / "cache")})
    assert (f"compiling {guest('hello')} for this machine (once: the result is cached in "
            f"{tmp_path / 'cache' / 'cwasm'})") in server.log()


def test_check_says_what_it_checked(compiled):
    cwasm, _ = compiled
    result = run_cli("check", str(cwasm))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{cwasm}: ok, exports wasi:http/incoming-handler@0.2.")


def test_check_tells_apart_missing_wasm_and_other_files(tmp_path):
    hello = guest("hello")
    assert f"component {tmp_path / 'none.cwasm'} does not exist" in error_line(
        "check", str(tmp_path / "none.cwasm"))
    assert f"{hello} is a .wasm, not a precompiled .cwasm: precompile it with `wasisup compile" \
        in error_line("check", str(hello))
    readme = ROOT / "README.md"
    assert f"{readme} is not a WebAssembly binary: neither a component (.wasm) nor a precompiled " \
        "one (.cwasm, from `wasisup compile`)" in error_line("check", str(readme))


def test_wrong_world_names_the_file(tmp_path):
    component = build_guest(ROOT / "bench" / "hostcall")
    out = tmp_path / "hostcall.cwasm"
    result = run_cli("compile", str(component), "-o", str(out))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"wasisup: error: {component}: ")
    assert "wasi:http" in result.stderr and not out.exists()


# -- 7. README


def readme_options() -> dict[str, tuple[str, str]]:
    """README's option table: config key -> (option column, default column), backticks off."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if line.startswith("| `-") and len(cells) == 4 and cells[1]:
            rows[cells[1]] = (cells[0], cells[2])
    return rows


@pytest.mark.skipif("WEB_CONCURRENCY" in os.environ or "PORT" in os.environ,
                    reason="the environment changes the defaults of workers and bind")
def test_readme_lists_every_option_with_its_default():
    rows = readme_options()
    cfg = Config()
    adopt(cfg.settings)
    for setting in exposed_settings(cfg):
        if setting.name == "config":
            continue
        assert setting.name in rows, f"README's option table lacks {setting.name}"
        option, default = rows.pop(setting.name)
        longs = [flag for flag in setting.cli if flag.startswith("--")]
        flags = [flag for flag in setting.cli if flag not in longs] + longs[:1]
        assert option == " ".join([", ".join(flags), *([setting.meta] if setting.meta else [])])
        shown = ", ".join(setting.default) if isinstance(setting.default, list) else setting.default
        assert default == ("" if shown is None else str(shown)), setting.name
    assert not rows, f"README lists options wasisup does not have: {rows}"


# -- 8. the dev wasmtime CLI


def test_dev_wasmtime_cli_is_wasisups_wasmtime():
    said = subprocess.run([str(wasmtime_cli()), "--version"], capture_output=True, text=True)
    assert said.stdout.startswith(f"wasmtime {WASMTIME} ")


def test_cwasm_from_the_wasmtime_cli(tmp_path):
    """Its defaults differ from wasisup's engine settings: check says so and what to do; with
    the settings README gives, the .cwasm loads."""
    plain, matching = tmp_path / "plain.cwasm", tmp_path / "matching.cwasm"
    cli = str(wasmtime_cli())
    subprocess.run([cli, "compile", str(guest("hello")), "-o", str(plain)], check=True)
    line = error_line("check", str(plain))
    assert "collector" in line and "precompile it with `wasisup compile" in line
    subprocess.run([cli, "compile", "-C", "collector=drc", "-W", "epoch-interruption=y",
                    str(guest("hello")), "-o", str(matching)], check=True)
    assert run_cli("check", str(matching)).returncode == 0
    assert "-C collector=drc -W epoch-interruption=y" in (ROOT / "README.md").read_text()


# -- 9. HEAD through the reference guest: test_reference_guest.py


# -- 10. deploy/local-docker.sh


def local_docker(*args: str, as_root: bool = True) -> subprocess.CompletedProcess:
    drop = [] if as_root or os.geteuid() != 0 else [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run([*drop, "bash", str(ROOT / "deploy" / "local-docker.sh"), *args],
                          capture_output=True, text=True, timeout=30)


def test_local_docker_says_what_it_leaves_and_how_to_stop_it():
    said = local_docker("--help")
    assert said.returncode == 0
    for words in ("Needs root", "keeps running", "local-docker.sh stop", "clean", "1.3 GB"):
        assert words in said.stdout


def test_local_docker_refuses_without_root_before_touching_anything():
    result = local_docker(as_root=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("local-docker.sh: error: needs root")
    result = local_docker("restart")
    assert result.returncode == 2 and "use start, stop or clean" in result.stderr

