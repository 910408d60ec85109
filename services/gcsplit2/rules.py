"""GCSplit2's business rule: quote a payout swap with ChangeNOW and answer GCSplit1 (spec §4.5)."""
from __future__ import annotations

from decimal import Decimal

from telepay_shared import errors
from telepay_shared.changenow import ChangeNowClient

# ChangeNOW legs of the pipeline: ETH (instant) or USDT (threshold), both on Ethereum (spec §8.7).
SWAP_NETWORK = "eth"


def quote(request: dict, changenow: ChangeNowClient) -> dict:
    """Ask ChangeNOW what the payout swap yields; return the T5 fields for GCSplit1.

    A non-positive amount is refused outright: legacy sent it to ChangeNOW, which rejected it, and
    retried forever inside the request (defect 18).
    """
    amount = Decimal(repr(request["adjusted_amount"]))  # the f64 on the wire, digit for digit
    if amount <= 0:
        raise errors.BadRequest(f"adjusted_amount must be positive, got {amount}", field="adjusted_amount")
    estimate = changenow.estimate(
        from_currency=request["swap_currency"],
        to_currency=request["payout_currency"],
        from_amount=amount,
        from_network=SWAP_NETWORK,
        to_network=request["payout_network"],
    )
    return {
        **{name: request[name] for name in (
            "user_id", "closed_channel_id", "wallet_address", "payout_currency", "payout_network",
            "swap_currency", "payout_mode", "actual_eth_amount")},
        "from_amount": float(estimate.from_amount),
        "to_amount_eth_post_fee": float(estimate.to_amount),
        "deposit_fee": float(estimate.deposit_fee),
        "withdrawal_fee": float(estimate.withdrawal_fee),
        "payout_key": request.get("payout_key"),
    }
