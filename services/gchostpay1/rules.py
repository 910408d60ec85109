"""GCHostPay1's business rules: payout orders, the exchange-status gate before the transfer, and
what follows a completed transfer (spec §4.10)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from decimal import Decimal

from telepay_shared import errors, hops, tokens
from telepay_shared.alerts import Alerter
from telepay_shared.changenow import ExchangeStatus
from telepay_shared.db import Transaction

log = logging.getLogger(__name__)

# What a payout is, read from its unique_id the way legacy did (spec §4.10).
INSTANT, THRESHOLD, BATCH = "instant", "threshold", "batch"
ACCUMULATION_PREFIX, BATCH_PREFIX = "acc_", "batch_"
BATCH_PAYOUT_KEY_PREFIX = "batch:"  # split_payout_request.idempotency_key of a threshold batch payout
# The fields of one transfer to an exchange's deposit address, as T10/T11/T12 carry them.
TRANSFER_FIELDS = tuple(f.name for f in hops.STATUS_CHECK.fields)

# What an exchange's status before the transfer asks of us (defect 25).
PAY, WAIT, ALREADY_FUNDED, REVIEW = "pay", "wait", "already_funded", "review"
AWAITING_DEPOSIT, NOT_READY = "waiting", "new"
DEPOSIT_RECEIVED_STATUSES = frozenset({"confirming", "exchanging", "sending", "finished"})

# What a batch conversion's status after the transfer asks of us.
CALLBACK, RETRY = "callback", "retry"

REVIEW_STATUS = "failed_pending_review"
REVIEW_EVENT = "hostpay_payout_failed_pending_review"
_CN_API_ID_COLUMN = 16  # failed_transactions.cn_api_id is VARCHAR(16); legacy cut longer ids too
_REASON_RANK = ("expired", "future", "bad_signature", "wrong_length", "malformed", "unknown_hop")


# ---------------------------------------------------------------------------- payout orders

def _split_order(fields: dict) -> dict:
    """GCSplit1's order (T8): the exchange's fromAmount (the second amount) is what is sent."""
    return {**_transfer(fields, from_amount=fields["estimated_eth_amount"]), "context": INSTANT}


def _accumulator_order(fields: dict) -> dict:
    """GCAccumulator's order (T20, never sent by legacy): unique_id acc_<accumulation_id>."""
    return {**_transfer(fields, unique_id=f"{ACCUMULATION_PREFIX}{fields['accumulation_id']}"), "context": THRESHOLD}


def _microbatch_order(fields: dict) -> dict:
    """GCMicroBatchProcessor's order (T15): unique_id batch_<batch_conversion_id>."""
    return {**_transfer(fields, unique_id=f"{BATCH_PREFIX}{fields['batch_conversion_id']}"), "context": BATCH}


def _transfer(fields: dict, **overrides) -> dict:
    """The transfer fields of a decoded token, some taken from elsewhere."""
    return {name: overrides[name] if name in overrides else fields[name] for name in TRANSFER_FIELDS}


# Legacy's order of trial; the keys differ (T8: TPS, others: SUCCESS) and so do the layouts.
ORDER_HOPS = (
    (hops.HOSTPAY_ORDER, _split_order),
    (hops.ACCUMULATOR_HOSTPAY_ORDER, _accumulator_order),
    (hops.MICROBATCH_ORDER, _microbatch_order),
)


def decode_order(token, keys: dict, now: float) -> dict:
    """Decode a payout order (T8, T20 or T15) into transfer fields plus its context.

    When no hop accepts the token, the reason reported is the most telling one: a token whose
    signature verified but whose clock is off says more than the other hops' bad signatures.
    """
    rejected = {}
    for hop, to_order in ORDER_HOPS:
        try:
            fields = tokens.decode(hop, token, keys, now=now)
        except errors.TokenRejected as rejection:
            rejected[hop.name] = rejection.reason
            continue
        return payable(to_order(fields))
    reason = min(rejected.values(), key=_REASON_RANK.index)
    raise errors.TokenRejected(reason, f"not a payout order (T8, T20 or T15): {reason}", tried=rejected)


def payable(order: dict) -> dict:
    """Refuse an order no transfer can honour (legacy let GCHostPay3 fail on it for 24 h)."""
    amount = order["from_amount"]
    if not (math.isfinite(amount) and amount > 0):
        raise errors.BadRequest(f"from_amount must be positive, got {amount!r}", field="from_amount")
    if not order["payin_address"].strip():
        raise errors.BadRequest("payin_address is empty", field="payin_address")
    return order


