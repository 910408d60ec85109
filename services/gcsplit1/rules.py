"""GCSplit1's business rules: payout keys, the platform fee, the market value and the payout records
(spec §4.4, §8.1, §8.3, §8.4).

Every payout is keyed once (services/README.md): the payout key ("np:<payment_id>",
"batch:<batch_id>", or "legacy:<sha256>" of what a legacy sender delivered) names the single
split_payout_request row, whose 16-character unique_id then keys the exchange and the transfer.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import string
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from telepay_shared import errors, web
from telepay_shared.db import Transaction

log = logging.getLogger(__name__)

INSTANT, THRESHOLD = "instant", "threshold"
SWAP_CURRENCY = {INSTANT: "eth"}  # any other mode pays from the host wallet's USDT (legacy)
THRESHOLD_SWAP_CURRENCY = "usdt"
SWAP_NETWORK = "eth"  # both host-wallet legs, ETH and ERC-20 USDT, are on Ethereum (spec §8.7)
BATCH_USER_ID = 0  # threshold payouts belong to a channel, not to a paying user
UNIQUE_ID_ALPHABET = string.ascii_uppercase + string.digits
UNIQUE_ID_LENGTH = 16
UNIQUE_ID_ATTEMPTS = 5
MAX_PAYOUT_KEY = 100  # split_payout_request.idempotency_key VARCHAR(100)
# split_payout_request.closed_channel_id is VARCHAR(14); a longer id would also be cut silently
# by the fix16 token field (defect 33), so it is refused before anything is sent.
MAX_CHANNEL_ID = 14
IDEMPOTENCY_CONSTRAINT = "split_payout_request_idempotency_key_key"
DISCREPANCY_WARNING = Decimal("0.10")
TARGET_FIELDS = ("wallet_address", "payout_currency", "payout_network")


# ---------------------------------------------------------------- amounts


def token_amount(value: float) -> Decimal:
    """A token's f64 amount as the Decimal with the same shortest digits."""
    return Decimal(repr(float(value)))


def positive(amount: Decimal, field: str) -> Decimal:
    """The amount when it is a positive number; else BadRequest (legacy swapped 0 forever: defect 18)."""
    if not amount.is_finite() or amount <= 0:
        raise errors.BadRequest(f"{field} must be positive, got {amount}", field=field)
    return amount


# The payout tables hold amounts as NUMERIC(20,8): the amount swapped and sent must be one they
# record exactly, else the ledger differs from the chain by the dust (rounded down: never overpay).
PAYOUT_STEP = Decimal("1E-8")


def fee_deducted(amount: Decimal, fee_percent: Decimal) -> Decimal:
    """What remains of an amount once the platform fee (TP_FLAT_FEE percent) is kept (spec §8.1)."""
    return (amount * (1 - fee_percent / 100)).quantize(PAYOUT_STEP, rounding=ROUND_DOWN)


def pure_market_value(from_amount: Decimal, to_amount: Decimal, deposit_fee: Decimal,
                      withdrawal_fee: Decimal) -> Decimal:
    """The estimate's payout before ChangeNOW's two fees, recorded but never paid (spec §8.4)."""
    swapped = from_amount - deposit_fee
    if swapped <= 0:
        return to_amount
    return from_amount * (to_amount + withdrawal_fee) / swapped


def hostpay_amounts(swap: dict) -> tuple[Decimal, Decimal]:
    """T8's (payment amount, amount to send): the exchange's fromAmount is what is sent (spec §8.3)."""
    exchange_amount = positive(token_amount(swap["from_amount"]), "from_amount")
    if swap["from_currency"].strip().lower() != SWAP_CURRENCY[INSTANT]:
        return exchange_amount, exchange_amount
    received = token_amount(swap["actual_eth_amount"])
    if received <= 0:
        return exchange_amount, exchange_amount
    if exchange_amount > received or abs(received - exchange_amount) / received > DISCREPANCY_WARNING:
        log.warning("exchange asks %s ETH for a payment of %s ETH", exchange_amount, received,
                    extra={"unique_id": swap["unique_id"], "cn_api_id": swap["cn_api_id"]})
    return received, exchange_amount


# ---------------------------------------------------------------- keys


def checked_payout_key(key: str) -> str:
    """The payout key, refused when it cannot be stored as the idempotency key."""
    if len(key) > MAX_PAYOUT_KEY:
        raise errors.BadRequest(f"payout key longer than {MAX_PAYOUT_KEY} characters", field="payout_key")
    return key


def legacy_payout_key(delivered: bytes | str) -> str:
    """The key of a payout whose legacy sender named no payment: the hash of what it delivered."""
    data = delivered.encode() if isinstance(delivered, str) else delivered
    return "legacy:" + hashlib.sha256(data).hexdigest()


