"""GCBatchProcessor's rules: pay each threshold client's converted USDT balance once it reaches the
channel's payout threshold (spec §4.9, §9.2 step 12).

payout_batches.status: 'pending' = the batch owns its credits (marked paid in the same
transaction) but T9 may not be enqueued yet; 'processing' = T9 is enqueued to GCSplit1. A run
whose enqueue failed leaves 'pending' batches that the next run sends again under the same task name.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal

from telepay_shared.db import Database

log = logging.getLogger(__name__)

CLAIM_LOCK = "gcbatchprocessor:claim-payouts"

# Only converted credits hold USDT; pending/swapping rows still hold USD bookkeeping (defect 15).
CONVERTED_UNPAID_CREDITS = """
SELECT id, client_id, client_wallet_address, client_payout_currency, client_payout_network, accumulated_amount_usdt
FROM payout_accumulation WHERE conversion_status = 'completed' AND is_paid_out = FALSE ORDER BY id FOR UPDATE
"""
# MAX, not a join: a channel registered twice must not count its credits twice.
CLIENT_THRESHOLDS = """
SELECT closed_channel_id, MAX(payout_threshold_usd) AS threshold FROM main_clients_database
WHERE closed_channel_id = ANY(%s) GROUP BY closed_channel_id
"""
INSERT_BATCH = """
INSERT INTO payout_batches (batch_id, client_id, client_wallet_address, client_payout_currency,
                            client_payout_network, total_amount_usdt, total_payments_count, status)
VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending')
"""
# Exactly the credits summed, by id (defect 16: legacy marked every unpaid row of the client).
MARK_PAID = """
UPDATE payout_accumulation SET is_paid_out = TRUE, payout_batch_id = %s, paid_out_at = NOW(), updated_at = NOW()
WHERE id = ANY(%s)
"""
# A 'pending' batch owning no credits is a legacy leftover, never ours: it is not sent.
PENDING_BATCHES = """
SELECT b.batch_id, b.client_id, b.client_wallet_address, b.client_payout_currency, b.client_payout_network,
       b.total_amount_usdt, b.total_payments_count,
       (SELECT COALESCE(SUM(c.nowpayments_outcome_amount), 0) FROM payout_accumulation c
        WHERE c.payout_batch_id = b.batch_id) AS outcome_eth
FROM payout_batches b
WHERE b.status = 'pending' AND EXISTS (SELECT 1 FROM payout_accumulation c WHERE c.payout_batch_id = b.batch_id)
ORDER BY b.created_at, b.batch_id
"""
MARK_PROCESSING = """
UPDATE payout_batches SET status = 'processing', processing_started_at = NOW()
WHERE batch_id = %s AND status = 'pending'
"""


@dataclass(frozen=True)
class Payout:
    """One client destination whose converted balance reached its threshold, and the credits that make it."""

    client_id: str
    wallet_address: str
    payout_currency: str
    payout_network: str
    total_usdt: Decimal
    credit_ids: tuple[int, ...]


@dataclass(frozen=True)
class PendingBatch:
    """A claimed batch still to be sent to GCSplit1: its T9 fields and how many credits it pays."""

    token_fields: dict
    payment_count: int


def payouts_due(credits: list[dict], thresholds: dict[str, Decimal]) -> list[Payout]:
    """Group credits by (client, wallet, currency, network); a group is due when its sum reaches the client's threshold.

    A client without a registered channel (no threshold) is never paid automatically, as in legacy.
    """
    groups: dict[tuple, list[dict]] = {}
    for credit in credits:
        destination = (credit["client_id"], credit["client_wallet_address"], credit["client_payout_currency"],
                       credit["client_payout_network"])
        groups.setdefault(destination, []).append(credit)
    due = []
    for destination, members in groups.items():
        total = sum((credit["accumulated_amount_usdt"] for credit in members), Decimal(0))
        threshold = thresholds.get(destination[0])
        if threshold is not None and total > 0 and total >= threshold:
            due.append(Payout(*destination, total, tuple(credit["id"] for credit in members)))
    return due


def claim_payouts(database: Database) -> list[str]:
    """Under one lock, open a batch per due destination and mark exactly its credits paid; returns the batch ids."""
    with database.transaction() as tx:
        tx.advisory_lock(CLAIM_LOCK)
        credits = tx.fetchall(CONVERTED_UNPAID_CREDITS)
        if not credits:
            return []
        clients = sorted({credit["client_id"] for credit in credits})
        thresholds = {row["closed_channel_id"]: row["threshold"] for row in tx.fetchall(CLIENT_THRESHOLDS, (clients,))}
        batch_ids = []
        for payout in payouts_due(credits, thresholds):
            batch_id = str(uuid.uuid4())
            tx.execute(INSERT_BATCH, (batch_id, payout.client_id, payout.wallet_address, payout.payout_currency,
                                      payout.payout_network, payout.total_usdt, len(payout.credit_ids)))
            tx.execute(MARK_PAID, (batch_id, list(payout.credit_ids)))
            batch_ids.append(batch_id)
    log.info("payout batches opened", extra={"batch_ids": batch_ids})
    return batch_ids


def pending_batches(database: Database) -> list[PendingBatch]:
    """Every claimed batch not yet handed to GCSplit1, oldest first, with its T9 fields."""
    with database.transaction() as tx:
        batches = tx.fetchall(PENDING_BATCHES)
    return [PendingBatch(batch_token_fields(row), row["total_payments_count"]) for row in batches]


def batch_token_fields(batch: dict) -> dict:
    """The T9 fields; actual_eth_amount (the batch's NowPayments ETH) is informational, GCSplit1 ignores it."""
    return {"batch_id": batch["batch_id"], "client_id": batch["client_id"],
            "wallet_address": batch["client_wallet_address"], "payout_currency": batch["client_payout_currency"],
            "payout_network": batch["client_payout_network"], "total_amount_usdt": batch["total_amount_usdt"],
            "actual_eth_amount": float(batch["outcome_eth"])}


def mark_processing(database: Database, batch_id: str) -> None:
    """Record that T9 is enqueued, so later runs stop sending the batch."""
    with database.transaction() as tx:
        tx.execute(MARK_PROCESSING, (batch_id,))


def process_answer(created: list[str], sent: list[dict]) -> dict:
    """The legacy /process body: one entry per batch sent to GCSplit1 in this run (new or resumed)."""
    message = f"Processed {len(sent)} client(s)" if sent else "No batches to process"
    return {"status": "success", "message": message, "batches_created": len(created), "batches": sent, "errors": None}


def batch_summary(batch: PendingBatch, task_name: str) -> dict:
    """One entry of the /process answer."""
    fields = batch.token_fields
    return {"batch_id": fields["batch_id"], "client_id": fields["client_id"],
            "total_usdt": str(fields["total_amount_usdt"]), "payment_count": batch.payment_count,
            "task_name": task_name}
