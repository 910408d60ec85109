"""How every stand-in is served: its Flask app under werkzeug on host:port, in a background thread
for tests or in the calling thread for the dev stack, with scripted hangs released on stop."""
from __future__ import annotations

import contextlib
import threading
from typing import Self

from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from telepay_shared.testing.harness import Harness


class _QuietRequestHandler(WSGIRequestHandler):
    """Logs errors only, not a line per request."""

    def log_request(self, *args, **kwargs) -> None:
        """Log nothing for a request answered."""


class StandInServer(Harness):
    """Base of the stand-ins: serves `self.app` (built by the subclass) on host:port, 0 picking a free port.

    A subclass calls `super().__init__(host, port, hang_s)`, sets up its state, then builds `self.app`.
    """

    url_path = ""  # what follows host:port in the base URL a client is given (ChangeNOW's is /v2)
    quiet = False  # True: log no line per request (a stand-in asked often would drown the logs)
    app: Flask

    def __init__(self, host: str, port: int, hang_s: float):
        self.host = host
        self.port = port
        self.hang_s = hang_s
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Serve in a background daemon thread; returns self, so `with StandIn().start()` reads well."""
        self._bind()
        # A short poll keeps stop() fast: shutdown() waits for the serve loop's next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the dev stack's entry point)."""
        self._bind()
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def serve_until_interrupted(self, title: str) -> int:
        """Announce the stand-in, serve it until Ctrl-C (how a developer stops it) and return exit status 0."""
        print(f"{title} on http://{self.host}:{self.port}{self.url_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            self.serve_forever()
        return 0

    def stop(self) -> None:
        """Release hanging requests, stop serving and free the port."""
        self._released.set()
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        """Base URL of the running stand-in, to give a client in place of the real service's."""
        if self._server is None:
            raise RuntimeError("stand-in is not started")
        return f"http://{self.host}:{self._server.server_port}{self.url_path}"

    @staticmethod
    def app_on_every_path(name: str, view, methods: tuple[str, ...] = ("GET",)) -> Flask:
        """A Flask app that answers every path with view(path): for a stand-in that tells paths apart itself."""
        app = Flask(name)
        app.add_url_rule("/", "root", view, defaults={"path": ""}, methods=list(methods))
        app.add_url_rule("/<path:path>", "path", view, methods=list(methods))
        return app

    def _bind(self) -> None:
        """Create the werkzeug server on host:port (port 0 picks a free one)."""
        self._released.clear()
        handler = _QuietRequestHandler if self.quiet else None
        self._server = make_server(self.host, self.port, self.app, threaded=True, request_handler=handler)
