"""GCWebhook2's business rules: one single-use Telegram invite per confirmed payment (spec §4.3, §8.6)."""
from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation

from telepay_shared import errors

from services.gcwebhook2.telegram import TelegramBot, TelegramRejected

log = logging.getLogger(__name__)

FINISHED = "finished"
INVITE_LIFETIME_S = 3600  # the link expires after an hour and admits one member (spec §8.8)
INVITE_MESSAGE = "✅ You've been granted access!\nHere is your one-time invite link:\n{link}"


class PaymentNotConfirmed(errors.TransientError, code="payment_not_confirmed"):
    """The IPN has not reached the subscription row yet, or NowPayments has not finished the payment."""


class ChannelRefusesInvites(errors.TransientError, code="channel_refuses_invites"):
    """Telegram refuses invite links for the channel (bot not an admin there): fixable while Cloud Tasks retries."""


class PaymentBelowTolerance(errors.PermanentError, code="payment_below_tolerance"):
    """What the customer paid is too far below the declared price for an invite."""


def payment_id(value) -> int:
    """The NowPayments payment id beside the token (a JSON number or digits)."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not text.isdigit() or int(text) <= 0:
        raise errors.BadRequest("payment_id must be a positive integer", field="payment_id")
    return int(text)


def claim_invite(tx, payment_id: int, invite: dict) -> dict:
    """Lock the payment's processed_payments row (the invite's key); a payment of someone else is refused.

    Two concurrent deliveries serialise here, so only one of them can send the invite.
    """
    tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)"
               " ON CONFLICT (payment_id) DO NOTHING", (payment_id, invite["user_id"], invite["closed_channel_id"]))
    state = tx.fetchone("SELECT user_id, channel_id, telegram_invite_sent, telegram_invite_sent_at"
                        " FROM processed_payments WHERE payment_id = %s FOR UPDATE", (payment_id,))
    # payment_id travels outside the signed token: it must belong to the subscriber the token names.
    if (state["user_id"], state["channel_id"]) != (invite["user_id"], invite["closed_channel_id"]):
        raise errors.Conflict("payment_id belongs to another subscription", field="payment_id")
    return state


def check_payment(tx, invite: dict, min_tolerance: Decimal, fallback_tolerance: Decimal) -> None:
    """The subscription row shows a finished payment worth the declared price (spec §8.6), else raise."""
    row = tx.fetchone(
        "SELECT nowpayments_payment_id, nowpayments_payment_status, nowpayments_outcome_amount_usd,"
        " nowpayments_price_amount FROM private_channel_users_database WHERE user_id = %s"
        " AND private_channel_id = %s ORDER BY id DESC LIMIT 1",
        (invite["user_id"], str(invite["closed_channel_id"])))
    if row is None or not row["nowpayments_payment_id"]:
        raise PaymentNotConfirmed("IPN callback not yet processed")
    if (row["nowpayments_payment_status"] or "").lower() != FINISHED:
        raise PaymentNotConfirmed(f"payment pending: NowPayments status {row['nowpayments_payment_status']!r}")
    expected = declared_price(invite["subscription_price"])
    if not payment_sufficient(row["nowpayments_outcome_amount_usd"], row["nowpayments_price_amount"], expected,
                              min_tolerance, fallback_tolerance):
        log.error("payment below tolerance: no invite", extra={
            "declared_price": str(expected), "outcome_usd": str(row["nowpayments_outcome_amount_usd"]),
            "price_amount": str(row["nowpayments_price_amount"])})
        raise PaymentBelowTolerance(f"payment too low for the declared price {expected}")


def declared_price(text: str) -> Decimal:
    """The subscription price the invite token declares."""
    try:
        price = Decimal(text.strip())
    except InvalidOperation:
        price = None
    if price is None or not price.is_finite() or price <= 0:
        raise errors.BadRequest("the invite token's subscription_price is not a price", field="subscription_price")
    return price


def payment_sufficient(outcome_usd: Decimal | None, price_amount: Decimal | None, expected: Decimal,
                       min_tolerance: Decimal, fallback_tolerance: Decimal) -> bool:
    """USD received >= expected x min; without a USD value, invoiced price >= expected x fallback."""
    if outcome_usd is not None:
        return outcome_usd >= expected * min_tolerance
    if price_amount is not None:
        return price_amount >= expected * fallback_tolerance
    return False


def deliver_invite(tx, bot: TelegramBot, payment_id: int, invite: dict, now: float) -> TelegramRejected | None:
    """Create the single-use link and send it; returns Telegram's refusal to message the customer, if any.

    A refused message keeps the link in processed_payments (not marked sent) for support to hand over.
    """
    try:
        link = bot.create_invite_link(invite["closed_channel_id"], int(now) + INVITE_LIFETIME_S)
    except TelegramRejected as refusal:
        log.error("Telegram refuses invite links for the channel: %s", refusal.description)
        raise ChannelRefusesInvites(refusal.message) from None
    try:
        bot.send_message(invite["user_id"], INVITE_MESSAGE.format(link=link))
    except TelegramRejected as refusal:
        log.error("invite created but the customer cannot be messaged: %s", refusal.description)
        tx.execute("UPDATE processed_payments SET telegram_invite_link = %s, updated_at = now() WHERE payment_id = %s",
                   (link, payment_id))
        return refusal
    tx.execute("UPDATE processed_payments SET telegram_invite_sent = TRUE, telegram_invite_sent_at = now(),"
               " telegram_invite_link = %s, updated_at = now() WHERE payment_id = %s", (link, payment_id))
    return None
