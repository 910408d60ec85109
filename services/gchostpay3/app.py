"""GCHostPay3: the only holder of the host wallet key; pays the ChangeNOW deposit address (spec §4.12).

POST /  {"token": T12 from GCHostPay1, or T13 from itself}  ->  one ETH or ERC-20 (USDT, USDC,
DAI) transfer per unique_id, however often the order is delivered  ->  Cloud Task {"token": T14} to
GCHostPay1's /payment-completed. The protocol is in executor.py; answers:

  200 success / retry_scheduled / failed_permanently / pending_review (recorded in failed_transactions)
  400 an order that cannot be paid (amount, currency, network, address): recorded and alerted
  401 a token that fails verification (nothing recorded)
  503 not mined yet, wallet underfunded, node or database unavailable: Cloud Tasks redelivers
"""
from __future__ import annotations

from pathlib import Path

import flask

from telepay_shared import hops, web
from telepay_shared.alerts import Alerter
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gchostpay3 import rules
from services.gchostpay3.executor import PaymentExecutor, Settings
from services.gchostpay3.wallet import Wallet, node_redactor

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, tasks: TasksClient | None = None, database: Database | None = None,
               wallet: Wallet | None = None, alerter: Alerter | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    executor = PaymentExecutor(
        Settings.from_config(config), database=database or Database.from_env(config),
        wallet=wallet or Wallet.from_config(config), tasks=tasks or TasksClient.from_config(config),
        alerter=alerter or Alerter.from_config(config.service, config), assets=rules.assets_from_config(config),
        keys=config, redact=node_redactor(config),
    )
    app = web.create_app(config.service, config)

    # T12 and T13 share one layout; the retry fields are optional in EXECUTE_PAYMENT.
    @app.token_task("/", hops.EXECUTE_PAYMENT)
    def execute_payment(fields: dict, _token: str):
        """Send the ordered transfer once, whatever the number of deliveries (T12, T13)."""
        order = rules.order_from_token(fields)
        web.bind_log_context(attempt=order.attempt)
        retry_count = flask.request.headers.get("X-CloudTasks-TaskRetryCount", "").strip()
        return executor.execute(order, first_delivery=retry_count in ("", "0"))

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
