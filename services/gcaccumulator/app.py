"""GCAccumulator: records a threshold-mode payment as a pending USD credit (spec §4.7).

POST /  (GCWebhook1's JSON, spec §5)  ->  one payout_accumulation row per NowPayments payment.
Legacy accepted anyone's JSON (defect 1) and credited every redelivery again (defect 21); here the
body must be signed (TP_AUTH_MODE, default hmac) and the payment id is the row's unique key.
"""
from __future__ import annotations

from pathlib import Path

import flask

from telepay_shared import web
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcaccumulator import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database = database or Database.from_env(config)
    app = web.create_app(config.service, config, hmac_secret=config.SUCCESS_URL_SIGNING_KEY)

    @app.post("/")
    @app.auth.required
    def accumulate():
        """Credit the client's threshold balance with the payment, net of the platform fee."""
        body = web.json_body()
        web.require_fields(body, *rules.REQUIRED_FIELDS)
        credit = rules.credit_for(body, config.TP_FLAT_FEE)
        web.bind_log_context(payment_id=credit.nowpayments_payment_id, client_id=credit.client_id)
        return rules.answer(*rules.record_credit(database, credit))

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