def instant_payout_key(payment: dict, body: bytes) -> str:
    """T3's payout key: the NowPayments payment when the sender names it, else the signed body's hash."""
    if "payment_id" not in payment:
        return legacy_payout_key(body)
    payment_id = web.require_fields(payment, "payment_id")[0].strip()
    return checked_payout_key(f"np:{payment_id}")


def estimate_payout_key(estimate: dict, token: str) -> str:
    """T5's payout key: the trailer GCSplit2 echoed, else (a legacy GCSplit2) the token's hash."""
    if estimate.get("payout_key") is None:
        return legacy_payout_key(token)
    return checked_payout_key(estimate["payout_key"])


def new_unique_id() -> str:
    """A fresh random 16-character payout id (A-Z, 0-9), as legacy assigned them."""
    return "".join(secrets.choice(UNIQUE_ID_ALPHABET) for _ in range(UNIQUE_ID_LENGTH))


# ---------------------------------------------------------------- outgoing hops


def payout_target(fields: dict) -> dict:
    """The client's wallet, currency and network, trimmed (currency and network lowercased) and required."""
    wallet, currency, network = web.require_fields(fields, *TARGET_FIELDS)
    return {"wallet_address": wallet.strip(), "payout_currency": currency.strip().lower(),
            "payout_network": network.strip().lower()}


def channel_text(closed_channel_id: int | str) -> str:
    """The closed channel id as the text the split tables and fix16 fields carry."""
    text = str(closed_channel_id).strip()
    if not text or len(text) > MAX_CHANNEL_ID:
        raise errors.BadRequest(f"closed channel id must be 1 to {MAX_CHANNEL_ID} characters",
                                field="closed_channel_id")
    return text


def instant_estimate_request(payment: dict, fee_percent: Decimal, payout_key: str) -> dict:
    """T4 for a T3 payment: the outcome ETH less the platform fee, quoted ETH -> client currency.

    A mode other than instant (never sent by GCWebhook1) keeps legacy's rule: the USD price less
    the fee, paid from the host wallet's USDT.
    """
    mode = payment["payout_mode"].strip().lower() or INSTANT
    received = token_amount(payment["actual_eth_amount"])
    if received < 0 or (mode == INSTANT and not received):  # a missing NowPayments outcome arrives as 0
        raise errors.BadRequest(f"actual_eth_amount must be positive, got {received}", field="actual_eth_amount")
    base = received if mode == INSTANT else token_amount(payment["subscription_price"])
    amount = positive(fee_deducted(base, fee_percent), "adjusted_amount")
    return {
        "user_id": payment["user_id"],
        "closed_channel_id": channel_text(payment["closed_channel_id"]),
        **payout_target(payment),
        "adjusted_amount": float(amount),
        "swap_currency": SWAP_CURRENCY.get(mode, THRESHOLD_SWAP_CURRENCY),
        "payout_mode": mode,
        "actual_eth_amount": payment["actual_eth_amount"],
        "payout_key": payout_key,
    }


def batch_estimate_request(batch: dict) -> dict:
    """T4 for a T9 threshold batch: the client's USDT balance, quoted USDT -> client currency, no fee."""
    batch_id, client_id, total = web.require_fields(batch, "batch_id", "client_id", "total_amount_usdt")
    try:
        amount = positive(Decimal(total.strip()), "amount_usdt")
    except InvalidOperation:
        raise errors.BadRequest("amount_usdt is not a decimal number", field="amount_usdt") from None
    return {
        "user_id": BATCH_USER_ID,
        "closed_channel_id": channel_text(client_id),
        **payout_target(batch),
        "adjusted_amount": float(amount),
        "swap_currency": THRESHOLD_SWAP_CURRENCY,
        "payout_mode": THRESHOLD,
        "actual_eth_amount": 0.0,  # legacy ignores the batch's ETH: the USDT is already in the wallet
        "payout_key": checked_payout_key(f"batch:{batch_id.strip()}"),
    }


def swap_request(unique_id: str, estimate: dict) -> dict:
    """T6 for GCSplit3: create the exchange for exactly the estimate's fromAmount."""
    return {
        "unique_id": unique_id,
        **{name: estimate[name] for name in ("user_id", "closed_channel_id", *TARGET_FIELDS,
                                             "swap_currency", "payout_mode", "actual_eth_amount")},
        "eth_amount": estimate["from_amount"],
    }


def hostpay_order(swap: dict) -> dict:
    """T8 for GCHostPay1: pay the exchange's deposit address its fromAmount."""
    received, to_send = hostpay_amounts(swap)
    return {
        **{name: swap[name] for name in ("unique_id", "cn_api_id", "from_currency", "from_network",
                                         "payin_address")},
        "actual_eth_amount": float(received),
        "estimated_eth_amount": float(to_send),
    }