def already_paid(tx: Transaction, unique_id: str) -> bool:
    """Whether GCHostPay3 recorded a successful transfer for this payout.

    A row that is not (yet) a success is GCHostPay3's own business: it committed the row before
    broadcasting and resumes that same transaction on redelivery, so the order may go on.
    """
    return tx.fetchvalue(
        "SELECT 1 FROM split_payout_hostpay WHERE unique_id = %s AND tx_status = 'success'", (unique_id,)
    ) is not None


# ---------------------------------------------------------------------------- contexts

def payout_context(unique_id: str) -> str:
    """Which flow a payout belongs to, from its unique_id prefix."""
    if unique_id.startswith(BATCH_PREFIX):
        return BATCH
    if unique_id.startswith(ACCUMULATION_PREFIX):
        return THRESHOLD
    return INSTANT


def execution_context(unique_id: str) -> str:
    """The T12 context GCHostPay3 expects: legacy wire values, so batch conversions travel as "instant"."""
    return THRESHOLD if payout_context(unique_id) == THRESHOLD else INSTANT


def status_check(order: dict) -> dict:
    """The T10 fields asking GCHostPay2 for the status of the order's exchange."""
    return _transfer(order)


def execution_order(verified: dict) -> dict:
    """The T12 fields for GCHostPay3 from a verified status report (T11)."""
    return {**_transfer(verified), "context": execution_context(verified["unique_id"])}


# ---------------------------------------------------------------------------- the status gate

def deposit_decision(status: str) -> str:
    """What the exchange's status before the transfer asks for: pay, wait, nothing (funded) or review.

    Legacy answered 400 to everything but "waiting" and Cloud Tasks retried it for 24 h (defect 25).
    Any status not known to precede or follow a deposit (failed, refunded, expired, verifying, or one
    ChangeNOW adds later) means the exchange will not take this transfer: a person must look.
    """
    if status == AWAITING_DEPOSIT:
        return PAY
    if status == NOT_READY:
        return WAIT
    if status in DEPOSIT_RECEIVED_STATUSES:
        return ALREADY_FUNDED
    return REVIEW


# ---------------------------------------------------------------------------- completed transfers

def complete_payout_batch(tx: Transaction, unique_id: str, tx_hash: str, tx_status: str) -> str | None:
    """Mark the threshold payout batch this transfer paid as completed; return its batch_id, if any.

    Legacy left every payout_batches row at 'processing' (defect 27). The batch is found through
    the payout key GCSplit1 stored with the payout request.
    """
    payout_key = tx.fetchvalue("SELECT idempotency_key FROM split_payout_request WHERE unique_id = %s", (unique_id,))
    if not (payout_key or "").startswith(BATCH_PAYOUT_KEY_PREFIX):
        return None
    batch_id = payout_key.removeprefix(BATCH_PAYOUT_KEY_PREFIX)
    if tx_status != "success":
        log.error("transfer for payout batch %s reported %r, batch left open", batch_id, tx_status)
        return None
    updated = tx.execute(
        "UPDATE payout_batches SET status = 'completed', tx_hash = %s, tx_status = %s, completed_at = NOW()"
        " WHERE batch_id = %s AND status IS DISTINCT FROM 'completed'",
        (tx_hash, tx_status, batch_id),
    )
    if not updated and tx.fetchvalue("SELECT 1 FROM payout_batches WHERE batch_id = %s", (batch_id,)) is None:
        log.error("payout batch %s of payout %s does not exist", batch_id, unique_id)
    return batch_id


def conversion_step(exchange: ExchangeStatus | None, retry_count: int, max_retries: int) -> tuple[str, str | None]:
    """What a paid batch conversion's ChangeNOW state asks for: callback, retry or review (with its error code).

    `exchange` is None when ChangeNOW does not know the id. Legacy answered 500 once its three
    re-checks ran out, so Cloud Tasks looped for 24 h and then dropped the conversion.
    """
    if exchange is None:
        return REVIEW, "EXCHANGE_NOT_FOUND"
    if exchange.finished:
        return (CALLBACK, None) if exchange.amount_to > 0 else (REVIEW, "EXCHANGE_FINISHED_WITHOUT_AMOUNT")
    if exchange.in_progress:
        return (RETRY, None) if retry_count < max_retries else (REVIEW, "CALLBACK_RETRIES_EXHAUSTED")
    return REVIEW, status_error_code(exchange.status)


def swap_executed(unique_id: str, cn_api_id: str, tx_hash: str, exchange: ExchangeStatus) -> dict:
    """The T16 fields telling GCMicroBatchProcessor how much USDT the conversion yielded."""
    return {"batch_conversion_id": unique_id.removeprefix(BATCH_PREFIX), "cn_api_id": cn_api_id,
            "tx_hash": tx_hash, "actual_usdt_received": float(exchange.amount_to)}


