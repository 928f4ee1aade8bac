"""The master: a gunicorn application whose "app" is a compiled component.

Configuration comes from (later wins) the defaults, a ``-c`` config file, ``WASISUP_CMD_ARGS``
and the command line. The component is compiled in a child process before any worker is
forked; on HUP gunicorn reloads this configuration, which recompiles a changed component, then
starts new workers and gracefully retires the old ones.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import runpy
import shlex
import signal
import socket
import ssl
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

import gunicorn
import gunicorn.util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config, Setting
from setproctitle import setproctitle

from . import __version__, metrics
from .compile import WASMTIME_VERSION, CompileError, Prepared, component_kind, prepare
from .http.tls import TlsContext
from .settings import HOOKS, REUSED, SECTION, adopt
from .usage import ENV_ARGS, Parser, UsageError, check_utf8

log = logging.getLogger("wasisup")
VERSION = f"wasisup {__version__} (wasmtime {WASMTIME_VERSION}, gunicorn {gunicorn.__version__})"

USAGE = """wasisup [OPTIONS] COMPONENT
       wasisup compile IN.wasm [-o OUT.cwasm]
       wasisup check FILE.cwasm"""
DESCRIPTION = """\
Serve a wasi:http/proxy WebAssembly component: a master process and prefork workers.

commands:
  wasisup [OPTIONS] COMPONENT             serve COMPONENT (.wasm, compiled once and cached; or .cwasm)
  wasisup compile IN.wasm [-o OUT.cwasm]  precompile for this wasmtime and engine settings
  wasisup check FILE.cwasm                check that a .cwasm loads and links here"""
EPILOG = """\
Settings come from (later wins) the defaults, a config file (-c), $WASISUP_CMD_ARGS and the
command line. Signals to the master: HUP reloads (zero downtime), TERM or QUIT stops
gracefully, INT stops at once, TTIN/TTOU add/remove a worker, USR1 reopens the logs."""

# gunicorn titles its processes "gunicorn: ..."; ours are "wasisup: master [NAME]" and so on.
gunicorn.util._setproctitle = lambda title: setproctitle(f"wasisup: {title}")


def _announce_wasisup(record: logging.LogRecord) -> bool:
    """gunicorn's first line says "Starting gunicorn X"; ours names wasisup and what it runs on."""
    if record.msg == "Starting gunicorn %s":
        record.msg, record.args = "Starting %s", (VERSION,)
    return True


logging.getLogger("gunicorn.error").addFilter(_announce_wasisup)


def exposed_settings(cfg: Config) -> list[Any]:
    """The settings wasisup offers: gunicorn's that apply, then its own."""
    return ([cfg.settings[name] for name in REUSED]
            + sorted((s for s in cfg.settings.values() if s.section == SECTION and s.cli),
                     key=lambda s: s.order))


def add_option(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """A setting's flag, with its help and its real default (values are checked when set)."""
    default = setting.default
    shown = ", ".join(map(str, default)) if isinstance(default, list) else default
    details = [f"config file: {setting.name}"] if setting.name != "config" else []
    takes_value = setting.action in (None, "store", "append")
    if shown not in (None, "") and takes_value:
        details.append(f"default: {shown}")
    help_text = setting.short + (f" ({'; '.join(details)})" if details else "")
    value = {"metavar": setting.meta} if takes_value else {}
    parser.add_argument(*setting.cli, dest=setting.name, action=setting.action or "store",
                        default=None, help=help_text.replace("%", "%%"), **value)


def build_parser(cfg: Config) -> argparse.ArgumentParser:
    parser = Parser(prog="wasisup", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("component", nargs="?", metavar="COMPONENT",
                        help=cfg.settings["component"].short)
    parser.add_argument("--version", action="version", version=VERSION,
                        help="print the versions of wasisup, wasmtime and gunicorn")
    for setting in exposed_settings(cfg):
        add_option(parser, setting)
    return parser


# What to do about the usual reasons a socket cannot be bound.
BIND_ADVICE = {
    errno.EADDRINUSE: "another process listens there: stop it, or choose another port",
    errno.EACCES: "ports below 1024 need root: choose a port from 1024 up",
    errno.EADDRNOTAVAIL: "no interface here has that address: use 127.0.0.1, 0.0.0.0 or its own",
}


def check_bindable(address: Any) -> None:
    """Fail now, in one line, for an address gunicorn would retry binding for seconds."""
    if isinstance(address, int):
        _check_fd(address)
    elif isinstance(address, (str, bytes)):
        _check_unix_path(os.fsdecode(address))
    else:
        _check_tcp(address[0], address[1])


def _check_tcp(host: str, port: int) -> None:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # "" is every interface
    except socket.gaierror as exc:
        raise UsageError(f"cannot bind {shown}: {exc.strerror}: give an IP address or a host name "
                         "this machine resolves") from None
    family, kind, proto, _, sockaddr = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            advice = BIND_ADVICE.get(exc.errno)
            raise UsageError(f"cannot bind {shown}: {exc.strerror}"
                             + (f": {advice}" if advice else "")) from None


def _check_unix_path(path: str) -> None:
    if path.startswith("\0"):  # the abstract namespace: nothing on disk
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot bind unix:{path}: directory {directory} does not exist: "
                         "create it, or choose another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"cannot bind unix:{path}: directory {directory} is not writable by "
                         "this user: choose another path")
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise UsageError(f"cannot bind unix:{path}: it exists and is not a socket: remove it, "
                         "or choose another path")


def _check_fd(fd: int) -> None:
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise UsageError(f"cannot bind fd://{fd}: it is not an open socket (fd:// takes a "
                         "listening socket a process manager passes in)")


class WasiApplication(BaseApplication):
    """Parses the configuration, prepares the component, runs the arbiter."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.prepared: Prepared | None = None
        self.tls: TlsContext | None = None  # the listeners' TLS, when --certfile is given
        super().__init__(usage="wasisup [OPTIONS] COMPONENT", prog="wasisup")

    def do_load_config(self) -> None:
        """Like gunicorn's, but a bad value raises UsageError instead of exiting."""
        self.load_default_config()
        self.load_config()

    def load_default_config(self) -> None:
        super().load_default_config()
        adopt(self.cfg.settings)
        # gunicorn's control socket is off: it writes to $HOME, read-only in a hardened container.
        self.cfg.set("control_socket_disable", True)

    def load_config(self) -> None:
        cfg = self.cfg
        parser = build_parser(cfg)
        try:
            env_args = shlex.split(os.environ.get(ENV_ARGS, ""))
        except ValueError as exc:
            raise UsageError(f"${ENV_ARGS}: {exc}: quote it as a shell would") from None
        args = parser.parse_args(env_args + self.argv)
        if args.config:
            self._load_file(args.config)
        for setting in [cfg.settings["component"], *exposed_settings(cfg)]:
            value = getattr(args, setting.name, None)
            if value is not None:
                self._set(setting.name, value, "/".join(setting.cli or [setting.meta]))
        if not cfg.component:
            raise UsageError("no COMPONENT given: name the .wasm or .cwasm to serve "
                             "(see wasisup --help)")
        component_kind(Path(cfg.component))  # a wrong file is named before a busy port
        if cfg.http2_cleartext != "off":
            if "h2" not in cfg.http_protocols:
                raise UsageError("--http2-cleartext serves HTTP/2, which --http-protocols "
                                 "leaves out: add h2 to it")
            if cfg.is_ssl:
                raise UsageError("--http2-cleartext is for listeners without TLS; with "
                                 "--certfile, HTTP/2 is chosen by ALPN: drop one of them")
        if cfg.is_ssl:
            if cfg.cert_reqs == ssl.CERT_REQUIRED and not cfg.ca_certs:
                raise UsageError("--cert-reqs 2 requires client certificates, checked against "
                                 "--ca-certs FILE: give it")
            try:
                self.tls = TlsContext(cfg)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        else:
            self.tls = None
        if self.prepared is None:  # at start; on reload our master holds these addresses
            for address in cfg.address:
                check_bindable(address)
            if cfg.metrics_bind:
                check_bindable(gunicorn.util.parse_address(cfg.metrics_bind))
        cfg.set("worker_class", "wasisup.worker.WasmWorker")
        cfg.set("default_proc_name", Path(cfg.component).name)
        cfg.set("child_exit", _child_exit)
        cfg.set("worker_exit", _worker_exit)
        cfg.set("when_ready", _when_ready)
        self.prepared = prepare(Path(cfg.component), announce=self._announce)

    def _announce(self, message: str) -> None:
        """Say what takes a while: in the log once the arbiter runs, else on stderr."""
        if self.prepared is None:
            print(f"wasisup: {message}", file=sys.stderr, flush=True)
        else:
            log.info("%s", message)

    def _set(self, name: str, value: Any, source: str) -> None:
        """Set a value; a bad one is a UsageError naming where it came from (flag or file).
        Text must be UTF-8 (a file name that is not would break the process titles)."""
        try:
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    check_utf8(text, repr(text))
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}: give UTF-8 text (rename a file whose name is not)") from None
        try:
            self.cfg.set(name, value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{source}: {exc}") from None

    def _load_file(self, path: str) -> None:
        """A gunicorn-style Python config file: top-level names are setting names."""
        if not os.path.isfile(path):
            raise UsageError(f"config file {path} does not exist")
        try:
            namespace = runpy.run_path(path)
        except Exception as exc:
            raise UsageError(f"config file {path}: {type(exc).__name__}: {exc}") from None
        known = {s.name for s in exposed_settings(self.cfg)} | {"component", *HOOKS}
        for name, value in namespace.items():
            if name.startswith("_") or type(value).__name__ == "module":
                continue
            if callable(value) and name not in HOOKS:
                continue
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see README for the names"
                raise UsageError(f"config file {path}: unknown setting {name!r} ({hint})")
            self._set(name, value, f"config file {path}: {name}")

    def reload(self) -> None:
        """HUP: re-read the configuration; if it is now broken, keep the old one (and say so
        with ReloadRefused, so the arbiter keeps its workers too)."""
        previous_cfg, previous, previous_tls = self.cfg, self.prepared, self.tls
        try:
            self.do_load_config()
        except (UsageError, CompileError) as exc:
            self.cfg, self.prepared, self.tls = previous_cfg, previous, previous_tls
            raise ReloadRefused(str(exc)) from None
        if previous is None or previous.sha256 != self.prepared.sha256:
            log.info("reloaded %s (sha256 %s)", self.component_name, self.prepared.sha256[:12])

    def load(self) -> str:
        return self.cwasm

    @property
    def cwasm(self) -> str:
        assert self.prepared is not None
        return str(self.prepared.cwasm)

    @property
    def component_name(self) -> str:
        return Path(self.cfg.component).name

    def run(self) -> None:
        WasiArbiter(self).run()


class ReloadRefused(Exception):
    """The configuration no longer loads: a HUP changes nothing."""


class WasiArbiter(Arbiter):
    """gunicorn's arbiter, with QUIT as a graceful stop (like TERM); INT stays the fast one."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.exit_notes: dict[int, int] = {}  # worker pid -> its heartbeat file (spawn_worker)

    def reload(self) -> None:
        """HUP: gunicorn's reload (new workers, the old ones retired gracefully), unless the
        configuration no longer loads: then the running workers stay as they are."""
        replaced = len(self.WORKERS)
        try:
            super().reload()
        except ReloadRefused as exc:
            self.log.error("reload failed, still serving the previous configuration: %s", exc)
        else:
            metrics.master().restarts.labels("reload").inc(replaced)

    def handle_quit(self) -> None:
        raise StopIteration

    def spawn_worker(self) -> int:
        """Fork a worker with its signals held pending until it has its own handlers: in
        between, the master's handlers it inherited would swallow a TERM (a stop sent as
        workers boot then waited out the whole --graceful-timeout)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.worker_class.SIGNALS)
        try:
            pid = super().spawn_worker()
        finally:  # (in the parent; the worker unblocks them in WasmWorker.init_signals)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.worker_class.SIGNALS)
        # The worker's heartbeat file is closed before child_exit runs: keep it open to read
        # the reason the worker wrote there when it chose to exit.
        self.exit_notes[pid] = os.dup(self.WORKERS[pid].tmp.fileno())
        metrics.master().workers.set(len(self.WORKERS))
        return pid

    def exit_reason(self, worker: Any) -> str:
        """Why a worker that exited did: the reason it wrote (see ``WasmWorker.note_exit``),
        or its timeout, or else it crashed."""
        note = self.exit_notes.pop(worker.pid, None)
        written = ""
        if note is not None:
            written = os.pread(note, 64, 0).decode(errors="replace")
            os.close(note)
        if worker.aborted:
            return "timeout"
        return written if written in metrics.RESTART_REASONS else "crash"


