"""The CoinGecko client against a local /simple/price stand-in: exact prices, every failure transient."""
from __future__ import annotations

from decimal import Decimal

import pytest

from telepay_shared.testing.tasks_emulator import free_port

from services.npwebhook.coingecko_standin import CoinGeckoStandIn
from services.npwebhook.prices import COINGECKO_API_URL, PRICE_REUSED_S, CoinGeckoPrices, PriceUnavailable


@pytest.fixture
def coingecko():
    with CoinGeckoStandIn() as standin:
        yield standin


def test_price_is_read_digit_for_digit(coingecko):
    assert CoinGeckoPrices(coingecko.url).usd_price("ETH") == Decimal("3000.12")
    assert coingecko.requests_seen == [{"ids": ["ethereum"], "vs_currencies": ["usd"]}]


def test_a_price_serves_the_next_thirty_seconds_then_is_asked_again(coingecko):
    now = [500.0]
    prices = CoinGeckoPrices(coingecko.url, clock=lambda: now[0])
    seen = []
    for step_s in (0.0, PRICE_REUSED_S - 0.01, 0.01):
        now[0] += step_s
        seen.append(prices.usd_price("eth"))
    assert seen == [Decimal("3000.12")] * 3
    assert len(coingecko.requests_seen) == 2  # the first and the third notification asked
    assert prices.usd_price("btc") > 0 and len(coingecko.requests_seen) == 3  # each coin has its own price


def test_a_failed_lookup_is_not_remembered(coingecko):
    prices = CoinGeckoPrices(coingecko.url)
    coingecko.fail_next(500)
    with pytest.raises(PriceUnavailable):
        prices.usd_price("eth")
    assert prices.usd_price("eth") == Decimal("3000.12") and len(coingecko.requests_seen) == 2


def test_unknown_currency_is_unavailable_without_asking(coingecko):
    with pytest.raises(PriceUnavailable) as caught:
        CoinGeckoPrices(coingecko.url).usd_price("shib")
    assert caught.value.http_status == 503 and coingecko.requests_seen == []


@pytest.mark.parametrize("status", [429, 500, 502, 404])
def test_error_answers_are_transient(coingecko, status):
    coingecko.fail_next(status)
    with pytest.raises(PriceUnavailable, match=str(status)):
        CoinGeckoPrices(coingecko.url).usd_price("eth")


@pytest.mark.parametrize("prices", [{}, {"ethereum": Decimal("0")}, {"ethereum": Decimal("-1")}])
def test_absent_or_non_positive_price_is_unavailable(prices):
    with CoinGeckoStandIn(prices) as standin, pytest.raises(PriceUnavailable, match="no USD price"):
        CoinGeckoPrices(standin.url).usd_price("eth")


def test_timeout_and_unreachable_are_transient(coingecko):
    coingecko.hang_next(2.0)
    with pytest.raises(PriceUnavailable, match="unreachable"):
        CoinGeckoPrices(coingecko.url, timeout_s=0.3).usd_price("eth")
    with pytest.raises(PriceUnavailable, match="unreachable"):
        CoinGeckoPrices(f"http://127.0.0.1:{free_port()}/api/v3").usd_price("eth")


def test_default_source_is_coingecko():
    class NoOverride(dict):
        def get(self, name, default=None):
            return None

    assert CoinGeckoPrices.from_config(NoOverride()).base_url == COINGECKO_API_URL
