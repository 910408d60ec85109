"""GCAccumulator's business rules: turn a threshold-mode payment into a pending USD credit (spec §4.7, §8.1)."""
from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from telepay_shared import errors
from telepay_shared.db import Database

PENDING = "pending"
USD_STEP = Decimal("0.00000001")  # scale of accumulated_amount_usdt and payment_fee_usd
MAX_PAYMENT_USD = Decimal("99999999.99")  # payment_amount_usd is NUMERIC(10,2)
MAX_OUTCOME = Decimal("1E12")  # nowpayments_outcome_amount is DECIMAL(30,18)
BIGINT_MAX, INTEGER_MAX = 2**63 - 1, 2**31 - 1
_INTEGER_TEXT = re.compile(r"-?\d{1,19}")
REQUIRED_FIELDS = ("user_id", "client_id", "wallet_address", "payout_currency", "payout_network",
                   "payment_amount_usd", "nowpayments_payment_id")


@dataclass(frozen=True)
class Credit:
    """One payout_accumulation row, in the column order of INSERT_CREDIT."""

    client_id: str
    user_id: int
    subscription_id: int | None
    payment_amount_usd: Decimal
    payment_timestamp: datetime | None
    accumulated_amount_usdt: Decimal
    payment_fee_usd: Decimal
    client_wallet_address: str
    client_payout_currency: str
    client_payout_network: str
    nowpayments_payment_id: str
    nowpayments_pay_address: str | None
    nowpayments_outcome_amount: Decimal | None


# The unique key on nowpayments_payment_id (migration 0002) turns a redelivery into "no row" (defect 21).
INSERT_CREDIT = """
INSERT INTO payout_accumulation (
    client_id, user_id, subscription_id, payment_amount_usd, payment_currency, payment_timestamp,
    accumulated_amount_usdt, payment_fee_usd, conversion_status, is_paid_out, client_wallet_address,
    client_payout_currency, client_payout_network, nowpayments_payment_id, nowpayments_pay_address,
    nowpayments_outcome_amount)
VALUES (%s, %s, %s, %s, 'usd', COALESCE(%s::timestamp, LOCALTIMESTAMP), %s, %s, 'pending', FALSE,
        %s, %s, %s, %s, %s, %s)
ON CONFLICT (nowpayments_payment_id) DO NOTHING
RETURNING id, accumulated_amount_usdt, conversion_status
"""
EXISTING_CREDIT = """
SELECT id, accumulated_amount_usdt, conversion_status FROM payout_accumulation WHERE nowpayments_payment_id = %s
"""


def credit_for(body: dict, fee_percent: Decimal) -> Credit:
    """Validate GCWebhook1's threshold payment (spec §5) and compute the post-fee credit.

    The fee is stored beside the credit (payment_fee_usd) so that the micro-batch can keep the
    same share of the ETH in the host wallet (defect 14).
    """
    amount = _amount(body, "payment_amount_usd", required=True)
    if not 0 < amount <= MAX_PAYMENT_USD:
        raise errors.BadRequest(f"payment_amount_usd must be in (0, {MAX_PAYMENT_USD}]", field="payment_amount_usd")
    outcome = _amount(body, "nowpayments_outcome_amount", required=False)
    if outcome is not None and not 0 <= outcome < MAX_OUTCOME:
        raise errors.BadRequest("nowpayments_outcome_amount is out of range", field="nowpayments_outcome_amount")
    credited = (amount * (1 - fee_percent / 100)).quantize(USD_STEP, ROUND_HALF_EVEN)
    return Credit(
        client_id=str(_integer(body, "client_id", -10**13 + 1, 10**14 - 1)),  # VARCHAR(14) channel id
        user_id=_integer(body, "user_id", -BIGINT_MAX, BIGINT_MAX),
        subscription_id=_integer(body, "subscription_id", -INTEGER_MAX, INTEGER_MAX, required=False),
        payment_amount_usd=amount,
        payment_timestamp=_timestamp(body, "payment_timestamp"),
        accumulated_amount_usdt=credited,
        payment_fee_usd=(amount - credited).quantize(USD_STEP, ROUND_HALF_EVEN),
        client_wallet_address=_text(body, "wallet_address", 200),
        client_payout_currency=_text(body, "payout_currency", 10),
        client_payout_network=_text(body, "payout_network", 50),
        nowpayments_payment_id=_payment_id(body),
        nowpayments_pay_address=_text(body, "nowpayments_pay_address", 255, required=False),
        nowpayments_outcome_amount=outcome,
    )


def record_credit(database: Database, credit: Credit) -> tuple[dict, bool]:
    """Insert the credit once per NowPayments payment; returns (row, created) — a redelivery finds the first row."""
    with database.transaction() as tx:
        row = tx.fetchone(INSERT_CREDIT, astuple(credit))
        if row is not None:
            return row, True
        return tx.fetchone(EXISTING_CREDIT, (credit.nowpayments_payment_id,)), False


def answer(row: dict, created: bool) -> dict:
    """The legacy success body (accumulated_eth is, as in legacy, the credited USD)."""
    message = ("Payment accumulated successfully (micro-batch pending)" if created
               else "Payment already accumulated (redelivery ignored)")
    return {"status": "success", "message": message, "accumulation_id": row["id"],
            "accumulated_eth": str(row["accumulated_amount_usdt"]), "conversion_status": row["conversion_status"]}


def _payment_id(body: dict) -> str:
    """The NowPayments payment id (number or text): the credit's idempotency key."""
    value = body.get("nowpayments_payment_id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _text({"nowpayments_payment_id": value}, "nowpayments_payment_id", 50)


def _text(body: dict, name: str, max_length: int, required: bool = True) -> str | None:
    """A non-blank string field that fits its column."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise errors.BadRequest(f"{name} must be a non-empty string", field=name)
    if len(value.strip()) > max_length:
        raise errors.BadRequest(f"{name} is longer than {max_length} characters", field=name)
    return value.strip()


def _integer(body: dict, name: str, low: int, high: int, required: bool = True) -> int | None:
    """An integer field (JSON number or digit string) within [low, high]."""
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise errors.BadRequest(f"{name} must be an integer in [{low}, {high}]", field=name)
    return value


def _amount(body: dict, name: str, required: bool) -> Decimal | None:
    """A finite decimal amount given as a JSON number or a numeric string (never through float)."""
    value = body.get(name)
    if value is None and not required:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
            raise InvalidOperation
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise errors.BadRequest(f"{name} must be a decimal number", field=name) from None
    if not amount.is_finite():
        raise errors.BadRequest(f"{name} must be finite", field=name)
    return amount


def _timestamp(body: dict, name: str) -> datetime | None:
    """An ISO-8601 time; zone-aware values become naive UTC like the TIMESTAMP column (absent: now)."""
    value = body.get(name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise errors.BadRequest(f"{name} must be an ISO-8601 date and time", field=name) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment
