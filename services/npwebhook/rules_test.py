"""np-webhook's pure rules: order ids, tiers, expiry, USD value, signing."""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal

import pytest

from telepay_shared import errors

from services.npwebhook import rules

NOW = datetime(2025, 11, 15, 12, 30, 45)
CHANNEL = rules.Channel("-1003111111111", "0xwallet", "link", "eth",
                        ((Decimal("15.00"), 31), (Decimal("25.00"), 60)))


@pytest.mark.parametrize("order_id, expected", [
    ("PGP-6271402111|-1003268562225", (6271402111, -1003268562225)),
    ("PGP-6271402111|1003268562225", (6271402111, 1003268562225)),  # the new format keeps the sign it is given
    ("PGP-6271402111-1003268562225", (6271402111, -1003268562225)),  # the old one lost it: made negative
    (" PGP-5|-7 ", (5, -7)),
])
def test_order_ids(order_id, expected):
    assert rules.parse_order_id(order_id) == expected


@pytest.mark.parametrize("order_id", ["", None, 12, "PGP-abc|-1", "XYZ-1|-2", "PGP-1|", "PGP-0|-5", "PGP--4|-5",
                                      "PGP-1|-2|-3"])
def test_bad_order_ids(order_id):
    with pytest.raises(errors.BadRequest):
        rules.parse_order_id(order_id)


def notification(**changes) -> dict:
    """A finished notification's fields, with changes."""
    return {"payment_id": 5077125051, "order_id": "PGP-6271402111|-1003268562225", "payment_status": "finished",
            "outcome_amount": Decimal("0.0046"), "outcome_currency": "eth", "pay_currency": "eth",
            "price_amount": 15, **changes}


def test_finished_payment_reads_amounts_exactly_and_defaults_the_outcome_currency():
    payment = rules.finished_payment(notification(outcome_currency=None, pay_amount="0.0048", invoice_id=4651237812))
    assert (payment.payment_id, payment.user_id, payment.open_channel_id) == (5077125051, 6271402111, -1003268562225)
    assert payment.outcome_amount == Decimal("0.0046") and payment.pay_amount == Decimal("0.0048")
    assert payment.price_amount == Decimal(15) and payment.invoice_id == "4651237812"
    assert payment.outcome_currency == "eth"


@pytest.mark.parametrize("changes, field", [
    ({"order_id": None}, "order_id"),
    ({"payment_id": None}, "payment_id"),
    ({"payment_id": "12a"}, "payment_id"),
    ({"payment_id": 0}, "payment_id"),
    ({"payment_id": True}, "payment_id"),
    ({"outcome_amount": "lots"}, "outcome_amount"),
    ({"price_amount": -1}, "price_amount"),
    ({"pay_amount": "NaN"}, "pay_amount"),
])
def test_finished_payment_refuses_unusable_fields(changes, field):
    with pytest.raises(errors.BadRequest) as caught:
        rules.finished_payment(notification(**changes))
    assert caught.value.details["field"] == field


def test_payment_status_is_lowercased_and_required():
    assert rules.payment_status({"payment_status": "Finished"}) == "finished"
    for body in ({}, {"payment_status": None}, {"payment_status": 3}):
        with pytest.raises(errors.BadRequest):
            rules.payment_status(body)


@pytest.mark.parametrize("price, days", [(Decimal("15"), 31), (Decimal("25.00"), 60), (Decimal("20"), 30), (None, 30)])
def test_tier_days(price, days):
    assert rules.tier_days(CHANNEL, price) == days


@pytest.mark.parametrize("row, expected", [
    (None, NOW + timedelta(days=31)),
    ({"payment_status": "confirmed", "expire_date": date(2025, 11, 25), "expire_time": time(8, 0)},
     datetime(2025, 11, 25, 8, 0) + timedelta(days=31)),
    ({"payment_status": "confirmed", "expire_date": date(2025, 11, 1), "expire_time": time(8, 0)},
     NOW + timedelta(days=31)),
    ({"payment_status": "pending", "expire_date": date(2025, 12, 25), "expire_time": None}, NOW + timedelta(days=31)),
    ({"payment_status": "confirmed", "expire_date": None, "expire_time": None}, NOW + timedelta(days=31)),
])
def test_expiry_extends_only_a_running_paid_subscription(row, expected):
    assert rules.subscription_expiry(row, 31, NOW) == expected


@pytest.mark.parametrize("ticker, stable", [
    ("USDT", True), ("usdttrc20", True), ("usdcsol", True), ("dai", True), ("usd", True), ("busdbsc", True),
    ("eth", False), ("usdtx", False), ("btc", False), ("usdterc", False),
])
def test_stablecoins(ticker, stable):
    assert rules.is_usd_stablecoin(ticker) is stable


class FixedPrices:
    def __init__(self, price):
        self.price, self.asked = price, []

    def usd_price(self, currency):
        self.asked.append(currency)
        return self.price


def test_outcome_usd_is_exact_and_rounded_to_the_column():
    payment = rules.finished_payment(notification(outcome_amount="0.00115340416715763"))
    prices = FixedPrices(Decimal("3000.12"))
    assert rules.outcome_usd(payment, prices) == Decimal("3.46035091")
    assert prices.asked == ["eth"]


def test_stablecoin_outcome_counts_one_to_one_without_a_price():
    payment = rules.finished_payment(notification(outcome_amount="14.83", outcome_currency="usdttrc20"))
    prices = FixedPrices(None)
    assert rules.outcome_usd(payment, prices) == Decimal("14.83") and prices.asked == []


def test_missing_outcome_is_refused():
    payment = replace(rules.finished_payment(notification()), outcome_amount=None)
    with pytest.raises(errors.BadRequest):
        rules.outcome_usd(payment, FixedPrices(Decimal(1)))


def test_signed_json_carries_the_hmac_of_its_exact_bytes():
    raw, headers = rules.signed_json({"b": 1, "a": 2.5}, "key")
    assert json.loads(raw) == {"b": 1, "a": 2.5}
    assert headers == {"X-Webhook-Signature": hmac.new(b"key", raw, hashlib.sha256).hexdigest()}


@pytest.mark.parametrize("origin, allowed", [
    ("https://www.paygateprime.com", True), ("https://storage.googleapis.com", True), ("http://localhost:3000", True),
    ("http://localhost", True), ("https://evil.example", False), ("https://www.paygateprime.com.evil", False),
    (None, False),
])
def test_cors_origins(origin, allowed):
    assert rules.cors_allowed(origin) is allowed
