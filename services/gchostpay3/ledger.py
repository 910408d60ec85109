"""GCHostPay3's records: split_payout_hostpay (one row per transfer, written before it is broadcast)
and failed_transactions (payouts left for a person to review). Spec §6.1; migrations 0002 and 0003.

Every function takes an open transaction; callers hold the host wallet's advisory lock
(`lock_wallet`) first, so the check-then-write sequences here cannot interleave.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

from telepay_shared.db import Row, Transaction

from services.gchostpay3.rules import ETH, Order, Transfer
from services.gchostpay3.wallet import Receipt, SignedTransfer

PENDING, SUCCESS, REVERTED, FAILED = "pending", "success", "reverted", "failed"
PENDING_REVIEW = "failed_pending_review"

# Column widths of the legacy tables: longer values are cut (legacy cut cn_api_id to 16 as well) and
# kept whole in last_error_details.
_CN_API_ID = 16
_FAILED_CURRENCY = 10
_FAILED_CONTEXT = 20
_FAILED_ADDRESS = 100
_FAILED_ERROR_CODE = 50
_UNIQUE_ID = 64
# failed_transactions.from_amount is NUMERIC(18,8): below 10^10.
_FAILED_AMOUNT_LIMIT = Decimal(10) ** 10

_TRANSFER_COLUMNS = "unique_id, tx_hash, tx_status, is_complete, nonce, signed_tx, gas_used, block_number"


@dataclass(frozen=True)
class RecordedTransfer:
    """A split_payout_hostpay row as this service reads it."""

    unique_id: str
    tx_hash: str | None
    tx_status: str
    is_complete: bool
    nonce: int | None
    signed_tx: str | None  # None on rows legacy wrote (after the fact, without the signed bytes)
    gas_used: int | None
    block_number: int | None


def lock_wallet(tx: Transaction, sender: str) -> None:
    """Serialise every transfer decision of one host wallet (nonce allocation, first writes) until commit."""
    tx.advisory_lock(f"gchostpay3:wallet:{sender.lower()}")


def lock_payout(tx: Transaction, unique_id: str) -> None:
    """Serialise the deliveries of one payout (its records and alerts) until commit."""
    tx.advisory_lock(f"gchostpay3:payout:{unique_id}")


def find_transfer(tx: Transaction, unique_id: str) -> RecordedTransfer | None:
    """The transfer recorded for a payout, if any."""
    row = tx.fetchone(f"SELECT {_TRANSFER_COLUMNS} FROM split_payout_hostpay WHERE unique_id = %s", (unique_id,))
    return None if row is None else _transfer(row)


def highest_nonce(tx: Transaction, sender: str) -> int | None:
    """The highest nonce this service ever recorded for the wallet."""
    return tx.fetchvalue("SELECT max(nonce) FROM split_payout_hostpay WHERE sender_address = %s", (sender,))


def unsent_candidates(tx: Transaction, sender: str, from_nonce: int, older_than_s: int) -> list[RecordedTransfer]:
    """Recorded, unconfirmed transfers at or above a nonce the node does not count yet (never broadcast or
    dropped), recorded at least older_than_s seconds ago."""
    rows = tx.fetchall(
        f"SELECT {_TRANSFER_COLUMNS} FROM split_payout_hostpay WHERE sender_address = %s AND tx_status = %s "
        "AND nonce >= %s AND created_at <= now() - make_interval(secs => %s) ORDER BY nonce",
        (sender, PENDING, from_nonce, older_than_s))
    return [_transfer(row) for row in rows]


def record_transfer(tx: Transaction, order: Order, transfer: Transfer, signed: SignedTransfer,
                    sender: str) -> RecordedTransfer:
    """Insert the signed, not yet broadcast transfer (tx_status 'pending'), to be committed before broadcasting."""
    # actual_eth_amount: the ETH that left the wallet for the payout (legacy always wrote 0, defect 26);
    # 0 for a token transfer, which moves no ETH besides gas.
    actual_eth = order.amount if transfer.asset.symbol == ETH else Decimal(0)
    tx.execute(
        "INSERT INTO split_payout_hostpay (unique_id, cn_api_id, from_currency, from_network, from_amount, "
        "payin_address, is_complete, tx_hash, tx_status, nonce, signed_tx, sender_address, actual_eth_amount) "
        "VALUES (%s, %s, %s::currency_type, %s::currency_type, %s, %s, FALSE, %s, %s, %s, %s, %s, %s)",
        (order.unique_id, order.cn_api_id[:_CN_API_ID], transfer.asset.symbol.upper(), order.network.upper(),
         order.amount, transfer.payin, signed.tx_hash, PENDING, signed.nonce, signed.raw, sender, actual_eth))
    return RecordedTransfer(order.unique_id, signed.tx_hash, PENDING, False, signed.nonce, signed.raw, None, None)


def mark_mined(tx: Transaction, unique_id: str, receipt: Receipt) -> None:
    """Record the receipt: success completes the payout, status 0 marks the transfer reverted."""
    status = SUCCESS if receipt.status == 1 else REVERTED
    tx.execute(
        "UPDATE split_payout_hostpay SET tx_status = %s, is_complete = %s, gas_used = %s, block_number = %s, "
        "updated_at = now() WHERE unique_id = %s",
        (status, receipt.status == 1, receipt.gas_used, receipt.block_number, unique_id))


def mark_failed(tx: Transaction, unique_id: str) -> None:
    """The recorded transaction can never be mined (its nonce was used by another one)."""
    tx.execute("UPDATE split_payout_hostpay SET tx_status = %s, updated_at = now() WHERE unique_id = %s",
               (FAILED, unique_id))


def under_review(tx: Transaction, unique_id: str) -> bool:
    """Whether the payout is recorded in failed_transactions and still awaits a person."""
    return tx.fetchvalue("SELECT 1 FROM failed_transactions WHERE unique_id = %s AND status = %s LIMIT 1",
                         (unique_id[:_UNIQUE_ID], PENDING_REVIEW)) is not None


def record_failure(tx: Transaction, order: Order, error_code: str, message: str, details: dict) -> bool:
    """Record the payout for review once; False when it already awaits review (no second row, no second alert)."""
    if under_review(tx, order.unique_id):
        return False
    amount = order.amount if order.amount.is_finite() and abs(order.amount) < _FAILED_AMOUNT_LIMIT else Decimal(0)
    whole = {"unique_id": order.unique_id, "cn_api_id": order.cn_api_id, "from_currency": order.currency,
             "from_network": order.network, "from_amount": str(order.amount), "payin_address": order.payin_address,
             "context": order.context, "first_attempt_at": order.first_attempt_at, **details}
    tx.execute(
        "INSERT INTO failed_transactions (unique_id, cn_api_id, from_currency, from_network, from_amount, "
        "payin_address, context, error_code, error_message, last_error_details, attempt_count, "
        "last_attempt_timestamp, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, now(), %s)",
        (order.unique_id[:_UNIQUE_ID], order.cn_api_id[:_CN_API_ID], order.currency[:_FAILED_CURRENCY],
         order.network[:_FAILED_CURRENCY], amount, order.payin_address[:_FAILED_ADDRESS],
         order.context[:_FAILED_CONTEXT], error_code[:_FAILED_ERROR_CODE], message,
         json.dumps(whole, default=str), order.attempt, PENDING_REVIEW))
    return True


def mark_recovered(tx: Transaction, unique_id: str, tx_hash: str) -> None:
    """A transfer left for review was mined after all: close its review record."""
    tx.execute(
        "UPDATE failed_transactions SET status = 'recovered', recovery_tx_hash = %s, recovered_at = now(), "
        "recovered_by = 'gchostpay3', updated_at = now() WHERE unique_id = %s AND status = %s",
        (tx_hash, unique_id[:_UNIQUE_ID], PENDING_REVIEW))


def _transfer(row: Row) -> RecordedTransfer:
    """A row as a RecordedTransfer."""
    return RecordedTransfer(row["unique_id"], row["tx_hash"], row["tx_status"] or PENDING, bool(row["is_complete"]),
                            row["nonce"], row["signed_tx"], row["gas_used"], row["block_number"])
