"""GCSplit3: creates the ChangeNOW exchange a payout travels through (spec §4.6).

POST /             {"token": T6}   ->  ChangeNOW exchange  ->  Cloud Task {"token": T7} to GCSplit1's
                                       /eth-client-swap
POST /eth-to-usdt  {"token": T18}  ->  ChangeNOW ETH -> USDT exchange  ->  {"token": T19} to GCAccumulator

Wire-compatible with the legacy GCSplit3. ChangeNOW problems answer 4xx (rejected: Cloud Tasks
stops) or 5xx/429 (Cloud Tasks retries) instead of sleeping in the request (defect 24). Without a
database, a redelivered task creates a second exchange; the response task is named after the
payout, and GCSplit1 records only the first exchange it hears of, so only one is ever paid.
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

from services.gcsplit3 import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, changenow: ChangeNowClient | None = None,
               tasks: TasksClient | None = None, clock: Callable[[], float] = time.time) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    changenow, tasks = changenow or ChangeNowClient.from_config(config), tasks or TasksClient.from_config(config)
    app = web.create_app(config.service, config)

    @app.token_task("/", hops.SWAP_REQUEST, clock=clock)
    def payout_exchange(request: dict, _token: str):
        """Create the payout's exchange and hand its deposit address back to GCSplit1."""
        exchange = rules.create_payout_exchange(request, changenow)
        web.bind_log_context(cn_api_id=exchange.exchange_id)
        response = tokens.encode(hops.SWAP_RESPONSE, rules.swap_response(request, exchange), config, now=clock())
        # Named after the payout: while Cloud Tasks remembers the name, a second exchange is not reported.
        task = tasks.enqueue(config.GCSPLIT3_RESPONSE_QUEUE, config.GCSPLIT1_SWAP_RESPONSE_URL, {"token": response},
                             idempotency_key=f"gcsplit1-swap:{request['unique_id']}")
        return {"status": "success", "message": "Exchange created, swap response sent to GCSplit1",
                "unique_id": request["unique_id"], "cn_api_id": exchange.exchange_id, "task_id": task}

    @app.token_task("/eth-to-usdt", hops.ACCUMULATOR_SWAP_REQUEST, clock=clock)
    def accumulator_exchange(request: dict, _token: str):
        """Create an accumulation's ETH -> USDT exchange and tell GCAccumulator where to pay."""
        web.bind_log_context(accumulation_id=request["accumulation_id"])
        target = rules.swap_created_target(config)
        exchange = rules.create_accumulator_exchange(request, changenow)
        web.bind_log_context(cn_api_id=exchange.exchange_id)
        created = tokens.encode(hops.ACCUMULATOR_SWAP_CREATED, rules.accumulator_swap_created(request, exchange),
                                config, now=clock())
        task = tasks.enqueue(config.GCACCUMULATOR_RESPONSE_QUEUE, target, {"token": created},
                             idempotency_key=f"gcaccumulator-swap:{request['accumulation_id']}")
        return {"status": "success", "message": "ETH to USDT exchange created, GCAccumulator notified",
                "accumulation_id": request["accumulation_id"], "cn_api_id": exchange.exchange_id, "task_id": task}

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