def callback_retry(unique_id: str, cn_api_id: str, tx_hash: str, retry_count: int) -> dict:
    """The T17 fields of the next re-check of a batch conversion."""
    return {"unique_id": unique_id, "cn_api_id": cn_api_id, "tx_hash": tx_hash, "context": BATCH,
            "retry_count": retry_count}


# ---------------------------------------------------------------------------- review

@dataclass(frozen=True)
class Review:
    """A payout that cannot complete by itself, as failed_transactions records it."""

    unique_id: str
    cn_api_id: str
    context: str
    error_code: str
    error_message: str
    from_currency: str
    from_network: str
    from_amount: Decimal
    payin_address: str
    attempt_count: int
    details: dict = field(default_factory=dict)


def status_error_code(status: str) -> str:
    """failed_transactions.error_code for an exchange status, e.g. EXCHANGE_EXPIRED."""
    return f"EXCHANGE_{status.upper()}"[:50]


def rejected_exchange_review(verified: dict, status: str) -> Review:
    """The review of a transfer not made because the exchange will not take it (from T11)."""
    return Review(
        unique_id=verified["unique_id"], cn_api_id=verified["cn_api_id"],
        context=payout_context(verified["unique_id"]), error_code=status_error_code(status),
        error_message=f"ChangeNOW exchange is '{status}' before the transfer; nothing was sent",
        from_currency=verified["from_currency"], from_network=verified["from_network"],
        from_amount=Decimal(repr(verified["from_amount"])), payin_address=verified["payin_address"],
        attempt_count=0, details={"changenow_status": status},
    )


def conversion_review(unique_id: str, cn_api_id: str, tx_hash: str, exchange: ExchangeStatus | None,
                      error_code: str, checks: int) -> Review:
    """The review of a batch conversion that was paid but yields no USDT callback."""
    status = exchange.status if exchange else None
    return Review(
        unique_id=unique_id, cn_api_id=cn_api_id, context=BATCH, error_code=error_code,
        error_message=f"ETH sent in {tx_hash}, but after {checks} check(s) the ChangeNOW exchange is {status!r}",
        # Unknown to ChangeNOW: split_payout_hostpay (same unique_id) holds what was sent.
        from_currency=exchange.from_currency if exchange else "",
        from_network=exchange.from_network if exchange else "",
        from_amount=(exchange.amount_from or exchange.expected_amount_from or Decimal(0)) if exchange else Decimal(0),
        payin_address=exchange.payin_address if exchange else "",
        attempt_count=checks,
        details={"tx_hash": tx_hash, "changenow_status": status,
                 "amount_to": str(exchange.amount_to) if exchange else None},
    )


def record_for_review(tx: Transaction, review: Review) -> bool:
    """Record the payout in failed_transactions once per (unique_id, error_code); True when recorded now.

    The table has no unique key, so a transaction-scoped lock on the unique_id makes the check and
    the insert one step against concurrent redeliveries.
    """
    tx.advisory_lock(f"failed_transactions:{review.unique_id}")
    if tx.fetchvalue("SELECT 1 FROM failed_transactions WHERE unique_id = %s AND error_code = %s",
                     (review.unique_id, review.error_code)) is not None:
        return False
    tx.execute(
        "INSERT INTO failed_transactions (unique_id, cn_api_id, from_currency, from_network, from_amount,"
        " payin_address, context, error_code, error_message, last_error_details, attempt_count,"
        " last_attempt_timestamp, status)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, NOW(), %s)",
        (review.unique_id, review.cn_api_id[:_CN_API_ID_COLUMN], review.from_currency, review.from_network,
         review.from_amount, review.payin_address, review.context, review.error_code, review.error_message,
         json.dumps(review.details), review.attempt_count, REVIEW_STATUS),
    )
    return True


def alert(review: Review, alerter: Alerter) -> None:
    """Raise the alarm for a payout recorded for review: an ERROR log record and the operators' Slack."""
    record = {k: str(v) if isinstance(v, Decimal) else v for k, v in asdict(review).items()}
    alerter.alert(REVIEW_EVENT, f"payout {review.unique_id} needs review: {review.error_code}", **record)


def threshold_callback_unimplemented(unique_id: str) -> dict:
    """The answer for a threshold (acc_) callback: legacy never implemented one, and neither do we.

    200, so Cloud Tasks does not retry what can never succeed (legacy: 501, retried for 24 h).
    """
    log.error("no callback exists for threshold payout %s (legacy left it unimplemented)", unique_id,
              extra={"event_type": "hostpay_threshold_callback_unimplemented", "alert": True})
    return {"status": "not_implemented", "unique_id": unique_id,
            "message": "Threshold (acc_) payouts have no callback; nothing was sent"}