# ---------------------------------------------------------------- records


def payout_request_id(tx: Transaction, payout_key: str) -> str | None:
    """The unique_id already assigned to this payout key, if any."""
    return tx.fetchvalue("SELECT unique_id FROM split_payout_request WHERE idempotency_key = %s", (payout_key,))


def record_payout_request(tx: Transaction, estimate: dict, payout_key: str) -> tuple[str, bool]:
    """The payout's unique_id, inserting its split_payout_request on first sight; (unique_id, created)."""
    existing = payout_request_id(tx, payout_key)
    if existing is not None:
        return existing, False
    row = _payout_request_row(estimate, payout_key)
    for _ in range(UNIQUE_ID_ATTEMPTS):
        unique_id = new_unique_id()
        try:
            with tx.savepoint():
                tx.execute(_INSERT_PAYOUT_REQUEST, (unique_id, *row))
            return unique_id, True
        except errors.DuplicateRecord as duplicate:
            if duplicate.constraint == IDEMPOTENCY_CONSTRAINT:
                # A concurrent delivery of the same payout committed first: its unique_id wins.
                return payout_request_id(tx, payout_key), False
    raise errors.TransientError("could not draw an unused unique_id")


def _payout_request_row(estimate: dict, payout_key: str) -> tuple:
    """split_payout_request's values after unique_id, currencies and networks uppercased as legacy."""
    from_amount = positive(token_amount(estimate["from_amount"]), "from_amount")
    market_value = pure_market_value(from_amount, *(token_amount(estimate[name]) for name in (
        "to_amount_eth_post_fee", "deposit_fee", "withdrawal_fee")))
    return (
        estimate["user_id"], channel_text(estimate["closed_channel_id"]), estimate["swap_currency"].upper(),
        estimate["payout_currency"].upper(), SWAP_NETWORK.upper(), estimate["payout_network"].upper(),
        from_amount, market_value, estimate["wallet_address"], token_amount(estimate["actual_eth_amount"]),
        payout_key,
    )


_INSERT_PAYOUT_REQUEST = """
    INSERT INTO split_payout_request (
        unique_id, user_id, closed_channel_id, from_currency, to_currency, from_network, to_network,
        from_amount, to_amount, client_wallet_address, refund_address, flow, type, actual_eth_amount,
        idempotency_key)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '', 'standard', 'direct', %s, %s)
"""


def record_exchange(tx: Transaction, swap: dict) -> tuple[str, bool]:
    """The exchange recorded for the payout, the first one winning; (cn_api_id, created).

    A redelivered T6 makes GCSplit3 create a second exchange for the same unique_id; only the
    first is ever paid. An exchange already bound to another payout is refused (Conflict).
    """
    try:
        with tx.savepoint():
            tx.execute(_INSERT_EXCHANGE, _exchange_row(swap))
        return swap["cn_api_id"], True
    except errors.DuplicateRecord:
        pass
    owner = tx.fetchvalue("SELECT unique_id FROM split_payout_que WHERE cn_api_id = %s", (swap["cn_api_id"],))
    if owner is not None and owner != swap["unique_id"]:
        raise errors.Conflict(f"exchange {swap['cn_api_id']} already belongs to payout {owner}",
                              unique_id=swap["unique_id"], cn_api_id=swap["cn_api_id"])
    recorded = tx.fetchvalue("SELECT cn_api_id FROM split_payout_que WHERE unique_id = %s", (swap["unique_id"],))
    if recorded is None:  # the conflicting row vanished between the insert and the look-up
        raise errors.TransientError("split_payout_que changed during the insert; retry")
    return recorded, False


def _exchange_row(swap: dict) -> tuple:
    """split_payout_que's values, currencies and networks uppercased as legacy."""
    return (
        swap["unique_id"], swap["cn_api_id"], swap["user_id"], channel_text(swap["closed_channel_id"]),
        *(swap[name].upper() for name in ("from_currency", "to_currency", "from_network", "to_network")),
        token_amount(swap["from_amount"]), token_amount(swap["to_amount"]),
        swap["payin_address"], swap["payout_address"], swap["refund_address"], swap["flow"], swap["type_"],
        token_amount(swap["actual_eth_amount"]),
    )


_INSERT_EXCHANGE = """
    INSERT INTO split_payout_que (
        unique_id, cn_api_id, user_id, closed_channel_id, from_currency, to_currency, from_network,
        to_network, from_amount, to_amount, payin_address, payout_address, refund_address, flow, type,
        actual_eth_amount)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
