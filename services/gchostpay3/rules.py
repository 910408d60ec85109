"""GCHostPay3's rules: what an execute-payment order asks for, exactly, and what each failure means.

Spec §4.12, §7.5, §8.3. Everything here is pure: no node, no database, no clock of its own.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import requests
from eth_utils import is_address, is_checksum_address, is_hex_address, to_checksum_address

from telepay_shared import errors

NETWORK = "eth"  # every host-wallet transfer is on Ethereum mainnet (spec §8.7)
ETH = "eth"
ETH_DECIMALS = 18
ERC20_CURRENCIES = ("usdt", "usdc", "dai")  # what legacy could send besides ETH (spec §4.12)
ETH_TRANSFER_GAS = 21_000
# Legacy's fixed limit for an ERC-20 transfer; USDT, USDC and DAI transfers use 35-65k.
ERC20_TRANSFER_GAS = 100_000
# Legacy's priority tip when the node gives no fee history (spec §7.5).
FALLBACK_PRIORITY_FEE_WEI = 2 * 10**9
UNIQUE_ID_MAX = 64  # split_payout_hostpay.unique_id / failed_transactions.unique_id are VARCHAR(64)


class InvalidOrder(errors.BadRequest):
    """The order itself cannot be carried out (bad amount, currency, network or address): 400, recorded."""

    def __init__(self, error_code: str, message: str, **details):
        super().__init__(message, error_code=error_code, **details)
        self.error_code = error_code


@dataclass(frozen=True)
class Asset:
    """A currency the host wallet can send: native ETH (no contract) or an ERC-20."""

    symbol: str  # lower case, as the tokens carry it
    decimals: int
    contract: str | None = None  # checksummed ERC-20 address; None for ETH

    @property
    def gas_limit(self) -> int:
        """Gas limit of one transfer of this asset."""
        return ERC20_TRANSFER_GAS if self.contract else ETH_TRANSFER_GAS


@dataclass(frozen=True)
class Order:
    """One T12 (or T13 retry) order: pay `amount` of `currency` to the exchange's deposit address."""

    unique_id: str
    cn_api_id: str
    currency: str
    network: str
    amount: Decimal
    payin_address: str
    context: str
    attempt: int  # 1 for a T12; the T13's attempt_count on a retry
    first_attempt_at: int
    last_error_code: str | None
    issued_at: int  # the token's timestamp: the 2 h window of this delivery starts here


@dataclass(frozen=True)
class Transfer:
    """A validated order in base units, ready to be signed."""

    asset: Asset
    payin: str  # checksummed
    units: int  # wei, or the token's base units


@dataclass(frozen=True)
class Fees:
    """EIP-1559 fee caps in wei."""

    max_fee: int
    priority_fee: int


@dataclass(frozen=True)
class Failure:
    """A classified failure: legacy's error code and whether trying again can help."""

    code: str
    retryable: bool


def order_from_token(fields: dict) -> Order:
    """The order a decoded T12/T13 carries; the f64 amount is taken digit for digit."""
    return Order(
        unique_id=fields["unique_id"], cn_api_id=fields["cn_api_id"], currency=fields["from_currency"].lower(),
        network=fields["from_network"].lower(), amount=Decimal(repr(fields["from_amount"])),
        payin_address=fields["payin_address"], context=fields["context"], attempt=fields["attempt_count"],
        first_attempt_at=fields["first_attempt_at"], last_error_code=fields["error_code"] or None,
        issued_at=fields["timestamp"],
    )


def assets_from_config(config) -> dict[str, Asset]:
    """ETH plus the ERC-20s whose contract and decimals the configuration names (mainnet by default)."""
    assets = {ETH: Asset(ETH, ETH_DECIMALS)}
    for symbol in ERC20_CURRENCIES:
        prefix = f"ERC20_{symbol.upper()}"
        contract = config[f"{prefix}_CONTRACT"]
        if not is_address(contract):
            raise errors.ConfigError(f"{prefix}_CONTRACT is not an Ethereum address")
        assets[symbol] = Asset(symbol, config[f"{prefix}_DECIMALS"], to_checksum_address(contract))
    return assets


def transfer_for(order: Order, assets: dict[str, Asset]) -> Transfer:
    """Check the order and express it in base units; InvalidOrder says why it cannot be paid."""
    if not order.unique_id or len(order.unique_id) > UNIQUE_ID_MAX:
        raise InvalidOrder("INVALID_UNIQUE_ID", f"unique_id must have 1 to {UNIQUE_ID_MAX} characters")
    if not order.amount.is_finite() or order.amount <= 0:
        raise InvalidOrder("INVALID_AMOUNT", f"from_amount must be positive, got {order.amount}", field="from_amount")
    if order.network != NETWORK:
        raise InvalidOrder("UNSUPPORTED_NETWORK", f"the host wallet sends on {NETWORK} only, not {order.network!r}")
    asset = assets.get(order.currency)
    if asset is None:
        raise InvalidOrder("UNSUPPORTED_CURRENCY",
                           f"the host wallet sends {', '.join(sorted(assets))}, not {order.currency!r}")
    return Transfer(asset, payin_address(order.payin_address), base_units(order.amount, asset.decimals))


def base_units(amount: Decimal, decimals: int) -> int:
    """amount × 10^decimals exactly; an amount finer than the currency's unit is refused (defect 34).

    Legacy computed int(amount * 10**decimals) in floating point and dropped whatever did not fit
    silently. Refusing is the safe choice: a short payment fails the exchange just as surely, and a
    human should see why.
    """
    scaled = amount.scaleb(decimals)
    if scaled != scaled.to_integral_value():
        raise InvalidOrder("INVALID_AMOUNT", f"{amount} has more than the {decimals} decimals of the currency",
                           field="from_amount")
    return int(scaled)


