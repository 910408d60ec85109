"""GCSplit3's business rules: create the ChangeNOW exchange a payout travels through (spec §4.6, §7.1)."""
from __future__ import annotations

from decimal import Decimal

from telepay_shared import errors
from telepay_shared.changenow import ChangeNowClient, Exchange
from telepay_shared.config import Config

# Both host-wallet legs, ETH and ERC-20 USDT, are on Ethereum (spec §8.7).
SWAP_NETWORK = "eth"
# T18: an accumulation's ETH is converted into USDT held for threshold payouts.
ACCUMULATOR_FROM, ACCUMULATOR_TO = "eth", "usdt"
SWAP_CREATED_TARGET = "GCACCUMULATOR_SWAP_CREATED_URL"


class SwapCreatedTargetMissing(errors.TelePayError, status=501, code="not_configured"):
    """T19 has nowhere to go: answered before any exchange exists (legacy created one, then failed)."""


def swap_amount(value: float, field: str) -> Decimal:
    """The token's f64 amount, digit for digit, refused unless positive (ChangeNOW would refuse it)."""
    amount = Decimal(repr(value))
    if amount <= 0:
        raise errors.BadRequest(f"{field} must be positive, got {amount}", field=field)
    return amount


def create_payout_exchange(request: dict, changenow: ChangeNowClient) -> Exchange:
    """Create the exchange paying the client: ETH (instant) or USDT (threshold) into their currency."""
    return changenow.create_exchange(
        from_currency=request["swap_currency"],
        to_currency=request["payout_currency"],
        from_amount=swap_amount(request["eth_amount"], "eth_amount"),
        address=request["wallet_address"],
        from_network=SWAP_NETWORK,
        to_network=request["payout_network"],
        user_id=str(request["user_id"]),
    )


def swap_response(request: dict, exchange: Exchange) -> dict:
    """T7 for GCSplit1: the exchange as ChangeNOW describes it (a null refundAddress is "": defect 29)."""
    return {
        **{name: request[name] for name in ("unique_id", "user_id", "closed_channel_id", "actual_eth_amount")},
        "cn_api_id": exchange.exchange_id,
        "from_currency": exchange.from_currency,
        "to_currency": exchange.to_currency,
        "from_network": exchange.from_network,
        "to_network": exchange.to_network,
        "from_amount": float(exchange.from_amount),
        "to_amount": float(exchange.to_amount),
        "payin_address": exchange.payin_address,
        "payout_address": exchange.payout_address,
        "refund_address": exchange.refund_address or "",
        "flow": exchange.flow,
        "type_": exchange.exchange_type,
    }


def swap_created_target(config: Config) -> str:
    """GCAccumulator's URL for T19; refused (501) when the deployment has none."""
    url = config.get(SWAP_CREATED_TARGET)
    if not url:
        raise SwapCreatedTargetMissing(f"{SWAP_CREATED_TARGET} is not configured; no exchange was created")
    return url


def create_accumulator_exchange(request: dict, changenow: ChangeNowClient) -> Exchange:
    """Create the ETH -> USDT exchange paying an accumulation's ETH into the USDT wallet."""
    return changenow.create_exchange(
        from_currency=ACCUMULATOR_FROM,
        to_currency=ACCUMULATOR_TO,
        from_amount=swap_amount(request["eth_amount"], "eth_amount"),
        address=request["usdt_wallet_address"],
        from_network=SWAP_NETWORK,
        to_network=SWAP_NETWORK,
        user_id=f"accumulation_{request['accumulation_id']}",
    )


def accumulator_swap_created(request: dict, exchange: Exchange) -> dict:
    """T19 for GCAccumulator: where to send the ETH and what USDT it should bring."""
    return {
        "accumulation_id": request["accumulation_id"],
        "client_id": request["client_id"],
        "cn_api_id": exchange.exchange_id,
        "from_amount": float(exchange.from_amount),
        "to_amount": float(exchange.to_amount),
        "payin_address": exchange.payin_address,
        "payout_address": exchange.payout_address,
    }
