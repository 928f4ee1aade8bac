"""The upstream of proxy benchmarks: nginx on loopback, keep-alive on, counting its connections.

nginx runs in the foreground as one process, logging to stderr, with its config, pid, temp
dirs and files in a temporary prefix, so it needs no root and leaves nothing behind. Its ``stub_status``
page counts the connections it accepted: the difference over a run is how many upstream
connections the proxy under test opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

from harness import SetupError, free_port, server

STATUS_PATH = "/nginx-status"
SLOW_PATH = "/slow"  # with a delay: the first file, after it (the echo module's echo_sleep)
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"  # Debian's libnginx-mod-http-echo
CONFIG = """\
{modules}
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location = {status} {{ stub_status; }}
{locations}
    }}
}}
"""


def _nginx() -> str:
    found = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise SetupError("nginx is missing (apt-get install nginx-light, or nginx)")
    return found


class Nginx:
    """A running nginx: its URL, and how many connections it has accepted."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._status_queries = 0

    def connections_accepted(self) -> int:
        """Connections accepted so far, not counting those of these status queries."""
        try:
            with urllib.request.urlopen(self.url + STATUS_PATH, timeout=5) as response:
                status = response.read().decode()
        except OSError as exc:
            raise SetupError(f"nginx {STATUS_PATH}: {exc}") from None
        self._status_queries += 1
        accepts = re.search(r"server accepts handled requests\s+(\d+)", status)
        if accepts is None:
            raise SetupError(f"nginx {STATUS_PATH} answered {status!r}")
        return int(accepts.group(1)) - self._status_queries


@contextlib.contextmanager
def nginx(files: dict[str, int], delay: float = 0.0) -> Iterator[Nginx]:
    """nginx serving ``files`` (name -> size in bytes) until the block ends; with a ``delay``
    (seconds), also ``SLOW_PATH``: the first file, after the delay (the wait costs nginx no
    worker: one answers thousands of such requests a second)."""
    executable = _nginx()
    modules = locations = ""
    if delay:
        if not os.path.exists(ECHO_MODULE):
            raise SetupError("nginx's echo module is missing (apt-get install libnginx-mod-http-echo)")
        modules = f"load_module {ECHO_MODULE};"
        first = next(iter(files))
        locations = f'        location = {SLOW_PATH} {{ echo_sleep {delay:g}; echo_exec /{first}; }}'

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="wasisup-bench-nginx-") as tmp:
        prefix = Path(tmp)
        (prefix / "www").mkdir()
        for name, size in files.items():
            (prefix / "www" / name).write_bytes(os.urandom(size))
        config = prefix / "nginx.conf"
        config.write_text(CONFIG.format(prefix=prefix, port=port, status=STATUS_PATH,
                                        modules=modules, locations=locations))
        with server([executable, "-p", str(prefix), "-c", str(config),
                     "-e", "stderr"], port):
            yield Nginx(port)