def payin_address(text: str) -> str:
    """The deposit address, checksummed; a malformed one or a wrong mixed-case checksum is refused.

    (eth_utils.is_address accepts any mixed case; a mixed-case address is a checksum claim, and a
    failed claim means a mistyped address.)
    """
    digits = text[2:] if isinstance(text, str) and text[:2] in ("0x", "0X") else ""
    mixed_case = digits.lower() != digits != digits.upper()
    if not is_hex_address(text) or (mixed_case and not is_checksum_address(text)):
        raise InvalidOrder("INVALID_ADDRESS", "payin_address is not a valid Ethereum address", field="payin_address")
    return to_checksum_address(text)


def eip1559_fees(base_fee: int | None, median_tip: int | None, gas_price: int | None) -> Fees:
    """Fee caps as legacy (spec §7.5): 2 × next base fee + the median tip, else the gas price with a 2 gwei tip.

    The tip never exceeds the cap (legacy's 2 gwei fallback tip exceeded a cheap gas price, which
    makes the transaction invalid).
    """
    if base_fee is not None:
        tip = FALLBACK_PRIORITY_FEE_WEI if median_tip is None else median_tip
        max_fee = 2 * base_fee + tip
    elif gas_price is not None:
        max_fee, tip = gas_price, FALLBACK_PRIORITY_FEE_WEI
    else:
        raise ValueError("no fee data from the node")
    return Fees(max_fee, min(tip, max_fee))


def next_nonce(chain_pending: int, highest_recorded: int | None) -> int:
    """The nonce of a new transfer: past every nonce the node knows and every one we ever recorded (defect 13)."""
    return chain_pending if highest_recorded is None else max(chain_pending, highest_recorded + 1)


def eth_needed(transfer: Transfer, fees: Fees) -> int:
    """Wei the wallet must hold for the transfer: the value (ETH only) plus the worst-case gas."""
    gas = transfer.asset.gas_limit * fees.max_fee
    return gas if transfer.asset.contract else transfer.units + gas


def review_due(order: Order, now: float, review_after_s: int) -> bool:
    """Whether this delivery's token is so old that the next one may be refused as expired.

    A redelivery carries the same token, whose 2 h window (spec §2.4) runs from `issued_at`; once it
    closes the task is rejected and the payout would vanish. Past `review_after_s` a payout that
    still cannot complete is recorded for review instead.
    """
    return now - order.issued_at >= review_after_s


# Legacy's error classifier (spec §7.5), kept as data in failure_classes.json: rows of [code,
# retryable, pattern], first match wins, on the lower-cased "<type>: <message>".
# Retryability differs where legacy's flag was never used and is wrong for a payment service: an
# unreachable node (RPC_CONNECTION_FAILED) is an outage to wait out, not a configuration fault, and an
# unknown failure before broadcasting is retried within the attempt limit rather than given up at once.
_CLASSIFIER: tuple[tuple[str, bool, re.Pattern], ...] = tuple(
    (code, retryable, re.compile(pattern))
    for code, retryable, pattern in json.loads(Path(__file__).with_name("failure_classes.json").read_text()))
UNKNOWN = Failure("UNKNOWN_ERROR", True)


def classify(exc: BaseException) -> Failure:
    """Legacy's error code for a failure talking to the node, and whether to try again."""
    if isinstance(exc, requests.Timeout):
        return Failure("NETWORK_TIMEOUT", True)
    if isinstance(exc, requests.ConnectionError):
        return Failure("RPC_CONNECTION_FAILED", True)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        return Failure("RATE_LIMIT_EXCEEDED" if status == 429 else "RPC_CONNECTION_FAILED", status == 429 or status >= 500)
    text = f"{type(exc).__name__}: {exc}".lower()
    for code, retryable, pattern in _CLASSIFIER:
        if pattern.search(text):
            return Failure(code, retryable)
    return UNKNOWN


def nonce_already_used(exc: BaseException) -> bool:
    """Whether the node refused a broadcast because the nonce was consumed (geth: "nonce too low")."""
    text = str(exc).lower()
    match = re.search(r"expected (\d+), but got (\d+)", text)  # eth-tester's wording
    return "nonce too low" in text or (match is not None and int(match[2]) < int(match[1]))


def already_known(exc: BaseException) -> bool:
    """Whether the node refused a broadcast only because it already holds that very transaction."""
    text = str(exc).lower()
    return "already known" in text or "known transaction" in text or "already imported" in text


def retry_token_fields(order: Order, failure: Failure) -> dict:
    """T13 fields for the next attempt (the hop's encoder adds one to attempt_count)."""
    return {
        "unique_id": order.unique_id, "cn_api_id": order.cn_api_id, "from_currency": order.currency,
        "from_network": order.network, "from_amount": float(order.amount), "payin_address": order.payin_address,
        "context": order.context, "attempt_count": order.attempt, "first_attempt_at": order.first_attempt_at,
        "error_code": failure.code,
    }


def completion_token_fields(order: Order, tx_hash: str, gas_used: int, block_number: int) -> dict:
    """T14 fields reporting a confirmed transfer to GCHostPay1."""
    return {"unique_id": order.unique_id, "cn_api_id": order.cn_api_id, "tx_hash": tx_hash, "tx_status": "success",
            "gas_used": gas_used, "block_number": block_number}


def endpoint(base_url: str, path: str) -> str:
    """A service's base URL with a path appended (exactly one slash between them)."""
    return base_url.rstrip("/") + path
