"""GCBatchProcessor: pays threshold clients whose converted USDT balance reached their threshold (spec §4.9).

POST /process  (Cloud Scheduler)  ->  per (client, wallet, currency, network) balance at or above
the channel's payout_threshold_usd: a payout_batches row owning exactly the credits summed, then
T9 {"token", "batch_mode": true} to GCSplit1's /batch-payout. Batches an earlier run could not
send are sent again, under the same task name.
"""
from __future__ import annotations

from pathlib import Path

import flask

from telepay_shared import hops, tokens, web
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcbatchprocessor import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None,
               tasks: TasksClient | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database, tasks = database or Database.from_env(config), tasks or TasksClient.from_config(config)
    batch_payout_url = config.GCSPLIT1_URL.rstrip("/") + "/batch-payout"
    app = web.create_app(config.service, config, hmac_secret=config.SUCCESS_URL_SIGNING_KEY)

    @app.post("/process")
    @app.auth.required
    def process():
        """Claim every due balance, then send every claimed batch not yet sent."""
        created = rules.claim_payouts(database)
        sent = [rules.batch_summary(batch, send_to_gcsplit1(batch)) for batch in rules.pending_batches(database)]
        return rules.process_answer(created, sent)

    def send_to_gcsplit1(batch: rules.PendingBatch) -> str:
        """Enqueue T9 under the batch's task name (a resend is refused by Cloud Tasks), then mark it processing."""
        batch_id = batch.token_fields["batch_id"]
        token = tokens.encode(hops.BATCH_PAYOUT, batch.token_fields, config)
        task = tasks.enqueue(config.GCSPLIT1_BATCH_QUEUE, batch_payout_url, {"token": token, "batch_mode": True},
                             idempotency_key=f"gcsplit1-batch:{batch_id}")
        rules.mark_processing(database, batch_id)
        return task

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
