"""np-webhook's business rules: a finished NowPayments payment becomes a paid subscription and a
validated-payment task for GCWebhook1 (spec §4.1, §8.8, defects 10, 19, 22)."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from telepay_shared import errors, hops, tokens, web

log = logging.getLogger(__name__)

FINISHED = "finished"
LEGACY_SUBSCRIPTION_DAYS = 30  # what legacy gave every new row, whatever the tier bought
USD_STEP = Decimal("0.00000001")  # nowpayments_outcome_amount_usd is DECIMAL(20,8)
USD_STABLECOINS = ("usd", "usdt", "usdc", "busd", "dai")
# NowPayments names a stablecoin on another chain by suffixing its network (usdttrc20, usdcsol, ...).
STABLECOIN_NETWORKS = ("", "erc20", "trc20", "bsc", "sol", "matic", "arb", "op", "base", "ton", "algo", "avaxc")
_ORDER_ID = re.compile(r"PGP-(-?\d+)\|(-?\d+)")
_LEGACY_ORDER_ID = re.compile(r"PGP-(\d+)-(\d+)(?:-.*)?")
_CORS_ORIGINS = re.compile(r"https://storage\.googleapis\.com|https://www\.paygateprime\.com|http://localhost(:\d+)?")


@dataclass(frozen=True)
class Payment:
    """The fields of a finished NowPayments payment the pipeline uses."""

    # NowPayments' own ids first, then the order id's user and channel.
    payment_id: int
    invoice_id: str | None
    order_id: str
    user_id: int
    open_channel_id: int
    pay_address: str | None
    raw_status: str
    pay_amount: Decimal | None
    pay_currency: str | None
    outcome_amount: Decimal | None
    outcome_currency: str | None
    price_amount: Decimal | None
    price_currency: str | None


class ChannelNotRegistered(errors.TransientError, code="channel_not_registered"):
    """The paid channel is missing from main_clients_database; NowPayments retries while it is registered."""


@dataclass(frozen=True)
class Channel:
    """A registered channel: where its private channel is and how its owner is paid."""

    closed_channel_id: str
    wallet_address: str | None
    payout_currency: str | None
    payout_network: str | None
    tiers: tuple[tuple[Decimal, int], ...]  # (price, days) of the channel's subscription tiers


# ---------------------------------------------------------------------------- the notification

def verify_signature(raw_body: bytes, signature: str | None, keys: dict) -> None:
    """Accept the body only when x-nowpayments-sig signs it (raw bytes or NowPayments' sorted-key form); else 403."""
    if not signature:
        raise errors.Forbidden("missing x-nowpayments-sig header")
    try:
        tokens.decode_signed_body(hops.NOWPAYMENTS_IPN, raw_body, signature, keys)
    except errors.TokenRejected:
        raise errors.Forbidden("x-nowpayments-sig does not match the notification") from None


def payment_status(notification: dict) -> str:
    """NowPayments' status of the payment, lowercased; a notification without one is malformed."""
    status = notification.get("payment_status")
    if not isinstance(status, str) or not status.strip():
        raise errors.BadRequest("missing payment_status", field="payment_status")
    return status.strip().lower()


def parse_order_id(order_id) -> tuple[int, int]:
    """(user_id, open_channel_id) of `PGP-<user>|<channel>`, or of the old `PGP-<user>-<channel>` (channel made negative)."""
    text = order_id.strip() if isinstance(order_id, str) else ""
    if match := _ORDER_ID.fullmatch(text):
        user_id, channel_id = int(match[1]), int(match[2])
    elif match := _LEGACY_ORDER_ID.fullmatch(text):
        user_id, channel_id = int(match[1]), -int(match[2])  # the old format lost the channel's sign
    else:
        raise errors.BadRequest("invalid order_id format", field="order_id")
    if user_id <= 0:
        raise errors.BadRequest("order_id names no Telegram user", field="order_id")
    return user_id, channel_id


def finished_payment(notification: dict) -> Payment:
    """The payment a finished notification reports; BadRequest names the first unusable field."""
    if not notification.get("order_id"):
        raise errors.BadRequest("Missing order_id", field="order_id")
    user_id, open_channel_id = parse_order_id(notification["order_id"])
    return Payment(
        payment_id=_positive_int(notification.get("payment_id"), "payment_id"),
        invoice_id=_text(notification.get("invoice_id")),
        order_id=notification["order_id"].strip(),
        user_id=user_id,
        open_channel_id=open_channel_id,
        pay_address=_text(notification.get("pay_address")),
        raw_status=notification["payment_status"],
        pay_amount=_amount(notification.get("pay_amount"), "pay_amount"),
        pay_currency=_text(notification.get("pay_currency")),
        outcome_amount=_amount(notification.get("outcome_amount"), "outcome_amount"),
        # Legacy: NowPayments omits outcome_currency when it equals pay_currency.
        outcome_currency=_text(notification.get("outcome_currency")) or _text(notification.get("pay_currency")),
        price_amount=_amount(notification.get("price_amount"), "price_amount"),
        price_currency=_text(notification.get("price_currency")),
    )


def _positive_int(value, name: str) -> int:
    """A positive integer given as a JSON number or digits."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not text.isdigit() or int(text) <= 0:
        raise errors.BadRequest(f"{name} must be a positive integer", field=name)
    return int(text)


def _amount(value, name: str) -> Decimal | None:
    """An optional non-negative amount given as a JSON number or text, digit for digit."""
    if value is None or value == "":
        return None
    try:
        amount = Decimal(str(value).strip())  # a bool reads "True": refused below
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or amount < 0:
        raise errors.BadRequest(f"{name} must be a non-negative number", field=name)
    return amount


def _text(value) -> str | None:
    """An optional text field (NowPayments sends ids as numbers or strings)."""
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    return str(value).strip() or None


# ---------------------------------------------------------------------------- the subscription

def registered_channel(tx, open_channel_id: int) -> Channel | None:
    """The registration of the public channel the customer paid for, or None."""
    row = tx.fetchone(
        "SELECT closed_channel_id, client_wallet_address, client_payout_currency::text AS payout_currency,"
        " client_payout_network::text AS payout_network, sub_1_price, sub_1_time, sub_2_price, sub_2_time,"
        " sub_3_price, sub_3_time FROM main_clients_database WHERE open_channel_id = %s",
        (str(open_channel_id),))
    if row is None or not row["closed_channel_id"]:
        return None
    tiers = tuple((row[f"sub_{n}_price"], row[f"sub_{n}_time"]) for n in (1, 2, 3)
                  if row[f"sub_{n}_price"] is not None and row[f"sub_{n}_time"])
    return Channel(row["closed_channel_id"], row["client_wallet_address"], row["payout_currency"],
                   row["payout_network"], tiers)


def paid_channel(tx, payment: Payment) -> Channel:
    """The channel the payment is for; unregistered is an ERROR the operator must fix while NowPayments retries."""
    channel = registered_channel(tx, payment.open_channel_id)
    if channel is None:
        log.error("payment for an unregistered channel", extra={"open_channel_id": payment.open_channel_id})
        raise ChannelNotRegistered(f"channel {payment.open_channel_id} is not registered")
    return channel


def tier_days(channel: Channel, price_amount: Decimal | None) -> int:
    """Days bought: those of the channel tier priced at price_amount, else legacy's 30 (defect 22)."""
    return next((days for price, days in channel.tiers if price == price_amount), LEGACY_SUBSCRIPTION_DAYS)


def record_payment(tx, payment: Payment, channel: Channel, now: datetime) -> bool:
    """Record a first delivery on the subscription row (renewal or new row); False for a repeat delivery.

    The processed_payments row is the payment's key: INSERT ... ON CONFLICT makes a concurrent or
    later repeat wait for, then see, the first one (defect 10), so the subscription is paid once.
    """
    first = tx.execute(
        "INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)"
        " ON CONFLICT (payment_id) DO NOTHING", (payment.payment_id, payment.user_id, int(channel.closed_channel_id)))
    if not first:
        return False
    row = tx.fetchone(
        "SELECT id, payment_status, expire_date, expire_time FROM private_channel_users_database"
        " WHERE user_id = %s AND private_channel_id = %s ORDER BY id DESC LIMIT 1 FOR UPDATE",
        (payment.user_id, channel.closed_channel_id))
    days = tier_days(channel, payment.price_amount)
    columns = _subscription_columns(payment, days, subscription_expiry(row, days, now), now)
    if row is None:
        columns.update(user_id=payment.user_id, private_channel_id=channel.closed_channel_id)
        tx.execute(f"INSERT INTO private_channel_users_database ({', '.join(columns)})"
                   f" VALUES ({', '.join(['%s'] * len(columns))})", tuple(columns.values()))
    else:
        tx.execute(f"UPDATE private_channel_users_database SET {', '.join(f'{c} = %s' for c in columns)}"
                   " WHERE id = %s", (*columns.values(), row["id"]))
    return True


def subscription_expiry(row: dict | None, days: int, now: datetime) -> datetime:
    """A paid subscription still running is extended; a lapsed, unpaid or new one runs from now (defect 22)."""
    current = None
    if row is not None and row["payment_status"] == "confirmed" and row["expire_date"] is not None:
        current = datetime.combine(row["expire_date"], row["expire_time"] or time())
    return max(current or now, now) + timedelta(days=days)


def _subscription_columns(payment: Payment, days: int, expiry: datetime, now: datetime) -> dict:
    """Column values of a paid subscription row, in legacy's formats ('HH:MM:SS', 'YYYY-MM-DD')."""
    columns = {
        "sub_time": days, '"timestamp"': _clock(now), "datestamp": _day(now.date()),
        "expire_time": _clock(expiry), "expire_date": _day(expiry.date()), "is_active": True,
        "payment_status": "confirmed", "nowpayments_payment_id": str(payment.payment_id),
        "nowpayments_invoice_id": payment.invoice_id, "nowpayments_order_id": payment.order_id,
        "nowpayments_pay_address": payment.pay_address, "nowpayments_payment_status": payment.raw_status,
        "nowpayments_pay_amount": payment.pay_amount, "nowpayments_pay_currency": payment.pay_currency,
        "nowpayments_outcome_amount": payment.outcome_amount, "nowpayments_price_amount": payment.price_amount,
        "nowpayments_price_currency": payment.price_currency,
        "nowpayments_outcome_currency": payment.outcome_currency, "nowpayments_updated_at": now,
        # Only a first delivery gets here, so a repeated IPN no longer moves the payment's creation time (defect 22).
        "nowpayments_created_at": now,
    }
    if payment.price_amount is not None:  # the price paid is what GCWebhook2 checks the amount against
        columns["sub_price"] = payment.price_amount
    return columns


def _clock(moment: datetime) -> str:
    """Legacy's time-of-day text."""
    return moment.strftime("%H:%M:%S")


def _day(day: date) -> str:
    """Legacy's date text."""
    return day.strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------- USD value and forwarding

def is_usd_stablecoin(currency: str) -> bool:
    """Whether one unit of the currency counts as one USD (legacy's list, on any NowPayments network)."""
    ticker = currency.lower()
    return any(ticker == coin + network for coin in USD_STABLECOINS for network in STABLECOIN_NETWORKS)


def outcome_usd(payment: Payment, prices) -> Decimal:
    """USD value of what the platform received: stablecoins 1:1, otherwise at the price source's rate."""
    if not payment.outcome_amount or not payment.outcome_currency:
        log.error("finished payment without an outcome amount or currency cannot be forwarded")
        raise errors.BadRequest("finished payment has no outcome_amount/outcome_currency", field="outcome_amount")
    if is_usd_stablecoin(payment.outcome_currency):
        usd = payment.outcome_amount
    else:
        usd = payment.outcome_amount * prices.usd_price(payment.outcome_currency)
    return usd.quantize(USD_STEP, ROUND_HALF_UP)


def claim_forwarding(tx, payment: Payment, channel: Channel) -> dict | None:
    """Lock the payment's processed_payments row; its subscription row, or None when GCWebhook1 already has it."""
    processed = tx.fetchvalue(
        "SELECT gcwebhook1_processed FROM processed_payments WHERE payment_id = %s FOR UPDATE", (payment.payment_id,))
    if processed:
        return None
    return tx.fetchone(
        "SELECT id, sub_time, sub_price FROM private_channel_users_database"
        " WHERE user_id = %s AND private_channel_id = %s ORDER BY id DESC LIMIT 1",
        (payment.user_id, channel.closed_channel_id))


def store_outcome_usd(tx, subscription: dict, payment: Payment, usd: Decimal) -> None:
    """Record the USD value on the subscription row, unless a later payment has taken that row over."""
    tx.execute("UPDATE private_channel_users_database SET nowpayments_outcome_amount_usd = %s"
               " WHERE id = %s AND nowpayments_payment_id = %s", (usd, subscription["id"], str(payment.payment_id)))


def validated_payment(payment: Payment, channel: Channel, subscription: dict, usd: Decimal) -> dict:
    """The task body GCWebhook1's /process-validated-payment reads (spec §5; amounts are f64 on the wire)."""
    return {
        "user_id": payment.user_id,
        "closed_channel_id": channel.closed_channel_id,
        "wallet_address": channel.wallet_address,
        "payout_currency": channel.payout_currency,
        "payout_network": channel.payout_network,
        "subscription_time_days": subscription["sub_time"],
        "subscription_price": str(subscription["sub_price"]),
        "outcome_amount_usd": float(usd),
        "nowpayments_payment_id": payment.payment_id,
        "nowpayments_pay_address": payment.pay_address,
        "nowpayments_outcome_amount": float(payment.outcome_amount),
        "payment_status": FINISHED,
    }


def signed_json(body: dict, secret: str) -> tuple[bytes, dict]:
    """The body's bytes and the X-Webhook-Signature header (hex HMAC-SHA256) that authenticates them."""
    raw = json.dumps(body).encode()
    return raw, web.sign_body(raw, secret)


# ---------------------------------------------------------------------------- landing page

def landing_status(tx, order_id: str) -> dict:
    """What the landing page shows for an order: confirmed, failed or pending (legacy's answer)."""
    user_id, open_channel_id = parse_order_id(order_id)
    channel = registered_channel(tx, open_channel_id)
    if channel is None:
        raise errors.NotFound("Channel not found")
    row = tx.fetchone(
        "SELECT payment_status FROM private_channel_users_database"
        " WHERE user_id = %s AND private_channel_id = %s ORDER BY id DESC LIMIT 1",
        (user_id, channel.closed_channel_id))
    status = (row or {}).get("payment_status") or "pending"
    # Legacy also answered the NowPayments payment_id; the page never used it and anyone who knows
    # the (guessable) order id could read it, so it is no longer disclosed (defect 6).
    data = {"order_id": order_id, "payment_status": status, "confirmed": status == "confirmed"}
    if status == "confirmed":
        return {"status": "confirmed", "message": "Payment confirmed - redirecting to Telegram", "data": data}
    if status == "failed":
        return {"status": "failed", "message": "Payment failed", "data": data}
    return {"status": "pending", "message": "Payment pending - waiting for confirmation", "data": data}


def status_signature(order_id: str, key: str) -> str:
    """The `sig` a signed landing link carries: hex HMAC-SHA256 of the order id."""
    return hmac.new(key.encode(), order_id.encode(), hashlib.sha256).hexdigest()


def check_status_access(order_id: str, sig: str | None, access: str, key: str) -> None:
    """Refuse a status read the link does not entitle (defect 6: order ids are guessable).

    In 'signed' mode only a link with the right `sig` may read; in 'order_id' mode (links made by the
    legacy bot, which signs nothing) a missing sig is let through, but a wrong one never is."""
    if sig is None and access == "order_id":
        return
    if sig is None:
        raise errors.Forbidden("this status needs the signed link (sig parameter)", field="sig")
    if not hmac.compare_digest(sig.strip().lower(), status_signature(order_id, key)):
        raise errors.Forbidden("the link's signature does not match the order", field="sig")


def cors_allowed(origin: str | None) -> bool:
    """Whether the landing page's origin may read the status API (legacy's list)."""
    return bool(origin) and _CORS_ORIGINS.fullmatch(origin) is not None
