"""GCMicroBatchProcessor's rules: pool pending threshold credits into one ETH->USDT swap, then share
the USDT received among them (spec §4.8, §8.5, §9.2).

A batch moves through batch_conversions.conversion_status, and every step is resumable:
  'pending'   rows claimed (marked 'swapping' with the batch id), no exchange yet;
  'swapping'  exchange created (cn_api_id); processing_started_at is set once T15 is enqueued;
  'completed' the USDT received is distributed;
  'failed'    ChangeNOW refused the exchange; the rows went back to 'pending' for a later batch.
A run that dies between steps leaves the batch where the next run picks it up (unfinished_batches).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Callable

from telepay_shared import errors
from telepay_shared.changenow import ChangeNowClient
from telepay_shared.db import Database, Transaction

log = logging.getLogger(__name__)

CLAIM_LOCK = "gcmicrobatchprocessor:claim-pending-credits"
SWAP_FROM, SWAP_TO, SWAP_NETWORK = "eth", "usdt", "eth"  # both legs on Ethereum (spec §8.7)
AMOUNT_STEP = Decimal("0.00000001")  # 8 places: exact in a T15 f64 and in NUMERIC(20,8)
# ERC-20 USDT on Ethereum (both legs, spec §8.7) has 6 decimals: the wallet can hold no finer amount, so
# the USDT received and every credit's share of it are kept in whole base units. Shares at 8 places
# summed to batch totals no transfer can send (gchostpay3 refused them as INVALID_AMOUNT: the soak found it).
USDT_STEP = Decimal("0.000001")
MAX_USDT = Decimal("1E12")  # batch_conversions.actual_usdt_received is NUMERIC(20,8)
MAX_TX_HASH = 100  # payout_accumulation.conversion_tx_hash is VARCHAR(100)
CLAIMED, SWAPPING, COMPLETED, FAILED = "pending", "swapping", "completed", "failed"

PENDING_CREDITS = """
SELECT id, accumulated_amount_usdt FROM payout_accumulation
WHERE conversion_status = 'pending' ORDER BY id FOR UPDATE
"""
INSERT_BATCH = """
INSERT INTO batch_conversions (batch_conversion_id, total_eth_usd, threshold_at_creation, conversion_status)
VALUES (%s, %s, %s, 'pending')
"""
# Exactly the rows summed, by id: a credit that arrived after the SELECT stays pending (defect 17).
CLAIM_CREDITS = """
UPDATE payout_accumulation SET conversion_status = 'swapping', batch_conversion_id = %s, updated_at = NOW()
WHERE id = ANY(%s)
"""
UNFINISHED_BATCHES = """
SELECT batch_conversion_id FROM batch_conversions
WHERE conversion_status = 'pending' OR (conversion_status = 'swapping' AND processing_started_at IS NULL)
ORDER BY id
"""
# SKIP LOCKED: a batch another run is working on is left to that run.
LOCK_UNFINISHED_BATCH = """
SELECT batch_conversion_id, conversion_status, cn_api_id, payin_address FROM batch_conversions
WHERE batch_conversion_id = %s
  AND (conversion_status = 'pending' OR (conversion_status = 'swapping' AND processing_started_at IS NULL))
