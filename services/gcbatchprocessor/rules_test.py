"""Which balances are due: the grouping and threshold rule on its own."""
from __future__ import annotations

from decimal import Decimal

import pytest

from services.gcbatchprocessor.rules import Payout, payouts_due


def credit(credit_id: int, usdt: str, client="-100", wallet="0xa", currency="link", network="eth") -> dict:
    return {"id": credit_id, "client_id": client, "client_wallet_address": wallet, "client_payout_currency": currency,
            "client_payout_network": network, "accumulated_amount_usdt": Decimal(usdt)}


def test_a_balance_exactly_at_the_threshold_is_due_with_exactly_its_credits():
    due = payouts_due([credit(1, "20.5"), credit(2, "29.5")], {"-100": Decimal("50.00")})
    assert due == [Payout("-100", "0xa", "link", "eth", Decimal("50.0"), (1, 2))]


def test_each_destination_is_summed_and_judged_apart():
    credits = [credit(1, "40"), credit(2, "40", wallet="0xb"), credit(3, "40", currency="usdt"),
               credit(4, "40", network="bsc"), credit(5, "20")]
    assert [p.credit_ids for p in payouts_due(credits, {"-100": Decimal(50)})] == [(1, 5)]


@pytest.mark.parametrize("thresholds", [{}, {"-100": None}])
def test_client_without_threshold_is_never_due(thresholds):
    assert payouts_due([credit(1, "1000")], thresholds) == []


def test_an_empty_balance_is_never_due_even_with_a_zero_threshold():
    assert payouts_due([credit(1, "0")], {"-100": Decimal(0)}) == []
    assert payouts_due([credit(1, "0.00000001")], {"-100": Decimal(0)})[0].total_usdt == Decimal("0.00000001")


def test_below_threshold_by_a_hundred_millionth_is_not_due():
    assert payouts_due([credit(1, "49.99999999")], {"-100": Decimal(50)}) == []


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
