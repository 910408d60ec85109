"""GCWebhook1's business rules: check a validated payment whole, route its payout, queue its invite
(spec §4.2, §8.2, defects 8 and 20)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from telepay_shared import errors, hops, tokens, web

FINISHED = "finished"
INSTANT, THRESHOLD = "instant", "threshold"
MAX_SUBSCRIPTION_DAYS = 0xFFFF  # the invite token carries the days as u16
_REQUIRED = ("user_id", "closed_channel_id", "wallet_address", "payout_currency", "payout_network",
             "subscription_time_days", "subscription_price", "outcome_amount_usd", "nowpayments_payment_id",
             "nowpayments_outcome_amount")


@dataclass(frozen=True)
class ValidatedPayment:
    """A finished payment as np-webhook forwards it, every field checked."""

    payment_id: int
    user_id: int
    closed_channel_id: int
    wallet_address: str
    payout_currency: str
    payout_network: str
    subscription_days: int
    subscription_price: str  # the declared price as text, the way the invite token carries it
    declared_price: Decimal
    outcome_usd: Decimal  # what the platform received, in USD
    outcome_amount: Decimal  # what the platform received, in the outcome currency (ETH)
    pay_address: str | None


def is_finished(body: dict) -> bool:
    """Legacy's second defence: only NowPayments' "finished" status moves money (a status not in text is malformed)."""
    status = body.get("payment_status")
    if status is not None and not isinstance(status, str):
        raise errors.BadRequest("payment_status must be a string", field="payment_status")
    return (status or "").strip().lower() == FINISHED


def validated_payment(body: dict) -> ValidatedPayment:
    """The payment in np-webhook's task body; BadRequest before anything is queued (defect 8)."""
    web.require_fields(body, *_REQUIRED)
    price = _positive_decimal(body["subscription_price"], "subscription_price")
    return ValidatedPayment(
        payment_id=_integer(body["nowpayments_payment_id"], "nowpayments_payment_id", minimum=1),
        user_id=_integer(body["user_id"], "user_id", minimum=1),
        closed_channel_id=_integer(body["closed_channel_id"], "closed_channel_id"),
        wallet_address=_text(body["wallet_address"], "wallet_address"),
        payout_currency=_text(body["payout_currency"], "payout_currency"),
        payout_network=_text(body["payout_network"], "payout_network"),
        subscription_days=_integer(body["subscription_time_days"], "subscription_time_days", minimum=1,
                                   maximum=MAX_SUBSCRIPTION_DAYS),
        subscription_price=body["subscription_price"] if isinstance(body["subscription_price"], str) else str(price),
        declared_price=price,
        outcome_usd=_positive_decimal(body["outcome_amount_usd"], "outcome_amount_usd"),
        outcome_amount=_positive_decimal(body["nowpayments_outcome_amount"], "nowpayments_outcome_amount"),
        pay_address=body.get("nowpayments_pay_address") or None,
    )


def _integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer sent as a JSON number or as text (np-webhook sends the channel id as text)."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    number = int(text) if text.lstrip("-").isdigit() else None
    if number is None or (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise errors.BadRequest(f"{name} must be an integer in range", field=name)
    return number


def _positive_decimal(value, name: str) -> Decimal:
    """A positive amount sent as a JSON number or as text."""
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, bool) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or amount <= 0:
        raise errors.BadRequest(f"{name} must be a positive number", field=name)
    return amount


def _text(value, name: str) -> str:
    """A non-empty text field."""
    if not isinstance(value, str):
        raise errors.BadRequest(f"{name} must be text", field=name)
    return value.strip()


# ---------------------------------------------------------------------------- the tasks

def invite_task(payment: ValidatedPayment, keys: dict) -> dict:
    """GCWebhook2's task body: the T2 invite token and the payment it was paid by."""
    token = tokens.encode(hops.INVITE, {
        "user_id": payment.user_id, "closed_channel_id": payment.closed_channel_id,
        "subscription_time_days": payment.subscription_days, "subscription_price": payment.subscription_price,
        "wallet_address": payment.wallet_address, "payout_currency": payment.payout_currency,
        "payout_network": payment.payout_network,
    }, keys)
    return {"token": token, "payment_id": payment.payment_id}