def _when_ready(arbiter: Arbiter) -> None:
    from .worker import share_logging

    share_logging(arbiter.log)
    metrics.master()  # before the first fork: the series start at 0
    if arbiter.cfg.metrics_bind:
        metrics.serve(arbiter.cfg.metrics_bind, lambda: arbiter.LISTENERS)
        arbiter.log.info("Metrics at http://%s/metrics", arbiter.cfg.metrics_bind)
    if not arbiter.cfg.allow_outbound:
        arbiter.log.warning("Outbound requests are unrestricted: guests may reach any host, "
                            "loopback services included; --allow-outbound names the ones they "
                            "may reach")


def _worker_exit(arbiter: Arbiter, worker: Any) -> None:
    """A worker is done (gunicorn calls this last, as the worker's SystemExit unwinds): leave
    now, with its exit status. Tearing the interpreter down (every module, wasmtime's tables)
    is slower than booting a worker, and --max-requests churn would pay it every time."""
    exiting = sys.exc_info()[1]
    code = exiting.code if isinstance(exiting, SystemExit) and isinstance(exiting.code, int) else 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _child_exit(arbiter: Arbiter, worker: Any) -> None:
    metrics.worker_exited(worker.pid)
    reason = arbiter.exit_reason(worker)
    master = metrics.master()
    master.workers.set(len(arbiter.WORKERS))
    # Still serving and now short of workers: the arbiter will replace this one.
    if arbiter.LISTENERS and len(arbiter.WORKERS) < arbiter.num_workers:
        master.restarts.labels(reason).inc()
