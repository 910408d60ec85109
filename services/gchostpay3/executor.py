"""GCHostPay3's payment protocol: every payout is signed once, recorded, committed, then broadcast.

Legacy sent first and recorded afterwards, retried failures that happened after the transfer, and
re-signed with a fresh nonce on a timeout, so one payout could be paid two or three times (defects
11-13). Here, for one unique_id:

1. Look up split_payout_hostpay (a redelivery finds its transfer without queueing for the wallet);
   none: take the host wallet's transaction-scoped advisory lock and look again.
2. No row: check the order and the wallet's balances, allocate the nonce (past the node's pending
   nonce and every nonce we recorded), sign, INSERT the row with nonce, tx_hash and the signed bytes,
   COMMIT. Only then broadcast. The node is asked (fees, balances, pending nonce) before the lock is
   taken: the lock serialises every payout of the wallet, so what it covers is only what must be
   decided one at a time, the nonce from our own records, and no node round trip. An answer read a
   moment earlier is no weaker: payouts broadcast after their lock is released, so even under the
   lock the node's view could lag the ledger's, which is why the ledger's highest nonce decides.
3. A row (this delivery's, or an earlier one's): never sign again. Look up the receipt of the
   recorded hash, rebroadcast the recorded bytes if the node does not have them, wait a few
   seconds. Mined with status 1: mark the row complete and send T14 to GCHostPay1; status 0:
   record the failure for review and alert. Still unmined: 503, and Cloud Tasks comes back.
   These records are written under the payout's own advisory lock, not the wallet's: they decide
   no nonce, and every payout's settling would otherwise queue behind every other one's signing.

Failures before anything was signed are retried with a T13 self-retry (attempt_count + 1, 60 s)
when the classifier says trying again can help; after the last attempt, or when it cannot help,
the payout is recorded in failed_transactions and an alert goes out. A wallet too poor to pay
answers 503 (a top-up lets the redelivery pay) until the token is about to expire, and is then
recorded for review; nothing is ever dropped silently.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from telepay_shared import errors, hops, tokens
from telepay_shared.alerts import Alerter
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.db import Database, Transaction

from services.gchostpay3 import ledger, rules
from services.gchostpay3.ledger import RecordedTransfer
from services.gchostpay3.rules import Asset, Fees, Order, Transfer
from services.gchostpay3.wallet import Receipt, SignedTransfer, Wallet

log = logging.getLogger(__name__)

FAILED_EVENT = "eth_payment_failed_permanently"  # legacy's alert event type (spec §7.6)
BLOCKED_EVENT = "eth_payment_blocked"
FAILED, PENDING_REVIEW, RETRY_SCHEDULED, SUCCESS = "failed_permanently", "pending_review", "retry_scheduled", "success"


class AwaitingConfirmation(errors.TransientError, code="awaiting_confirmation"):
    """The transfer is broadcast but not mined yet: Cloud Tasks should come back."""


class TransferNotSent(errors.TransientError, code="broadcast_failed"):
    """The recorded transfer could not be handed to the node this time; it is retried as it is."""


class PayoutBlocked(errors.TransientError, code="payout_blocked"):
    """The wallet cannot pay yet (too little ETH or tokens, wrong token configuration): an operator must act."""


@dataclass(frozen=True)
class Settings:
    """The protocol's limits and where its tasks go."""

    max_attempts: int
    retry_delay_s: int
    confirmation_wait_s: float
    review_after_s: int
    unsent_after_s: int
    retry_queue: str
    retry_url: str
    completion_queue: str
    completion_url: str

    @classmethod
    def from_config(cls, config) -> Settings:
        """Read from the service configuration."""
        return cls(
            max_attempts=config.HOSTPAY3_MAX_ATTEMPTS, retry_delay_s=config.HOSTPAY3_RETRY_DELAY_S,
            confirmation_wait_s=float(config.HOSTPAY3_CONFIRMATION_WAIT_S),
            review_after_s=config.HOSTPAY3_REVIEW_AFTER_S, unsent_after_s=config.HOSTPAY3_UNSENT_AFTER_S,
            retry_queue=config.GCHOSTPAY3_RETRY_QUEUE, retry_url=rules.endpoint(config.GCHOSTPAY3_URL, "/"),
            completion_queue=config.GCHOSTPAY1_RESPONSE_QUEUE,
            completion_url=rules.endpoint(config.GCHOSTPAY1_URL, "/payment-completed"),
        )


