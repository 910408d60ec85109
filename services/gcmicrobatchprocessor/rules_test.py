"""The micro-batch money rules on their own: the fee-free swap amount and the USDT distribution."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gcmicrobatchprocessor.rules import distribute_usdt, fee_free_eth, swap_amount_eth

CENT = Decimal("0.01")
amounts = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("100000"), places=8)


def credit(net: str, fee: str | None, eth: str | None, gross: str = "0", credit_id: int = 1) -> dict:
    return {"id": credit_id, "accumulated_amount_usdt": Decimal(net),
            "payment_fee_usd": None if fee is None else Decimal(fee), "payment_amount_usd": Decimal(gross),
            "nowpayments_outcome_amount": None if eth is None else Decimal(eth)}


def test_fee_free_eth_leaves_the_platform_fee_share_of_the_eth():
    assert fee_free_eth(credit("29.10", "0.90", "0.01")) == Decimal("0.0097")


def test_fee_share_uses_the_unrounded_gross_not_the_cent_rounded_payment():
    # 12.3456789 USD at 3 %: payment_amount_usd stored 12.35, but credit + fee is the real gross.
    eth = fee_free_eth(credit("11.97530853", "0.37037037", "0.004115226", gross="12.35"))
    # Within 1E-11 ETH; the fee / cent-rounded payment ratio would be 4E-8 off.
    assert abs(eth - Decimal("0.004115226") * Decimal("0.97")) < Decimal("1E-11")


def test_legacy_row_without_fee_derives_it_from_the_payment_amount():
    assert fee_free_eth(credit("29.10", None, "0.01", gross="30.00")) == Decimal("0.0097")


@pytest.mark.parametrize("eth", [None, "0"])
def test_credit_without_eth_has_no_fee_free_eth(eth):
    assert fee_free_eth(credit("29.10", "0.90", eth)) is None


def test_swap_amount_rounds_down_to_eight_places_and_prices_missing_eth():
    credits = [credit("9.70", "0.30", "0.00333333", credit_id=1), credit("19.40", "0.60", None, credit_id=2)]
    assert swap_amount_eth(credits[:1]) == Decimal("0.00323333")  # 0.0032333301 rounded down, never up
    assert swap_amount_eth(credits, eth_per_usd=Decimal("0.0003")) == Decimal("0.00905333")
    with pytest.raises(ValueError):
        swap_amount_eth(credits)


def test_distribution_gives_the_remainder_to_the_last_credit():
    assert distribute_usdt([Decimal(1)] * 3, Decimal("10.000001")) == [
        Decimal("3.333333"), Decimal("3.333333"), Decimal("3.333335")]


@given(st.lists(amounts, min_size=1, max_size=30), amounts.map(lambda a: a.quantize(Decimal("1E-6"))))
def test_distribution_adds_up_exactly_and_is_proportional(weights, received):
    shares = distribute_usdt(weights, received)
    assert sum(shares) == received
    # Whole USDT base units: any sum of shares, a payout batch, is an amount the wallet can send.
    assert all(share >= 0 and share == share.quantize(Decimal("1E-6")) for share in shares)
    total = sum(weights)
    for weight, share in zip(weights[:-1], shares):
        assert 0 <= received * weight / total - share < Decimal("1E-6")


def test_shares_of_a_soak_conversion_add_up_to_sendable_batches():
    """Regression (tools/dev soak): 52.3400646 USDT shared at 8 places made batch totals like 27.1882755
    that GCHostPay3 refused (6 decimals); shares are whole base units of what reached the wallet."""
    shares = distribute_usdt([Decimal("14.0121"), Decimal("13.1"), Decimal("24.7")], Decimal("52.340064"))
    assert sum(shares) == Decimal("52.340064")
    assert all(share == share.quantize(Decimal("1E-6")) for share in shares)
    assert sum(shares[:2]) == sum(shares[:2]).quantize(Decimal("1E-6"))


@pytest.mark.parametrize("weights", [[], [Decimal(0)], [Decimal(5), Decimal(-1)]])
def test_distribution_refuses_weights_it_cannot_share_by(weights):
    with pytest.raises(ValueError):
        distribute_usdt(weights, Decimal(1))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
