"""GCHostPay1: the front door of payment execution (spec §4.10).

POST /                      {"token": T8 | T20 | T15}  paid already -> 200; else T10 to GCHostPay2
POST /status-verified       {"token": T11}  "waiting" -> T12 to GCHostPay3; other statuses settled here
POST /payment-completed     {"token": T14}  instant: close a threshold payout batch; batch_: T16 or T17
POST /retry-callback-check  {"token": T17}  re-check a batch conversion: T16, next T17, or review

Wire-compatible with the legacy services around it. Every task is named after the payout's
unique_id, so a redelivered request never orders a second status check, transfer or callback.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import flask

from telepay_shared import errors, hops, tokens, web
from telepay_shared.alerts import Alerter
from telepay_shared.changenow import ChangeNowClient
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gchostpay1 import rules

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None,
               changenow: ChangeNowClient | None = None, tasks: TasksClient | None = None,
               clock: Callable[[], float] = time.time, alerter: Alerter | None = None) -> flask.Flask:
    """Build the service; configuration, database and clients default to the deployment's own."""
    config = config or load_config(CONFIG_PATH)
    database = database or Database.from_env(config)
    alerter = alerter or Alerter.from_config(config.service, config)
    changenow = changenow or ChangeNowClient.from_config(config)
    tasks = tasks or TasksClient.from_config(config)
    retry_url = config.GCHOSTPAY1_URL.rstrip("/") + "/retry-callback-check"
    swap_executed_url = config.MICROBATCH_URL.rstrip("/") + "/swap-executed"
    app = web.create_app(config.service, config, health_checks={"database": database.ping})

    def send(hop, fields: dict, queue: str, url: str, key: str, delay_s: int = 0) -> str:
        """Enqueue the next hop under its idempotency key; a failed enqueue raises (5xx: redelivered)."""
        token = tokens.encode(hop, fields, config, now=clock())
        return tasks.enqueue(queue, url, {"token": token}, idempotency_key=key, delay_s=delay_s)

    def review(case: rules.Review) -> dict:
        """Record a payout that cannot complete and alert once; the request is then done (200)."""
        with database.transaction() as tx:
            recorded = rules.record_for_review(tx, case)
        if recorded:
            rules.alert(case, alerter)
        return {"status": rules.REVIEW_STATUS, "unique_id": case.unique_id, "error_code": case.error_code,
                "message": case.error_message}

    def follow_conversion(unique_id: str, cn_api_id: str, tx_hash: str, retry_count: int) -> dict:
        """After a batch conversion's ETH left: call GCMicroBatchProcessor back, re-check later, or review."""
        try:
            exchange = changenow.exchange_status(cn_api_id)
        except errors.ChangeNowNotFound:
            exchange = None
        step, error_code = rules.conversion_step(exchange, retry_count, config.TP_CALLBACK_MAX_RETRIES)
        if step == rules.CALLBACK:
            callback = rules.swap_executed(unique_id, cn_api_id, tx_hash, exchange)
            task = send(hops.MICROBATCH_SWAP_EXECUTED, callback, config.MICROBATCH_RESPONSE_QUEUE, swap_executed_url,
                        f"microbatch:{callback['batch_conversion_id']}")
            return {"status": "success", "message": "Callback sent to MicroBatchProcessor",
                    "actual_usdt_received": str(exchange.amount_to), "task_id": task}
        if step == rules.RETRY:
            task = send(hops.CALLBACK_RETRY, rules.callback_retry(unique_id, cn_api_id, tx_hash, retry_count + 1),
                        config.GCHOSTPAY1_RESPONSE_QUEUE, retry_url, f"retry:{unique_id}:{retry_count + 1}",
                        delay_s=config.TP_CALLBACK_RETRY_DELAY_S)
            return {"status": "retry_scheduled", "message": f"ChangeNOW exchange is '{exchange.status}'",
                    "retry_count": retry_count + 1, "task_id": task}
        return review(rules.conversion_review(unique_id, cn_api_id, tx_hash, exchange, error_code, retry_count + 1))

    @app.post("/")
    @app.auth.required
    def order_payment():
        """Take a payout order and, unless it is paid already, have GCHostPay2 check its exchange."""
        order = rules.decode_order(web.require_fields(web.json_body(), "token")[0], config, clock())
        unique_id = order["unique_id"]
        web.bind_log_context(unique_id=unique_id, cn_api_id=order["cn_api_id"], context=order["context"])
        with database.transaction() as tx:
            paid = rules.already_paid(tx, unique_id)
        if paid:
            return {"status": "already_processed", "message": "Transaction already processed", "unique_id": unique_id}
        task = send(hops.STATUS_CHECK, rules.status_check(order), config.GCHOSTPAY2_QUEUE, config.GCHOSTPAY2_URL,
                    f"gchostpay2:{unique_id}")
        return {"status": "success", "message": "Status check enqueued to GCHostPay2", "unique_id": unique_id,
                "cn_api_id": order["cn_api_id"], "context": order["context"], "task_id": task}

    @app.token_task("/status-verified", hops.STATUS_VERIFIED, clock=clock)
    def status_verified(verified: dict, _token: str):
        """Order the transfer only while the exchange awaits its deposit; settle every other status here."""
        status = verified["status"]
        if rules.deposit_decision(status) == rules.WAIT:
            # The token's status never changes on redelivery, so a retry must look again itself.
            status = changenow.exchange_status(verified["cn_api_id"]).status
        decision = rules.deposit_decision(status)
        answer = {"unique_id": verified["unique_id"], "cn_api_id": verified["cn_api_id"], "changenow_status": status}
        if decision == rules.WAIT:
            raise errors.TransientError(f"ChangeNOW exchange is still '{status}'; retry later", **answer)
        if decision == rules.ALREADY_FUNDED:
            log.warning("exchange %s already funded; no second transfer", verified["cn_api_id"])
            return {"status": "already_funded", "message": "The exchange already received its deposit", **answer}
        if decision == rules.REVIEW:
            return {**review(rules.rejected_exchange_review(verified, status)), **answer}
        task = send(hops.EXECUTE_PAYMENT, rules.execution_order(verified), config.GCHOSTPAY3_QUEUE,
                    config.GCHOSTPAY3_URL, f"gchostpay3:{verified['unique_id']}")
        return {"status": "success", "message": "Status verified, payment execution enqueued", **answer,
                "task_id": task}

    @app.token_task("/payment-completed", hops.PAYMENT_COMPLETED, clock=clock)
    def payment_completed(completed: dict, _token: str):
        """Finish a payout after GCHostPay3's transfer: close its payout batch, or follow its batch conversion."""
        unique_id, context = completed["unique_id"], rules.payout_context(completed["unique_id"])
        answer = {name: completed[name] for name in ("unique_id", "cn_api_id", "tx_hash", "tx_status", "gas_used",
                                                      "block_number")}
        if context == rules.THRESHOLD:
            return {**answer, **rules.threshold_callback_unimplemented(unique_id)}
        if context == rules.BATCH:
            callback = follow_conversion(unique_id, completed["cn_api_id"], completed["tx_hash"], retry_count=0)
            return {"status": "success", "message": "Payment workflow completed", **answer, "callback": callback}
        with database.transaction() as tx:
            batch_id = rules.complete_payout_batch(tx, unique_id, completed["tx_hash"], completed["tx_status"])
        return {"status": "success", "message": "Payment workflow completed", **answer, "payout_batch_id": batch_id}

    @app.token_task("/retry-callback-check", hops.CALLBACK_RETRY, clock=clock)
    def retry_callback_check(retry: dict, _token: str):
        """Look at a batch conversion again after the scheduled delay."""
        if retry["context"] != rules.BATCH:
            return rules.threshold_callback_unimplemented(retry["unique_id"])
        return follow_conversion(retry["unique_id"], retry["cn_api_id"], retry["tx_hash"], retry["retry_count"])

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
