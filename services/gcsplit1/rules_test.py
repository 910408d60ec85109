"""GCSplit1's money and key rules on their own."""
from __future__ import annotations

import hashlib
import logging
import re
from decimal import Decimal

import pytest

from telepay_shared import errors

from services.gcsplit1 import rules

SWAP = {"unique_id": "K7Q2ZP9X4M1B8C3D", "cn_api_id": "e6c5b2a1d4f3a9", "from_currency": "ETH",
        "from_amount": 0.004462, "actual_eth_amount": 0.0046}


@pytest.mark.parametrize("fee, amount, remains", [
    (Decimal("3"), Decimal("0.0046"), Decimal("0.004462")),
    (Decimal("2.5"), Decimal("1"), Decimal("0.975")),
    (Decimal("0"), Decimal("0.1"), Decimal("0.1")),
    (Decimal("100"), Decimal("0.1"), Decimal("0")),
    # 0.0080833301 would be sent but recorded as 0.00808333 by the NUMERIC(20,8) payout columns.
    (Decimal("3"), Decimal("0.00833333"), Decimal("0.00808333")),
])
def test_fee_is_kept_in_exact_decimal(fee, amount, remains):
    assert rules.fee_deducted(amount, fee) == remains


@pytest.mark.parametrize("amounts, value", [
    (("0.004462", "0.7321", "0", "0.0123"), Decimal("0.7444")),
    (("1", "2900", "0.01", "5"), Decimal("1") * Decimal("2905") / Decimal("0.99")),
    (("0.01", "7", "0.01", "1"), Decimal("7")),  # nothing swapped after the deposit fee: the quote itself
    (("0.01", "7", "0.02", "1"), Decimal("7")),
])
def test_pure_market_value_adds_back_changenows_fees(amounts, value):
    assert rules.pure_market_value(*map(Decimal, amounts)) == value


def test_token_amounts_keep_the_wire_digits():
    assert rules.token_amount(0.004462) == Decimal("0.004462")
    assert rules.token_amount(0.1 + 0.2) == Decimal("0.30000000000000004")  # the f64, not a guess


@pytest.mark.parametrize("amount", [Decimal("0"), Decimal("-1"), Decimal("NaN"), Decimal("Infinity")])
def test_positive_refuses_what_changenow_would_refuse(amount):
    with pytest.raises(errors.BadRequest):
        rules.positive(amount, "adjusted_amount")


def test_eth_payout_orders_the_exchange_amount_and_reports_the_payment(caplog):
    assert rules.hostpay_amounts(SWAP) == (Decimal("0.0046"), Decimal("0.004462"))
    assert rules.hostpay_amounts({**SWAP, "actual_eth_amount": 0.0}) == (Decimal("0.004462"),) * 2
    assert rules.hostpay_amounts({**SWAP, "from_currency": "usdt", "from_amount": 52.38}) == (Decimal("52.38"),) * 2
    assert caplog.records == []


@pytest.mark.parametrize("exchange_amount", [0.0047, 0.003])
def test_exchange_amount_far_from_the_payment_is_logged(caplog, exchange_amount):
    with caplog.at_level(logging.WARNING):
        assert rules.hostpay_amounts({**SWAP, "from_amount": exchange_amount})[1] == Decimal(repr(exchange_amount))
    assert "exchange asks" in caplog.text


def test_payout_keys():
    body = b'{"user_id": 1}'
    assert rules.instant_payout_key({"payment_id": " 507 "}, body) == "np:507"
    assert rules.instant_payout_key({}, body) == "legacy:" + hashlib.sha256(body).hexdigest()
    assert rules.estimate_payout_key({"payout_key": "batch:b1"}, "token") == "batch:b1"
    assert rules.estimate_payout_key({}, "tok") == rules.legacy_payout_key(b"tok")
    with pytest.raises(errors.BadRequest):
        rules.estimate_payout_key({"payout_key": "np:" + "9" * 98}, "token")


def test_unique_ids_look_like_legacys():
    drawn = {rules.new_unique_id() for _ in range(200)}
    assert len(drawn) == 200 and all(re.fullmatch(r"[A-Z0-9]{16}", unique_id) for unique_id in drawn)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
