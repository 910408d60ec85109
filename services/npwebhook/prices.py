"""USD prices of the currency a NowPayments payment settled in, from CoinGecko (spec §7.3).

Legacy turned every failure here into "no USD value" and then answered NowPayments 200 without
starting the pipeline (defect 19). Every failure is a PriceUnavailable (transient): the IPN is
answered 503 and NowPayments delivers it again later.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from decimal import Decimal

import requests

from telepay_shared import errors
from telepay_shared.config import Config

log = logging.getLogger(__name__)

COINGECKO_API_URL = "https://api.coingecko.com/api/v3"
TIMEOUT_S = 10  # legacy's; NowPayments waits longer than this for the IPN answer
# One price serves the notifications of the next PRICE_REUSED_S: CoinGecko's public API refreshes its
# prices about once a minute and allows a few dozen calls a minute, so asking once per payment bought no
# fresher price and, past a payment every few seconds, only 429s (answered 503, retried by NowPayments).
PRICE_REUSED_S = 30.0
# NowPayments ticker -> CoinGecko coin id: legacy np-webhook's map plus the coins GCWebhook2 knew.
COIN_IDS = {
    "eth": "ethereum", "btc": "bitcoin", "usdt": "tether", "usdc": "usd-coin", "ltc": "litecoin",
    "trx": "tron", "bnb": "binancecoin", "sol": "solana", "matic": "matic-network", "bch": "bitcoin-cash",
    "xrp": "ripple", "ada": "cardano", "doge": "dogecoin", "avax": "avalanche-2", "dot": "polkadot",
}


class PriceUnavailable(errors.TransientError, code="price_unavailable"):
    """No usable USD price right now; the notification is answered 503 so NowPayments retries."""


class CoinGeckoPrices:
    """CoinGecko's /simple/price over HTTP; any object with usd_price(currency) can stand in for it."""

    def __init__(self, base_url: str = COINGECKO_API_URL, timeout_s: float = TIMEOUT_S,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.monotonic):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.clock = clock
        self._known: dict[str, tuple[float, Decimal]] = {}  # coin -> (when asked, USD price)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> "CoinGeckoPrices":
        """The client the service's COINGECKO_API_URL names (CoinGecko itself by default)."""
        return cls(config.get("COINGECKO_API_URL") or COINGECKO_API_URL)

    def usd_price(self, currency: str) -> Decimal:
        """The price of one unit of `currency` in USD, asked at most PRICE_REUSED_S ago; PriceUnavailable when
        there is none (a failure is not remembered: the next notification asks again)."""
        coin = COIN_IDS.get(currency.lower())
        if coin is None:
            raise PriceUnavailable(f"no USD price source for {currency!r}", currency=currency)
        with self._lock:
            asked_at, price = self._known.get(coin, (None, None))
        if asked_at is not None and self.clock() - asked_at < PRICE_REUSED_S:
            return price
        asked_at = self.clock()
        price = self._ask(coin, currency)
        with self._lock:
            self._known[coin] = (asked_at, price)
        return price

    def _ask(self, coin: str, currency: str) -> Decimal:
        """CoinGecko's current USD price of the coin."""
        try:
            answer = self.session.get(f"{self.base_url}/simple/price", params={"ids": coin, "vs_currencies": "usd"},
                                      timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise PriceUnavailable(f"CoinGecko unreachable ({type(exc).__name__})", currency=currency) from None
        if answer.status_code != 200:
            raise PriceUnavailable(f"CoinGecko answered {answer.status_code}", currency=currency)
        return _positive_price(answer.content, coin, currency)


def _positive_price(content: bytes, coin: str, currency: str) -> Decimal:
    """The USD price in a /simple/price answer, exactly as written; PriceUnavailable when absent."""
    try:
        price = json.loads(content, parse_float=Decimal).get(coin, {}).get("usd")
    except (ValueError, AttributeError):
        price = None
    if isinstance(price, bool) or not isinstance(price, (int, Decimal)) or price <= 0:
        raise PriceUnavailable(f"CoinGecko has no USD price for {coin}", currency=currency)
    return Decimal(price)
