"""The master: a gunicorn application whose "app" is a compiled component.

Configuration comes from (later wins) the defaults, a ``-c`` config file, ``WASISUP_CMD_ARGS``
and the command line. The component is compiled in a child process before any worker is
forked; on HUP gunicorn reloads this configuration, which recompiles a changed component, then
starts new workers and gracefully retires the old ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import shlex
import socket
from pathlib import Path
from typing import Any, NoReturn, Sequence

import gunicorn.util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from setproctitle import setproctitle

from . import metrics
from .compile import CompileError, Prepared, prepare
from .settings import GUNICORN_SETTINGS, SECTION

log = logging.getLogger("wasisup")
ENV_ARGS = "WASISUP_CMD_ARGS"

# gunicorn titles its processes "gunicorn: ..."; ours are "wasisup: master [NAME]" and so on.
gunicorn.util._setproctitle = lambda title: setproctitle(f"wasisup: {title}")


class UsageError(Exception):
    """Bad configuration: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError (one line, exit 2) instead of printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def exposed_settings(cfg: Config) -> list[Any]:
    """The settings wasisup offers: gunicorn's that apply, then its own."""
    return ([cfg.settings[name] for name in GUNICORN_SETTINGS]
            + sorted((s for s in cfg.settings.values() if s.section == SECTION),
                     key=lambda s: s.order))


def build_parser(cfg: Config) -> argparse.ArgumentParser:
    parser = Parser(prog="wasisup", usage="wasisup [OPTIONS] COMPONENT",
                     description="Serve a wasi:http/proxy WebAssembly component "
                                 "(`wasisup compile IN.wasm -o OUT.cwasm` precompiles one).")
    parser.add_argument("component", nargs="?", metavar="COMPONENT",
                        help=cfg.settings["component"].short)
    for setting in exposed_settings(cfg):
        setting.add_option(parser)
    return parser


def check_bindable(address: Any) -> None:
    """Fail now, in one line, for an address gunicorn would retry binding for seconds."""
    if isinstance(address, (str, bytes)):  # a unix socket path
        return
    host, port = address[0], address[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise UsageError(f"cannot bind {host}:{port}: {exc.strerror}") from None


class WasiApplication(BaseApplication):
    """Parses the configuration, prepares the component, runs the arbiter."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.prepared: Prepared | None = None
        super().__init__(usage="wasisup [OPTIONS] COMPONENT", prog="wasisup")

    def do_load_config(self) -> None:
        """Like gunicorn's, but a bad value raises UsageError instead of exiting."""
        self.load_default_config()
        self.load_config()

    def load_default_config(self) -> None:
        super().load_default_config()
        # Where wasisup's defaults differ from gunicorn's: a request often waits on I/O
        # (outbound calls), so a worker has several threads; gunicorn's control socket is
        # off (it writes to $HOME, which is read-only in a hardened container).
        self.cfg.set("threads", 4)
        self.cfg.set("control_socket_disable", True)
        # Heartbeat files in memory: a /tmp on disk can stall them (gunicorn #1194).
        if os.path.isdir("/dev/shm"):
            self.cfg.set("worker_tmp_dir", "/dev/shm")

    def load_config(self) -> None:
        cfg = self.cfg
        parser = build_parser(cfg)
        args = parser.parse_args(shlex.split(os.environ.get(ENV_ARGS, "")) + self.argv)
        if args.config:
            self._load_file(args.config)
        for setting in [cfg.settings["component"], *exposed_settings(cfg)]:
            value = getattr(args, setting.name, None)
            if value is not None:
                self._set(setting.name, value)
        if not cfg.component:
            raise UsageError("no COMPONENT given (a .wasm or .cwasm to serve)")
        if self.prepared is None:  # at start; on reload our master holds these addresses
            for address in cfg.address:
                check_bindable(address)
        self._set("worker_class", "wasisup.worker.WasmWorker")
        self._set("default_proc_name", Path(cfg.component).name)
        self._set("child_exit", _child_exit)
        self._set("when_ready", _when_ready)
        self.prepared = prepare(Path(cfg.component))

    def _set(self, name: str, value: Any) -> None:
        try:
            self.cfg.set(name, value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"invalid value for {name}: {exc}") from None

    def _load_file(self, path: str) -> None:
        """A gunicorn-style Python config file: top-level names are setting names."""
        if not os.path.isfile(path):
            raise UsageError(f"config file {path} does not exist")
        try:
            namespace = runpy.run_path(path)
        except Exception as exc:
            raise UsageError(f"config file {path}: {type(exc).__name__}: {exc}") from None
        known = {s.name for s in exposed_settings(self.cfg)} | {"component"}
        for name, value in namespace.items():
            if name.startswith("_") or callable(value) or type(value).__name__ == "module":
                continue
            if name not in known:
                raise UsageError(f"config file {path}: unknown setting {name!r}")
            self._set(name, value)

    def reload(self) -> None:
        """HUP: re-read the configuration; if it is now broken, keep serving the old one."""
        previous_cfg, previous = self.cfg, self.prepared
        try:
            self.do_load_config()
        except (UsageError, CompileError) as exc:
            log.error("reload failed, still serving the previous configuration: %s", exc)
            self.cfg, self.prepared = previous_cfg, previous
            return
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


class WasiArbiter(Arbiter):
    """gunicorn's arbiter, with QUIT as a graceful stop (like TERM); INT stays the fast one."""

    def handle_quit(self) -> None:
        raise StopIteration


def _when_ready(arbiter: Arbiter) -> None:
    from .worker import share_logging

    share_logging(arbiter.log)
    metrics.worker_restarts()  # before the first fork: the series starts at 0
    if arbiter.cfg.metrics_bind:
        metrics.serve(arbiter.cfg.metrics_bind)
        arbiter.log.info("Metrics at http://%s/metrics", arbiter.cfg.metrics_bind)
    if not arbiter.cfg.allow_outbound:
        arbiter.log.warning("Outbound requests are unrestricted: guests may reach any host, "
                            "loopback services included; --allow-outbound names the ones they "
                            "may reach")


def _child_exit(arbiter: Arbiter, worker: Any) -> None:
    metrics.worker_exited(worker.pid)
    # Still serving and now short of workers: the arbiter will replace this one.
    if arbiter.LISTENERS and len(arbiter.WORKERS) < arbiter.num_workers:
        metrics.worker_restarts().inc()