FOR UPDATE SKIP LOCKED
"""
BATCH_CREDITS = """
SELECT id, accumulated_amount_usdt, payment_fee_usd, payment_amount_usd, nowpayments_outcome_amount
FROM payout_accumulation WHERE batch_conversion_id = %s AND conversion_status = 'swapping' ORDER BY id
"""
RECORD_EXCHANGE = """
UPDATE batch_conversions SET cn_api_id = %s, payin_address = %s, conversion_status = 'swapping'
WHERE batch_conversion_id = %s
"""
GIVE_UP_BATCH = """
UPDATE batch_conversions SET conversion_status = 'failed'
WHERE batch_conversion_id = %s AND conversion_status = 'pending' AND cn_api_id IS NULL
"""
RELEASE_CREDITS = """
UPDATE payout_accumulation SET conversion_status = 'pending', batch_conversion_id = NULL, updated_at = NOW()
WHERE batch_conversion_id = %s AND conversion_status = 'swapping'
"""
MARK_HANDED_OFF = """
UPDATE batch_conversions SET processing_started_at = NOW()
WHERE batch_conversion_id = %s AND processing_started_at IS NULL
"""
LOCK_BATCH = """
SELECT conversion_status, cn_api_id, actual_usdt_received, conversion_tx_hash FROM batch_conversions
WHERE batch_conversion_id = %s FOR UPDATE
"""
SWAPPING_CREDITS = """
SELECT id, accumulated_amount_usdt FROM payout_accumulation
WHERE batch_conversion_id = %s AND conversion_status = 'swapping' ORDER BY id FOR UPDATE
"""
COMPLETE_CREDITS = """
UPDATE payout_accumulation AS credit
SET accumulated_amount_usdt = share.usdt, conversion_status = 'completed', conversion_tx_hash = %s, updated_at = NOW()
FROM unnest(%s::int[], %s::numeric[]) AS share(id, usdt)
WHERE credit.id = share.id
"""
COMPLETE_BATCH = """
UPDATE batch_conversions
SET actual_usdt_received = %s, conversion_tx_hash = %s, conversion_status = 'completed', completed_at = NOW()
WHERE batch_conversion_id = %s
"""


@dataclass(frozen=True)
class Claim:
    """What one run found pending, and the batch it opened (None when below the threshold)."""

    total_pending: Decimal
    batch_conversion_id: str | None = None
    payment_count: int = 0


# ---------------------------------------------------------------- POST /check-threshold

def claim_pending_credits(database: Database, threshold: Decimal) -> Claim:
    """Under one lock, sum the pending credits and, at the threshold, open a batch owning exactly those rows.

    Legacy summed, created the exchange and only then flipped every pending row; a second run or a
    credit arriving in between got a second swap or a share of ETH never swapped (defect 17).
    """
    with database.transaction() as tx:
        tx.advisory_lock(CLAIM_LOCK)
        credits = tx.fetchall(PENDING_CREDITS)
        total = sum((credit["accumulated_amount_usdt"] for credit in credits), Decimal(0))
        if not credits or total < threshold:
            return Claim(total)
        batch_id = str(uuid.uuid4())
        tx.execute(INSERT_BATCH, (batch_id, total, threshold))
        tx.execute(CLAIM_CREDITS, (batch_id, [credit["id"] for credit in credits]))
    log.info("batch conversion opened", extra={"batch_conversion_id": batch_id, "total_usd": str(total)})
    return Claim(total, batch_id, len(credits))


def advance_batches(database: Database, changenow: ChangeNowClient, host_wallet: str,
                    hand_over: Callable[[dict], str]) -> list[dict]:
    """Bring every unfinished batch to GCHostPay1, oldest first; the first failure stops the run (the next resumes)."""
    with database.transaction() as tx:
        batch_ids = [str(row["batch_conversion_id"]) for row in tx.fetchall(UNFINISHED_BATCHES)]
    handed_over = []
    for batch_id in batch_ids:
        order = start_swap(database, changenow, batch_id, host_wallet)
        if order is not None:
            handed_over.append({**order, "task_name": hand_over(order)})
    return handed_over


def start_swap(database: Database, changenow: ChangeNowClient, batch_id: str, host_wallet: str) -> dict | None:
    """The T15 fields of a batch's swap, creating its exchange first if it has none (None: another run has it)."""
    try:
        with database.transaction() as tx:
            batch = tx.fetchone(LOCK_UNFINISHED_BATCH, (batch_id,))
            if batch is not None and batch["cn_api_id"] is None:
                return _create_exchange(tx, changenow, batch_id, host_wallet)
    except errors.ChangeNowRejected:
        _give_up(database, batch_id)
        raise
    if batch is None:
        return None
    # The exchange exists but T15 may not have been enqueued: hand the same exchange over again.
    status = changenow.exchange_status(batch["cn_api_id"])
    amount = status.expected_amount_from or status.amount_from
    if not amount:
        raise errors.ChangeNowBadResponse(f"exchange {batch['cn_api_id']} reports no amount to deposit")
    return swap_order(batch_id, batch["cn_api_id"], amount, batch["payin_address"])


