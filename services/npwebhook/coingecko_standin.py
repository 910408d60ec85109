"""A local stand-in for CoinGecko's GET /api/v3/simple/price, for np-webhook's tests only.

Like CoinGecko it answers {"<coin id>": {"usd": <price>}} for the ids it knows and leaves unknown
ids out. `fail_next(status)` scripts error answers (429 carries CoinGecko's error object) and
`hang_next(seconds)` a slow answer.
"""
from __future__ import annotations

from decimal import Decimal
from urllib.parse import parse_qs

from flask import Response, request
from telepay_shared.standins.server import StandInServer

PRICES_USD = {"ethereum": Decimal("3000.12"), "bitcoin": Decimal("60000"), "tether": Decimal("1.0002")}


class CoinGeckoStandIn(StandInServer):
    """/simple/price on 127.0.0.1; use `url` as the client's base URL (it ends in /api/v3, like CoinGecko's)."""

    url_path = "/api/v3"

    def __init__(self, prices_usd: dict[str, Decimal] | None = None):
        super().__init__("127.0.0.1", 0, hang_s=0.0)
        self.prices_usd = dict(PRICES_USD if prices_usd is None else prices_usd)
        self.requests_seen: list[dict[str, list[str]]] = []
        self._scripted: list[tuple[int, float]] = []  # (status, hang seconds) answered before normal service
        # Every path: a wrong one gets this stand-in's JSON 404, not Flask's HTML page.
        self.app = self.app_on_every_path(__name__, self._get_view)

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next `count` requests with `status`."""
        self._scripted += [(status, 0.0)] * count

    def hang_next(self, seconds: float) -> None:
        """Hold the next request for `seconds` before answering it normally."""
        self._scripted.append((200, seconds))

    def _get_view(self, path: str) -> Response:
        """The answer to one GET."""
        status, body = self._answer("/" + path, parse_qs(request.query_string.decode()))
        return Response(body, status=status, content_type="application/json")

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
        """Status and body for one GET of path with its query."""
        self.requests_seen.append(query)
        status, hang_s = self._scripted.pop(0) if self._scripted else (200, 0.0)
        if hang_s:
            self._released.wait(hang_s)
        if status == 429:
            return 429, b'{"status": {"error_code": 429, "error_message": "You\'ve exceeded the Rate Limit."}}'
        if status != 200 or path != "/api/v3/simple/price":
            return status if status != 200 else 404, b'{"error": "not found"}'
        ids = [coin for text in query.get("ids", []) for coin in text.split(",")]
        known = {coin: self.prices_usd[coin] for coin in ids if coin in self.prices_usd}
        body = ", ".join(f'"{coin}": {{"usd": {price}}}' for coin, price in known.items())
        return 200, ("{" + body + "}").encode()
