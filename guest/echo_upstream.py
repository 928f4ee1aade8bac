"""An upstream to put behind the reference guest: it answers any method on any path with what
it received, as JSON (method, path with query, headers, body).

    python3 guest/echo_upstream.py [--port 9000]      (on 127.0.0.1; `make upstream`)

``?status=N`` sets the answer's status; ``/bytes?size=N`` answers N bytes instead;
``/slow?seconds=S`` answers after S seconds. Python's standard library only, so it runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with what it received (see the module's docstring)."""

    protocol_version = "HTTP/1.1"

    def answer(self, path: str, params: dict[str, str], body: bytes) -> tuple[bytes, str]:
        """The payload and content-type for a request; subclasses add paths."""
        if path == "/slow":
            time.sleep(float(params.get("seconds", "1")))
        if path == "/bytes":
            size = int(params["size"])
            return (bytes(range(256)) * (size // 256 + 1))[:size], "application/octet-stream"
        echo = {"method": self.command, "path": self.path,
                "headers": sorted([k.lower(), v] for k, v in self.headers.items()),
                "body": body.decode("latin-1")}
        return json.dumps(echo).encode(), "application/json"

    def _respond(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        payload, content_type = self.answer(path, params, body)
        self.send_response(int(params.get("status", "200")))
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-upstream", "yes")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _respond

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000, help="the port on 127.0.0.1")
    port = parser.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), EchoHandler)
    print(f"echo upstream on http://127.0.0.1:{port} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
