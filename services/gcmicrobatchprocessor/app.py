"""GCMicroBatchProcessor: converts pooled threshold credits from ETH to USDT in one swap (spec §4.8).

POST /check-threshold  (Cloud Scheduler)  ->  claim the pending credits into a batch once they reach
    MICRO_BATCH_THRESHOLD_USD, create the ChangeNOW eth->usdt exchange for their fee-free ETH, and
    send T15 to GCHostPay1, which pays the deposit from the host wallet. Unfinished batches of
    earlier runs are resumed first.
POST /swap-executed  {"token": T16}  ->  distribute the USDT received over the batch's credits.
"""
from __future__ import annotations

from pathlib import Path

import flask

from telepay_shared import hops, tokens, web
from telepay_shared.changenow import ChangeNowClient
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcmicrobatchprocessor import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None,
               changenow: ChangeNowClient | None = None, tasks: TasksClient | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database = database or Database.from_env(config)
    changenow = changenow or ChangeNowClient.from_config(config)
    tasks = tasks or TasksClient.from_config(config)
    hostpay_url = config.GCHOSTPAY1_URL.rstrip("/") + "/"
    app = web.create_app(config.service, config, hmac_secret=config.SUCCESS_URL_SIGNING_KEY)

    def hand_over(order: dict) -> str:
        """Send T15 to GCHostPay1 under the batch's task name, then stop resuming the batch."""
        batch_id = order["batch_conversion_id"]
        # GCHostPay1 calls the batch "batch_<id>"; a resumed batch maps to the same task name.
        task = tasks.enqueue(config.GCHOSTPAY1_BATCH_QUEUE, hostpay_url,
                             {"token": tokens.encode(hops.MICROBATCH_ORDER, order, config)},
                             idempotency_key=f"gchostpay1:batch_{batch_id}")
        rules.mark_handed_off(database, batch_id)
        return task

    @app.post("/check-threshold")
    @app.auth.required
    def check_threshold():
        """Open a batch when the pending credits reach the threshold, and push every unfinished batch on."""
        threshold = config.MICRO_BATCH_THRESHOLD_USD
        claim = rules.claim_pending_credits(database, threshold)
        web.bind_log_context(batch_conversion_id=claim.batch_conversion_id)
        handed_over = rules.advance_batches(database, changenow, config.HOST_WALLET_USDT_ADDRESS, hand_over)
        return rules.threshold_answer(claim, threshold, handed_over)

    @app.token_task("/swap-executed", hops.MICROBATCH_SWAP_EXECUTED)
    def swap_executed(executed: dict, _token: str):
        """Distribute the USDT GCHostPay1 saw arrive."""
        return rules.complete_swap(database, executed)

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
