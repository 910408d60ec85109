"""How every stand-in is served: its Flask app under waitress on host:port, in a background thread
for tests or in the calling thread for the dev stack, with scripted hangs released on stop.

waitress (a production WSGI server, pure Python) keeps HTTP/1.1 connections open between calls, as
the real APIs do; werkzeug's development server answered every call with "Connection: close", so
each call a service made cost a new TCP connection, a name lookup and a server thread. It logs no
line per request.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Self

from flask import Flask
from waitress import create_server
from waitress.server import BaseWSGIServer

from telepay_shared.testing.harness import Harness

# Requests served at once: a scripted hang holds one for its duration, and every service of a dev
# stack keeps connections to ChangeNOW's and Telegram's stand-ins.
SERVING_THREADS = 32
CONNECTION_LIMIT = 1000
IDLE_CONNECTION_S = 60  # an idle kept connection is closed after this long


class StandInServer(Harness):
    """Base of the stand-ins: serves `self.app` (built by the subclass) on host:port, 0 picking a free port.

    A subclass calls `super().__init__(host, port, hang_s)`, sets up its state, then builds `self.app`.
    """

    url_path = ""  # what follows host:port in the base URL a client is given (ChangeNOW's is /v2)
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
        self._thread = threading.Thread(target=self._serve, args=(self._server,), name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the dev stack's entry point)."""
        self._bind()
        self._serve(self._server)

    def _serve(self, server: BaseWSGIServer) -> None:
        """Run the serving loop until stop() has closed its sockets, then stop its threads."""
        try:
            server.run()
        finally:
            _close_sockets(server)  # after an interrupt; after stop() there is none left
            server.task_dispatcher.shutdown(timeout=1)

    def serve_until_interrupted(self, title: str) -> int:
        """Announce the stand-in, serve it until Ctrl-C (how a developer stops it) and return exit status 0."""
        print(f"{title} on http://{self.host}:{self.port}{self.url_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            self.serve_forever()
        return 0

    def stop(self) -> None:
        """Stop serving, free the port, then release hanging requests."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            # The serving loop closes its own sockets: closed from here, under its poll, it would fail.
            closed = threading.Event()
            try:
                server.trigger.pull_trigger(lambda: (_close_sockets(server), closed.set()))
            except OSError:  # its wake-up pipe is closed: the loop has already ended and closed them
                closed.set()
            closed.wait(timeout=5)
        self._released.set()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        """Base URL of the running stand-in, to give a client in place of the real service's."""
        if self._server is None:
            raise RuntimeError("stand-in is not started")
        return f"http://{self.host}:{self._server.effective_port}{self.url_path}"

    @staticmethod
    def app_on_every_path(name: str, view, methods: tuple[str, ...] = ("GET",)) -> Flask:
        """A Flask app that answers every path with view(path): for a stand-in that tells paths apart itself."""
        app = Flask(name)
        app.add_url_rule("/", "root", view, defaults={"path": ""}, methods=list(methods))
        app.add_url_rule("/<path:path>", "path", view, methods=list(methods))
        return app

    def _bind(self) -> None:
        """Create the waitress server on host:port (port 0 picks a free one)."""
        self._released.clear()
        self._server: BaseWSGIServer = create_server(
            self.app, host=self.host, port=self.port, threads=SERVING_THREADS, connection_limit=CONNECTION_LIMIT,
            channel_timeout=IDLE_CONNECTION_S, asyncore_use_poll=True, ident=None, clear_untrusted_proxy_headers=True)


def _close_sockets(server: BaseWSGIServer) -> None:
    """Close the listening socket, every kept connection and the loop's wake-up pipe: the loop then ends."""
    server.asyncore.close_all(server._map)
