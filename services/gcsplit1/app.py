"""GCSplit1: the payout orchestrator (spec §4.4, §9).

POST /                   T3 (signed JSON, instant payment)  -> T4 to GCSplit2
POST /batch-payout       T9 (threshold batch)               -> T4 to GCSplit2
POST /usdt-eth-estimate  T5 (estimate)  -> split_payout_request -> T6 to GCSplit3
POST /eth-client-swap    T7 (exchange)  -> split_payout_que     -> T8 to GCHostPay1

Wire-compatible with the legacy GCSplit1. Every step is keyed by the payout (services/README.md):
a redelivered or replayed request finds its record and re-enqueues under the same task name, so
no payout is requested, recorded or paid twice (defects 3, 9).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import flask

from telepay_shared import errors, hops, tokens, web
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcsplit1 import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")
SIGNATURE_HEADER = hops.SIGNATURE_HEADERS[hops.INSTANT_SPLIT.name]

log = logging.getLogger(__name__)


def create_app(config: Config | None = None, *, database: Database | None = None,
               tasks: TasksClient | None = None, clock: Callable[[], float] = time.time) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database = database or Database.from_env(config)
    tasks = tasks or TasksClient.from_config(config)
    app = web.create_app(config.service, config, health_checks={"database": database.ping})

    def request_estimate(estimate_request: dict, message: str, **answer) -> dict:
        """Send T4 to GCSplit2 unless this payout already has its split_payout_request."""
        payout_key = estimate_request["payout_key"]
        web.bind_log_context(payout_key=payout_key)
        with database.transaction() as tx:
            unique_id = rules.payout_request_id(tx, payout_key)
        if unique_id is not None:  # a replay or a late redelivery: the payout is under way
            return {"status": "success", "message": f"{message} (already accepted)", **answer,
                    "unique_id": unique_id, "idempotent": True}
        token = tokens.encode(hops.ESTIMATE_REQUEST, estimate_request, config, now=clock())
        task = tasks.enqueue(config.GCSPLIT2_QUEUE, config.GCSPLIT2_URL, {"token": token},
                             idempotency_key=f"gcsplit2:{payout_key}")
        return {"status": "success", "message": message, **answer, "task_id": task}

    @app.post("/")
    @app.auth.required
    def instant_payment():
        """Deduct the platform fee from a validated payment and ask GCSplit2 for an estimate."""
        body, signature = flask.request.get_data(cache=True), flask.request.headers.get(SIGNATURE_HEADER)
        if not signature:  # checked whatever the configuration: legacy skipped it without a key (defect 2)
            raise errors.Unauthorized(f"missing {SIGNATURE_HEADER} header")
        payment = tokens.decode_signed_body(hops.INSTANT_SPLIT, body, signature, config, now=clock())
        payout_key = rules.instant_payout_key(payment, body)
        estimate_request = rules.instant_estimate_request(payment, config.TP_FLAT_FEE, payout_key)
        return request_estimate(estimate_request, "Payment split request accepted")

    @app.token_task("/batch-payout", hops.BATCH_PAYOUT, clock=clock)
    def batch_payout(batch: dict, _token: str):
        """Ask GCSplit2 for an estimate of a client's threshold balance (batch_mode is only informative)."""
        estimate_request = rules.batch_estimate_request(batch)
        return request_estimate(estimate_request, "Batch payout request accepted", batch_id=batch["batch_id"])

    @app.token_task("/usdt-eth-estimate", hops.ESTIMATE_RESPONSE, clock=clock)
    def estimate_received(estimate: dict, token: str):
        """Record the payout request once per payout key and ask GCSplit3 for the exchange."""
        payout_key = rules.estimate_payout_key(estimate, token)
        web.bind_log_context(payout_key=payout_key)
        with database.transaction() as tx:
            unique_id, created = rules.record_payout_request(tx, estimate, payout_key)
        web.bind_log_context(unique_id=unique_id)
        swap = tokens.encode(hops.SWAP_REQUEST, rules.swap_request(unique_id, estimate), config, now=clock())
        # Always re-enqueued: repairs the chain if the first enqueue failed; the name stops a duplicate.
        task = tasks.enqueue(config.GCSPLIT3_QUEUE, config.GCSPLIT3_URL, {"token": swap},
                             idempotency_key=f"gcsplit3:{unique_id}")
        return {"status": "success", "message": "Estimate recorded, swap requested", "unique_id": unique_id,
                "task_id": task, "idempotent": not created}

    @app.token_task("/eth-client-swap", hops.SWAP_RESPONSE, clock=clock)
    def exchange_created(swap: dict, _token: str):
        """Record the payout's exchange (the first one wins) and order GCHostPay1 to pay it."""
        order = rules.hostpay_order(swap)
        with database.transaction() as tx:
            recorded, created = rules.record_exchange(tx, swap)
        answer = {"status": "success", "unique_id": swap["unique_id"], "cn_api_id": recorded,
                  "idempotent": not created}
        if recorded != swap["cn_api_id"]:
            # Never funded, so the extra exchange costs nothing; paying it would pay the client twice.
            log.warning("payout already has exchange %s; exchange %s ignored", recorded, swap["cn_api_id"])
            return {**answer, "message": "Payout already has an exchange; this one is ignored",
                    "ignored_cn_api_id": swap["cn_api_id"]}
        task = tasks.enqueue(config.HOSTPAY_QUEUE, config.HOSTPAY_WEBHOOK_URL,
                             {"token": tokens.encode(hops.HOSTPAY_ORDER, order, config, now=clock())},
                             idempotency_key=f"gchostpay1:{swap['unique_id']}")
        return {**answer, "message": "Swap processed and HostPay trigger enqueued", "task_id": task}

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