@dataclass(frozen=True)
class WalletState:
    """The node's answers a new transfer is decided on (token fields: None for ETH)."""

    chain_id: int
    fees: Fees
    wei: int
    chain_nonce: int
    token_decimals: int | None
    token_units: int | None


@dataclass
class Outcome:
    """The answer to one delivery, and the alert to raise once its records are committed."""

    body: dict
    alert: tuple[str, str, dict] | None = field(default=None)


class _Blocked(Exception):
    """Internal: the wallet cannot pay this order yet."""

    def __init__(self, code: str, message: str, severity: str = "ERROR"):
        super().__init__(message)
        self.code, self.message, self.severity = code, message, severity


class _NodeFailure(Exception):
    """Internal: a call to the node (or the local signer) failed before anything was broadcast."""


class _NonceConsumed(Exception):
    """Internal: another transaction took the recorded transfer's nonce; it can never be mined."""


class PaymentExecutor:
    """Carries out execute-payment orders against one host wallet (module docstring)."""

    def __init__(self, settings: Settings, *, database: Database, wallet: Wallet, tasks: TasksClient,
                 alerter: Alerter, assets: dict[str, Asset], keys: dict, redact: Callable[[str], str] = str,
                 clock: Callable[[], float] = time.time):
        self.settings, self.db, self.wallet, self.tasks, self.alerter = settings, database, wallet, tasks, alerter
        self.assets, self.keys, self.redact, self.clock = assets, keys, redact, clock

    def execute(self, order: Order, *, first_delivery: bool = True) -> dict:
        """Pay the order at most once; return the response body (errors raise, mapped to 4xx/5xx)."""
        try:
            transfer = rules.transfer_for(order, self.assets)
        except rules.InvalidOrder as invalid:
            with self._payout_locked(order.unique_id) as tx:
                outcome = self._give_up(tx, order, invalid.error_code, invalid.message)
            self._announce(order, outcome)
            raise
        # A redelivery (Cloud Tasks comes back until the transfer is mined) finds its transfer without
        # queueing for the wallet's lock; rows are only ever added, so "none" is asked again under it.
        with self.db.transaction() as tx:
            recorded = ledger.find_transfer(tx, order.unique_id)
        if recorded is None:
            wallet_state = self._wallet_state_before_lock(transfer)
            with self._wallet_locked(order.unique_id) as tx:
                recorded = ledger.find_transfer(tx, order.unique_id)
                started = recorded or self._start(tx, order, transfer, first_delivery, wallet_state)
        else:
            started = recorded
        if isinstance(started, Outcome):
            return self._announce(order, started)
        return self._announce(order, self._settle(order, started, first_delivery, fresh=recorded is None))

    # ------------------------------------------------------------------ a new transfer

    def _wallet_state_before_lock(self, transfer: Transfer) -> WalletState | Exception:
        """What the node says about the wallet (chain, fees, balances, pending nonce), asked before the wallet lock is
        taken (module docstring, step 2). A failure is returned, to be handled under the lock like any node
        failure before signing."""
        try:
            chain_id, fees = self.wallet.chain_id(), self.wallet.fees()
            contract = transfer.asset.contract
            decimals = self.wallet.token_decimals(contract) if contract else None
            token_units = self.wallet.token_balance(contract) if contract else None
            wei, chain_nonce = self.wallet.balance_and_nonce()
        except errors.TelePayError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified under the lock (_sign)
            return exc
        return WalletState(chain_id, fees, wei, chain_nonce, decimals, token_units)

    def _start(self, tx: Transaction, order: Order, transfer: Transfer,
               first_delivery: bool, wallet_state: WalletState | Exception) -> RecordedTransfer | Outcome:
        """Sign and record a new transfer (committed by the caller before it is broadcast)."""
        if ledger.under_review(tx, order.unique_id):
            return Outcome({"status": FAILED, "message": "payout awaits review in failed_transactions; not sent",
                            "unique_id": order.unique_id})
        if order.attempt > self.settings.max_attempts:
            return self._give_up(tx, order, order.last_error_code or "ATTEMPT_LIMIT_EXCEEDED",
                                 f"attempt {order.attempt} exceeds the limit of {self.settings.max_attempts}")
        try:
            signed = self._sign(tx, transfer, wallet_state)
        except _Blocked as blocked:
            return self._blocked(tx, order, blocked, first_delivery)
        except _NodeFailure as failure:
            return self._failed_before_broadcast(tx, order, failure.__cause__)
        return ledger.record_transfer(tx, order, transfer, signed, self.wallet.address)

    def _sign(self, tx: Transaction, transfer: Transfer, wallet_state: WalletState | Exception) -> SignedTransfer:
        """Check the balances, allocate the nonce and sign; the node was asked before the lock, and is never
        trusted with the key."""
        if isinstance(wallet_state, Exception):
            raise _NodeFailure() from wallet_state
        if transfer.asset.contract:
            if wallet_state.token_decimals != transfer.asset.decimals:
                # A wrong decimals setting would pay 10^12 times too much or too little.
                raise _Blocked("TOKEN_DECIMALS_MISMATCH", f"{transfer.asset.symbol} contract "
                               f"{transfer.asset.contract} has {wallet_state.token_decimals} decimals, the "
                               f"configuration says {transfer.asset.decimals}", "CRITICAL")
            if wallet_state.token_units < transfer.units:
                raise _Blocked("INSUFFICIENT_FUNDS", f"host wallet holds {wallet_state.token_units} base units of "
                               f"{transfer.asset.symbol}, the payout needs {transfer.units}")
        needed = rules.eth_needed(transfer, wallet_state.fees)
        if wallet_state.wei < needed:
            raise _Blocked("INSUFFICIENT_FUNDS", f"host wallet holds {wallet_state.wei} wei, the payout needs "
                           f"{needed} (value and gas)")
        self._resend_unsent(tx, wallet_state.chain_nonce)
        nonce = rules.next_nonce(wallet_state.chain_nonce, ledger.highest_nonce(tx, self.wallet.address))
        return self._node(self.wallet.sign, transfer, nonce=nonce, fees=wallet_state.fees,
                          chain_id=wallet_state.chain_id)

    def _resend_unsent(self, tx: Transaction, chain_nonce: int) -> None:
        """Rebroadcast recorded transfers the node does not count yet, so the new nonce does not wait behind a gap.

        Such a transfer was committed but never reached the node (the process died in between) or
        the node dropped it; its own redelivery would resend it too, but may never come. Only transfers
        recorded at least unsent_after_s ago are looked at: a younger one is, in all likelihood, being
        broadcast by its own delivery right now, and asking the node about it, under the lock that every
        payout waits for, cost a round trip (and often a futile rebroadcast) per payout in flight.
        """
        for recorded in ledger.unsent_candidates(tx, self.wallet.address, chain_nonce, self.settings.unsent_after_s):
            try:
                if recorded.signed_tx and not self.wallet.knows(recorded.tx_hash):
                    self.wallet.broadcast(recorded.signed_tx)
                    log.warning("rebroadcast recorded transfer %s (nonce %s) that the node did not have",
                                recorded.unique_id, recorded.nonce)
            except Exception as exc:  # noqa: BLE001 - its own settlement reports it; the new transfer proceeds
                # "Nonce used": mostly its own delivery broadcast it in between (it was mined); if another
                # transaction took the nonce, that delivery's settlement records it for review.
                level = logging.INFO if rules.nonce_already_used(exc) else logging.ERROR
                log.log(level, "recorded transfer %s (nonce %s) could not be rebroadcast: %s", recorded.unique_id,
                        recorded.nonce, self.redact(str(exc))[:300])

    def _blocked(self, tx: Transaction, order: Order, blocked: _Blocked, first_delivery: bool) -> Outcome:
        """503 while a top-up (or a fix) can still let a redelivery pay; recorded for review once the token runs out."""
        if rules.review_due(order, self.clock(), self.settings.review_after_s):
            return self._give_up(tx, order, blocked.code, blocked.message, status=PENDING_REVIEW)
        # Every delivery logs the ERROR; only the first one notifies, not one message a minute.
        self.alerter.alert(BLOCKED_EVENT, blocked.message, severity=blocked.severity, notify=first_delivery,
                           unique_id=order.unique_id, error_code=blocked.code, currency=order.currency,
                           amount=str(order.amount), host_wallet=self.wallet.address)
        raise PayoutBlocked(blocked.message, unique_id=order.unique_id, error_code=blocked.code)

    def _failed_before_broadcast(self, tx: Transaction, order: Order, exc: BaseException) -> Outcome:
        """Nothing was signed or sent: retry with a T13 if that can help and attempts remain, else record it."""
        failure = rules.classify(exc)
        message = self.redact(f"{type(exc).__name__}: {exc}")[:1000]
        log.warning("payout %s attempt %s failed before broadcasting: %s %s", order.unique_id, order.attempt,
                    failure.code, message)
        if not (failure.retryable and order.attempt < self.settings.max_attempts):
            return self._give_up(tx, order, failure.code, message, {"retryable": failure.retryable})
        token = tokens.encode(hops.EXECUTE_RETRY, rules.retry_token_fields(order, failure), self.keys)
        task = self.tasks.enqueue(
            self.settings.retry_queue, self.settings.retry_url, {"token": token}, delay_s=self.settings.retry_delay_s,
            idempotency_key=f"gchostpay3-retry:{order.unique_id}:{order.attempt + 1}")
        return Outcome({"status": RETRY_SCHEDULED, "message": f"attempt {order.attempt} failed: {failure.code}",
                        "unique_id": order.unique_id, "attempt": order.attempt + 1, "error_code": failure.code,
                        "retryable": True, "task_id": task})

    # ------------------------------------------------------------------ a recorded transfer

    def _settle(self, order: Order, recorded: RecordedTransfer, first_delivery: bool, fresh: bool = False) -> Outcome:
        """Bring a recorded transfer to its end without ever signing another one (fresh: signed by this delivery)."""
        if recorded.is_complete or recorded.tx_status == ledger.SUCCESS:
            return self._completed(order, recorded.tx_hash, recorded.gas_used or 0, recorded.block_number or 0,
                                   already=True)
        if recorded.tx_status in (ledger.REVERTED, ledger.FAILED):
            # Recorded already when it failed: no second row, no second alert.
            with self._payout_locked(order.unique_id) as tx:
                return self._give_up(tx, order, f"TRANSFER_{recorded.tx_status.upper()}",
                                     f"transfer {recorded.tx_hash} is {recorded.tx_status}; not sent again")
        if not recorded.tx_hash:  # a row without a transaction: nobody can tell what was sent
            with self._payout_locked(order.unique_id) as tx:
                return self._give_up(tx, order, "UNKNOWN_TRANSFER_STATE",
                                     "split_payout_hostpay has an unfinished row without tx_hash; not sent")
        try:
            receipt = self._confirmation(recorded, fresh)
        except _NonceConsumed as consumed:
            with self._payout_locked(order.unique_id) as tx:
                ledger.mark_failed(tx, recorded.unique_id)
                return self._give_up(tx, order, "NONCE_CONFLICT", str(consumed), self._tx_details(recorded))
        except errors.TelePayError:
            raise
        except Exception as exc:  # noqa: BLE001 - the node failed us; the recorded bytes are retried as they are
            return self._unsent(order, recorded, exc, first_delivery)
        if receipt is None:
            return self._unconfirmed(order, recorded)
        with self._payout_locked(order.unique_id) as tx:
            ledger.mark_mined(tx, recorded.unique_id, receipt)
            if receipt.status != 1:
                return self._give_up(tx, order, "TRANSACTION_REVERTED_PERMANENT",
                                     f"transfer {recorded.tx_hash} was mined in block {receipt.block_number} "
                                     "and reverted", self._tx_details(recorded, receipt))
            ledger.mark_recovered(tx, recorded.unique_id, recorded.tx_hash)
        return self._completed(order, recorded.tx_hash, receipt.gas_used, receipt.block_number)

    def _confirmation(self, recorded: RecordedTransfer, fresh: bool = False) -> Receipt | None:
        """The receipt, after making sure the node has the recorded bytes and waiting a few seconds.

        A fresh transfer (signed by this very delivery) was never broadcast: asking the node for its
        receipt and whether it has it can only answer no, so it is broadcast at once. Should another
        delivery have broadcast it meanwhile, the node answers "already known" or, once it is mined,
        "nonce too low", which are handled as for any recorded transfer.
        """
        receipt = None if fresh else self.wallet.receipt(recorded.tx_hash)
        if receipt is not None:
            return receipt
        if recorded.signed_tx and (fresh or not self.wallet.knows(recorded.tx_hash)):
            try:
                self.wallet.broadcast(recorded.signed_tx)
            except Exception as exc:
                if not rules.nonce_already_used(exc):
                    raise
                receipt = self.wallet.receipt(recorded.tx_hash)  # mined between the two questions?
                if receipt is None:
                    raise _NonceConsumed(f"nonce {recorded.nonce} was used by another transaction; transfer "
                                         f"{recorded.tx_hash} can never be mined") from exc
                return receipt
        return self.wallet.wait_for_receipt(recorded.tx_hash, self.settings.confirmation_wait_s)

    def _unconfirmed(self, order: Order, recorded: RecordedTransfer) -> Outcome:
        """Not mined yet: 503 so Cloud Tasks comes back, until the token is about to expire."""
        if rules.review_due(order, self.clock(), self.settings.review_after_s):
            with self._payout_locked(order.unique_id) as tx:
                return self._give_up(tx, order, "CONFIRMATION_TIMEOUT",
                                     f"transfer {recorded.tx_hash} (nonce {recorded.nonce}) is still not mined; "
                                     "check it on chain before anything is sent again",
                                     self._tx_details(recorded), status=PENDING_REVIEW)
        raise AwaitingConfirmation(f"transfer {recorded.tx_hash} is not mined yet", unique_id=order.unique_id,
                                   tx_hash=recorded.tx_hash)

    def _unsent(self, order: Order, recorded: RecordedTransfer, exc: Exception, first_delivery: bool) -> Outcome:
        """The node could not be asked or refused the recorded bytes: 503 (ERROR), for review once the token runs out."""
        failure = rules.classify(exc)
        message = self.redact(f"transfer {recorded.tx_hash}: {type(exc).__name__}: {exc}")[:1000]
        if rules.review_due(order, self.clock(), self.settings.review_after_s):
            with self._payout_locked(order.unique_id) as tx:
                return self._give_up(tx, order, failure.code, message, self._tx_details(recorded),
                                     status=PENDING_REVIEW)
        if failure.code == "INSUFFICIENT_FUNDS":
            self.alerter.alert(BLOCKED_EVENT, message, notify=first_delivery, unique_id=order.unique_id,
                               error_code=failure.code, tx_hash=recorded.tx_hash, host_wallet=self.wallet.address)
        else:
            log.error("recorded transfer not confirmed: %s %s", failure.code, message)
        raise TransferNotSent(message, unique_id=order.unique_id, tx_hash=recorded.tx_hash, error_code=failure.code)

    def _completed(self, order: Order, tx_hash: str, gas_used: int, block_number: int, *,
                   already: bool = False) -> Outcome:
        """Report the confirmed transfer to GCHostPay1 (T14); a redelivery re-sends under the same task name.

        Legacy sent threshold payouts to GCAccumulator's /swap-executed, which does not exist (defect 28);
        GCHostPay1 handles every context. A failure here answers 5xx and never leads to a second
        transfer (defect 12): the redelivery finds the completed row.
        """
        fields = rules.completion_token_fields(order, tx_hash, gas_used, block_number)
        token = tokens.encode(hops.PAYMENT_COMPLETED, fields, self.keys)
        task = self.tasks.enqueue(self.settings.completion_queue, self.settings.completion_url, {"token": token},
                                  idempotency_key=f"payment-completed:{order.unique_id}")
        return Outcome({"status": SUCCESS, "message": "Payment already executed" if already else "Payment executed",
                        **fields, "attempt": order.attempt, "task_id": task})

    # ------------------------------------------------------------------ helpers

    def _give_up(self, tx: Transaction, order: Order, code: str, message: str, details: dict | None = None,
                 status: str = FAILED) -> Outcome:
        """Record the payout in failed_transactions (once) and answer 200; the alert follows the commit."""
        recorded = ledger.record_failure(tx, order, code, message, details or {})
        alert = (FAILED_EVENT, message, {"error_code": code, **(details or {})}) if recorded else None
        body = {"status": status, "message": message, "unique_id": order.unique_id, "error_code": code}
        return Outcome(body, alert)

    def _announce(self, order: Order, outcome: Outcome) -> dict:
        """Raise the outcome's alert (its record is committed by now) and return its body."""
        if outcome.alert is not None:
            event_type, message, fields = outcome.alert
            self.alerter.alert(event_type, message, unique_id=order.unique_id, cn_api_id=order.cn_api_id,
                               context=order.context, amount=str(order.amount), currency=order.currency,
                               payin_address=order.payin_address, attempt_count=order.attempt, **fields)
        return outcome.body

    @staticmethod
    def _tx_details(recorded: RecordedTransfer, receipt: Receipt | None = None) -> dict:
        """The recorded transaction's identity, for the review record."""
        details: dict[str, Any] = {"tx_hash": recorded.tx_hash, "nonce": recorded.nonce}
        if receipt is not None:
            details.update(block_number=receipt.block_number, gas_used=receipt.gas_used)
        return details

    def _node(self, call: Callable, *args, **kwargs):
        """Call the wallet; any failure becomes a _NodeFailure (its __cause__ is the original)."""
        try:
            return call(*args, **kwargs)
        except errors.TelePayError:
            raise
        except Exception as exc:
            raise _NodeFailure() from exc

    @contextmanager
    def _wallet_locked(self, unique_id: str) -> Iterator[Transaction]:
        """A transaction holding the host wallet's advisory lock (every new transfer's decision), then the payout's."""
        with self.db.transaction() as tx:
            ledger.lock_wallet(tx, self.wallet.address)
            ledger.lock_payout(tx, unique_id)
            yield tx

    @contextmanager
    def _payout_locked(self, unique_id: str) -> Iterator[Transaction]:
        """A transaction holding one payout's advisory lock: enough to settle a recorded transfer.

        Settling (receipt recorded, review records written once) decides nothing about the wallet's
        nonces, so it does not queue behind every other payout's signing for the wallet's lock; the
        payout's own lock keeps two deliveries of it from recording the same outcome twice.
        """
        with self.db.transaction() as tx:
            ledger.lock_payout(tx, unique_id)
            yield tx
