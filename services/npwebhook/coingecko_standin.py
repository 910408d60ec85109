"""A local stand-in for CoinGecko's GET /api/v3/simple/price, for np-webhook's tests only.

Like CoinGecko it answers {"<coin id>": {"usd": <price>}} for the ids it knows and leaves unknown
ids out. `fail_next(status)` scripts error answers (429 carries CoinGecko's error object) and
`hang_next(seconds)` a slow answer.
"""
from __future__ import annotations

import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PRICES_USD = {"ethereum": Decimal("3000.12"), "bitcoin": Decimal("60000"), "tether": Decimal("1.0002")}


class CoinGeckoStandIn:
    """/simple/price on 127.0.0.1; use `url` as the client's base URL."""

    def __init__(self, prices_usd: dict[str, Decimal] | None = None):
        self.prices_usd = dict(PRICES_USD if prices_usd is None else prices_usd)
        self.requests_seen: list[dict[str, list[str]]] = []
        self._scripted: list[tuple[int, float]] = []  # (status, hang seconds) answered before normal service
        self._released = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True

    @property
    def url(self) -> str:
        """Base URL ending in /api/v3, like CoinGecko's."""
        return f"http://127.0.0.1:{self._http.server_address[1]}/api/v3"

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next `count` requests with `status`."""
        self._scripted += [(status, 0.0)] * count

    def hang_next(self, seconds: float) -> None:
        """Hold the next request for `seconds` before answering it normally."""
        self._scripted.append((200, seconds))

    def __enter__(self) -> "CoinGeckoStandIn":
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._released.set()
        self._http.shutdown()
        self._http.server_close()

    def _answer(self, path: str) -> tuple[int, bytes]:
        """Status and body for one GET."""
        parts = urlsplit(path)
        query = parse_qs(parts.query)
        self.requests_seen.append(query)
        status, hang_s = self._scripted.pop(0) if self._scripted else (200, 0.0)
        if hang_s:
            self._released.wait(hang_s)
        if status == 429:
            return 429, b'{"status": {"error_code": 429, "error_message": "You\'ve exceeded the Rate Limit."}}'
        if status != 200 or parts.path != "/api/v3/simple/price":
            return status if status != 200 else 404, b'{"error": "not found"}'
        ids = [coin for text in query.get("ids", []) for coin in text.split(",")]
        known = {coin: self.prices_usd[coin] for coin in ids if coin in self.prices_usd}
        body = ", ".join(f'"{coin}": {{"usd": {price}}}' for coin, price in known.items())
        return 200, ("{" + body + "}").encode()

    def _handler_class(self):
        """The request handler bound to this stand-in."""
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = standin._answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

