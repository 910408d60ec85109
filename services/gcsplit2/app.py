"""GCSplit2: the stateless ChangeNOW estimator between GCSplit1's two halves (spec §4.5).

POST /  {"token": T4}  ->  ChangeNOW estimate  ->  Cloud Task {"token": T5} to GCSplit1's
/usdt-eth-estimate. Wire-compatible with the legacy GCSplit1; ChangeNOW problems answer 4xx
(rejected: Cloud Tasks stops) or 5xx/429 (Cloud Tasks retries) instead of sleeping in the request.
"""
from __future__ import annotations

from pathlib import Path

import flask

from telepay_shared import hops, tokens, web
from telepay_shared.changenow import ChangeNowClient
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration

from services.gcsplit2 import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, changenow: ChangeNowClient | None = None,
               tasks: TasksClient | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    changenow, tasks = changenow or ChangeNowClient.from_config(config), tasks or TasksClient.from_config(config)
    app = web.create_app(config.service, config)

    @app.token_task("/", hops.ESTIMATE_REQUEST)
    def estimate(request: dict, token: str):
        """Quote the payout swap and hand the numbers back to GCSplit1."""
        response = tokens.encode(hops.ESTIMATE_RESPONSE, rules.quote(request, changenow), config)
        # A redelivered T4 maps to the same task name, so Cloud Tasks refuses a second T5.
        task = tasks.enqueue(
            config.GCSPLIT2_RESPONSE_QUEUE, config.GCSPLIT1_ESTIMATE_RESPONSE_URL, {"token": response},
            idempotency_key=f"gcsplit2:{request.get('payout_key') or token}",
        )
        return {"status": "success", "message": "Estimate sent to GCSplit1", "task_id": task}

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