def _create_exchange(tx: Transaction, changenow: ChangeNowClient, batch_id: str, host_wallet: str) -> dict:
    """Create the ChangeNOW exchange for the batch's fee-free ETH and record it on the locked batch."""
    credits = tx.fetchall(BATCH_CREDITS, (batch_id,))
    eth_per_usd = _eth_per_usd(changenow, credits) if any(fee_free_eth(c) is None for c in credits) else None
    amount = swap_amount_eth(credits, eth_per_usd)
    exchange = changenow.create_exchange(from_currency=SWAP_FROM, to_currency=SWAP_TO, from_amount=amount,
                                         address=host_wallet, from_network=SWAP_NETWORK, to_network=SWAP_NETWORK)
    tx.execute(RECORD_EXCHANGE, (exchange.exchange_id, exchange.payin_address, batch_id))
    log.info("batch exchange created", extra={"batch_conversion_id": batch_id, "cn_api_id": exchange.exchange_id})
    # Never more than the fee-free ETH, even if ChangeNOW echoed a larger deposit.
    return swap_order(batch_id, exchange.exchange_id, min(amount, exchange.from_amount), exchange.payin_address)


def _eth_per_usd(changenow: ChangeNowClient, credits: list[dict]) -> Decimal:
    """ChangeNOW's USDT->ETH rate for the batch's USD, pricing credits whose NowPayments ETH is unknown."""
    usd = sum((credit["accumulated_amount_usdt"] for credit in credits), Decimal(0))
    estimate = changenow.estimate(from_currency=SWAP_TO, to_currency=SWAP_FROM, from_amount=usd,
                                  from_network=SWAP_NETWORK, to_network=SWAP_NETWORK)
    return estimate.to_amount / usd


def _give_up(database: Database, batch_id: str) -> None:
    """Mark a batch whose exchange ChangeNOW refused as failed and return its credits to the pool."""
    with database.transaction() as tx:
        if tx.execute(GIVE_UP_BATCH, (batch_id,)) == 1:
            tx.execute(RELEASE_CREDITS, (batch_id,))
    log.error("ChangeNOW refused the batch exchange; credits returned to pending",
              extra={"batch_conversion_id": batch_id})


def fee_free_eth(credit: dict) -> Decimal | None:
    """The client's part of a credit's NowPayments ETH: the platform fee's share stays in the wallet (defect 14).

    The gross is credit + fee as GCAccumulator computed them (payment_amount_usd is rounded to
    cents); a legacy row without payment_fee_usd falls back to payment_amount_usd. None: no ETH known.
    """
    outcome = credit["nowpayments_outcome_amount"]
    if outcome is None or outcome <= 0:
        return None
    net, fee = credit["accumulated_amount_usdt"], credit["payment_fee_usd"]
    gross = net + fee if fee is not None else credit["payment_amount_usd"]
    return outcome * min(net / gross, Decimal(1))


def swap_amount_eth(credits: list[dict], eth_per_usd: Decimal | None = None) -> Decimal:
    """The batch's ETH to swap: every credit's fee-free ETH (priced from USD where unknown), 8 places rounded down."""
    total = Decimal(0)
    for credit in credits:
        eth = fee_free_eth(credit)
        if eth is None:
            if eth_per_usd is None:
                raise ValueError(f"credit {credit['id']} has no ETH amount and no rate was given")
            eth = credit["accumulated_amount_usdt"] * eth_per_usd
        total += eth
    return total.quantize(AMOUNT_STEP, ROUND_DOWN)


def swap_order(batch_id: str, exchange_id: str, amount_eth: Decimal, payin_address: str) -> dict:
    """The T15 fields: pay amount_eth into the exchange's deposit address."""
    return {"batch_conversion_id": batch_id, "cn_api_id": exchange_id, "from_currency": SWAP_FROM,
            "from_network": SWAP_NETWORK, "from_amount": float(amount_eth), "payin_address": payin_address}


def mark_handed_off(database: Database, batch_id: str) -> None:
    """Record that T15 is enqueued, so later runs stop resuming the batch."""
    with database.transaction() as tx:
        tx.execute(MARK_HANDED_OFF, (batch_id,))


def threshold_answer(claim: Claim, threshold: Decimal, handed_over: list[dict]) -> dict:
    """The legacy /check-threshold body, plus the batches this run resumed."""
    resumed = [o["batch_conversion_id"] for o in handed_over if o["batch_conversion_id"] != claim.batch_conversion_id]
    if claim.batch_conversion_id is None:
        return {"status": "success", "message": "Below threshold, no batch conversion needed",
                "total_pending": str(claim.total_pending), "threshold": str(threshold), "batch_created": False,
                "resumed_batches": resumed}
    new = next((o for o in handed_over if o["batch_conversion_id"] == claim.batch_conversion_id), {})
    return {"status": "success", "message": f"Batch conversion created for {claim.payment_count} payment(s)",
            "batch_conversion_id": claim.batch_conversion_id, "cn_api_id": new.get("cn_api_id"),
            "payment_count": claim.payment_count, "task_name": new.get("task_name"),
            "total_pending": str(claim.total_pending), "threshold": str(threshold), "batch_created": True,
            "resumed_batches": resumed}


