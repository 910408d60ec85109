"""GCHostPay2: the exchange status check between GCHostPay1's order and its payment (spec §4.11).

POST /  {"token": T10}  ->  ChangeNOW by-id  ->  Cloud Task {"token": T11} to GCHostPay1's
/status-verified. Wire-compatible with legacy GCHostPay1; an unknown exchange answers 404 (Cloud
Tasks stops) and a ChangeNOW outage 5xx/429 (Cloud Tasks retries) instead of 500 for both.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import flask

from telepay_shared import hops, tokens, web
from telepay_shared.changenow import ChangeNowClient
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration

from services.gchostpay2 import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, changenow: ChangeNowClient | None = None,
               tasks: TasksClient | None = None, clock: Callable[[], float] = time.time) -> flask.Flask:
    """Build the service; configuration, ChangeNOW and Cloud Tasks default to the deployment's own."""
    config = config or load_config(CONFIG_PATH)
    status_verified_url = rules.status_verified_url(config.GCHOSTPAY1_URL)
    changenow, tasks = changenow or ChangeNowClient.from_config(config), tasks or TasksClient.from_config(config)
    app = web.create_app(config.service, config)

    @app.token_task("/", hops.STATUS_CHECK, clock=clock)
    def check_status(order: dict, _token: str):
        """Read the exchange's status and report it to GCHostPay1."""
        verified = rules.verified_status(order, changenow)
        # The status is part of the key: a redelivery reporting the same status is refused by
        # Cloud Tasks, while a later check that sees the exchange move on is a new report.
        task = tasks.enqueue(
            config.GCHOSTPAY1_RESPONSE_QUEUE, status_verified_url,
            {"token": tokens.encode(hops.STATUS_VERIFIED, verified, config, now=clock())},
            idempotency_key=f"status-verified:{order['unique_id']}:{verified['status']}",
        )
        return {"status": "success", "message": "Status verified and sent to GCHostPay1",
                "unique_id": order["unique_id"], "cn_api_id": order["cn_api_id"],
                "changenow_status": verified["status"], "task_id": task}

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