def instant_payout(payment: ValidatedPayment, keys: dict) -> tuple[bytes, dict]:
    """The T3 body for GCSplit1 and its X-Webhook-Signature; sub_price is the USD received (legacy's naming)."""
    signed = tokens.encode(hops.INSTANT_SPLIT, {
        "user_id": payment.user_id, "closed_channel_id": payment.closed_channel_id,
        "wallet_address": payment.wallet_address, "payout_currency": payment.payout_currency,
        "payout_network": payment.payout_network, "subscription_price": payment.outcome_usd,
        "actual_eth_amount": payment.outcome_amount, "payout_mode": INSTANT, "payment_id": str(payment.payment_id),
    }, keys)
    return signed["body"].encode(), {hops.SIGNATURE_HEADERS[hops.INSTANT_SPLIT.name]: signed["signature"]}


def threshold_credit(payment: ValidatedPayment, subscription_id: int, now: datetime, secret: str) -> tuple[bytes, dict]:
    """GCAccumulator's JSON body (spec §5) and its X-Webhook-Signature (defect 1: the receiver checks it)."""
    raw = json.dumps({
        "user_id": payment.user_id, "client_id": payment.closed_channel_id,
        "wallet_address": payment.wallet_address, "payout_currency": payment.payout_currency,
        "payout_network": payment.payout_network, "payment_amount_usd": float(payment.outcome_usd),
        "subscription_id": subscription_id, "payment_timestamp": now.isoformat(),
        "nowpayments_payment_id": payment.payment_id, "nowpayments_pay_address": payment.pay_address,
        "nowpayments_outcome_amount": float(payment.outcome_amount),
    }).encode()
    return raw, web.sign_body(raw, secret)


# ---------------------------------------------------------------------------- the database

def claim_payment(tx, payment: ValidatedPayment) -> bool:
    """Lock the payment's processed_payments row (creating it if np-webhook did not); False when already routed."""
    tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)"
               " ON CONFLICT (payment_id) DO NOTHING", (payment.payment_id, payment.user_id, payment.closed_channel_id))
    return not tx.fetchvalue("SELECT gcwebhook1_processed FROM processed_payments WHERE payment_id = %s FOR UPDATE",
                             (payment.payment_id,))


def payout_mode(tx, closed_channel_id: int) -> str:
    """The channel owner's payout strategy: threshold when registered so, instant otherwise (legacy)."""
    strategy = tx.fetchvalue("SELECT payout_strategy FROM main_clients_database WHERE closed_channel_id = %s"
                             " ORDER BY open_channel_id LIMIT 1", (str(closed_channel_id),))
    return THRESHOLD if (strategy or "").strip().lower() == THRESHOLD else INSTANT


def subscription_id(tx, payment: ValidatedPayment) -> int:
    """Id of the customer's newest subscription row (0 when there is none, as legacy)."""
    return tx.fetchvalue("SELECT id FROM private_channel_users_database WHERE user_id = %s"
                         " AND private_channel_id = %s ORDER BY id DESC LIMIT 1",
                         (payment.user_id, str(payment.closed_channel_id))) or 0


def mark_routed(tx, payment_id: int) -> None:
    """Record that the payout and the invite are queued, so a redelivery queues nothing more."""
    tx.execute("UPDATE processed_payments SET gcwebhook1_processed = TRUE, gcwebhook1_processed_at = now(),"
               " updated_at = now() WHERE payment_id = %s", (payment_id,))


def record_success_url(tx, subscription: dict, now: datetime) -> None:
    """Legacy T1 path: set the subscription on every row of (user, channel), or insert one."""
    price = _positive_decimal(subscription["subscription_price"], "subscription_price")
    expiry = now + timedelta(days=subscription["subscription_time_days"])
    owner = (subscription["user_id"], str(subscription["closed_channel_id"]))
    tx.advisory_lock(f"subscription:{owner[0]}:{owner[1]}")  # two concurrent first visits insert one row
    values = (subscription["subscription_time_days"], price, now.strftime("%H:%M:%S"), now.strftime("%Y-%m-%d"),
              expiry.strftime("%H:%M:%S"), expiry.strftime("%Y-%m-%d"))
    updated = tx.execute('UPDATE private_channel_users_database SET sub_time = %s, sub_price = %s, "timestamp" = %s,'
                         " datestamp = %s, expire_time = %s, expire_date = %s, is_active = TRUE"
                         " WHERE user_id = %s AND private_channel_id = %s", (*values, *owner))
    if not updated:
        tx.execute('INSERT INTO private_channel_users_database (sub_time, sub_price, "timestamp", datestamp,'
                   " expire_time, expire_date, is_active, user_id, private_channel_id)"
                   " VALUES (%s, %s, %s, %s, %s, %s, TRUE, %s, %s)", (*values, *owner))