# ---------------------------------------------------------------- POST /swap-executed (T16)

def complete_swap(database: Database, swap: dict) -> dict:
    """Share the USDT the batch's swap returned among its credits and close the batch, once."""
    batch_id, received, tx_hash = _checked_swap(swap)
    with database.transaction() as tx:
        batch = tx.fetchone(LOCK_BATCH, (batch_id,))
        if batch is None:
            raise errors.NotFound(f"batch conversion {batch_id} not found", batch_conversion_id=batch_id)
        if batch["conversion_status"] == COMPLETED:  # a redelivered T16: already distributed
            return _swap_answer(batch_id, batch["actual_usdt_received"], 0, batch["conversion_tx_hash"])
        if batch["conversion_status"] != SWAPPING or batch["cn_api_id"] != swap["cn_api_id"]:
            raise errors.Conflict(f"batch conversion {batch_id} is {batch['conversion_status']} with exchange "
                                  f"{batch['cn_api_id']}, not {swap['cn_api_id']}", batch_conversion_id=batch_id)
        credits = tx.fetchall(SWAPPING_CREDITS, (batch_id,))
        if not credits:
            raise errors.Conflict(f"batch conversion {batch_id} has no credits to distribute to")
        shares = distribute_usdt([credit["accumulated_amount_usdt"] for credit in credits], received)
        tx.execute(COMPLETE_CREDITS, (tx_hash, [credit["id"] for credit in credits], shares))
        tx.execute(COMPLETE_BATCH, (received, tx_hash, batch_id))
    log.info("batch conversion completed", extra={"batch_conversion_id": batch_id, "usdt": str(received)})
    return _swap_answer(batch_id, received, len(credits), tx_hash)


def distribute_usdt(weights: list[Decimal], received: Decimal) -> list[Decimal]:
    """Split `received` in proportion to `weights` (§8.5): whole USDT base units (6 places) rounded down, the
    last share takes the remainder.

    Rounding every share down keeps the remainder non-negative, and the shares add up to
    `received` exactly (legacy let PostgreSQL round each one and only logged the mismatch); a
    received amount in whole base units gives shares, and so payout batches, in whole base units.
    """
    total = sum(weights, Decimal(0))
    if not weights or total <= 0 or min(weights) < 0:
        raise ValueError("USDT is distributed over non-negative weights with a positive sum")
    shares = [(received * weight / total).quantize(USDT_STEP, ROUND_DOWN) for weight in weights[:-1]]
    return [*shares, received - sum(shares, Decimal(0))]


def _checked_swap(swap: dict) -> tuple[str, Decimal, str]:
    """The batch id, the USDT received and the tx hash of a T16, or BadRequest.

    The USDT received is ChangeNOW's amountTo rounded down to whole base units: what can have
    reached the wallet (ChangeNOW may quote finer than the token, and cannot pay a fraction of a unit).
    """
    try:
        batch_id = str(uuid.UUID(swap["batch_conversion_id"]))
    except ValueError:
        raise errors.BadRequest("batch_conversion_id is not a UUID", field="batch_conversion_id") from None
    received = Decimal(repr(swap["actual_usdt_received"]))  # the f64 on the wire, digit for digit
    if not received.is_finite() or not USDT_STEP <= received < MAX_USDT:  # at least one base unit
        raise errors.BadRequest(f"actual_usdt_received must be positive, got {received}", field="actual_usdt_received")
    if len(swap["tx_hash"]) > MAX_TX_HASH:
        raise errors.BadRequest(f"tx_hash is longer than {MAX_TX_HASH} characters", field="tx_hash")
    return batch_id, received.quantize(USDT_STEP, ROUND_DOWN), swap["tx_hash"]


def _swap_answer(batch_id: str, received: Decimal, records_updated: int, tx_hash: str) -> dict:
    """The legacy /swap-executed body (records_updated is 0 for a redelivery)."""
    message = "USDT distributed to the batch's credits" if records_updated else "Batch conversion already completed"
    return {"status": "success", "message": message, "batch_conversion_id": batch_id,
            "actual_usdt_received": str(received), "records_updated": records_updated, "tx_hash": tx_hash}
