"""GCWebhook1: routes a validated payment to its payout and queues the customer's invite (spec §4.2).

POST /process-validated-payment (np-webhook's task, authenticated: defect 1)  ->  instant: T3 to
GCSplit1, threshold: credit to GCAccumulator  ->  T2 invite to GCWebhook2  ->  processed_payments
marked. Everything is checked before the first task exists (defect 8); every task is named after
the payment, so a redelivery after a partial attempt completes it without duplicating anything, and
a payment already routed answers 200 with no new task. GET /?token=T1 is the legacy success URL.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import flask

from telepay_shared import errors, hops, tokens, web
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcwebhook1 import rules

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None,
               tasks: TasksClient | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database, tasks = database or Database.from_env(config), tasks or TasksClient.from_config(config)
    app = web.create_app(config.service, config, health_checks={"database": database.ping},
                         hmac_secret=config.SUCCESS_URL_SIGNING_KEY)

    @app.post("/process-validated-payment")
    @app.auth.required
    def process_validated_payment():
        """Queue the payout and the invite of one finished payment, once."""
        body = web.json_body()
        if not rules.is_finished(body):
            return {"status": "rejected", "defense_layer": "gcwebhook1_second_layer",
                    "message": "payment_status is not finished", "payment_status": body.get("payment_status")}
        payment = rules.validated_payment(body)
        web.bind_log_context(payment_id=payment.payment_id)
        invite = rules.invite_task(payment, config)
        with database.transaction() as tx:
            # The row lock makes a concurrent redelivery wait, then find the payment routed.
            if not rules.claim_payment(tx, payment):
                return {"status": "success", "message": "Payment already processed", "payment_id": payment.payment_id}
            mode = rules.payout_mode(tx, payment.closed_channel_id)
            if mode == rules.THRESHOLD:
                credit, headers = rules.threshold_credit(payment, rules.subscription_id(tx, payment), _utc_now(),
                                                         config[hops.SUCCESS_KEY].reveal())
                tasks.enqueue(config.GCACCUMULATOR_QUEUE, config.GCACCUMULATOR_URL, None, raw_body=credit,
                              headers=headers, idempotency_key=f"gcaccumulator:np:{payment.payment_id}")
            else:
                split, headers = rules.instant_payout(payment, config)
                tasks.enqueue(config.GCSPLIT1_QUEUE, config.GCSPLIT1_URL, None, raw_body=split, headers=headers,
                              idempotency_key=f"gcsplit1:np:{payment.payment_id}")
            # A failed invite enqueue rolls the mark back and answers 5xx: the customer is never left out (defect 20).
            tasks.enqueue(config.GCWEBHOOK2_QUEUE, config.GCWEBHOOK2_URL, invite,
                          idempotency_key=f"gcwebhook2:{payment.payment_id}")
            rules.mark_routed(tx, payment.payment_id)
        return {"status": "success", "message": f"Payment routed ({mode}) and invite queued", "payout_mode": mode,
                "payment_id": payment.payment_id, "outcome_amount_usd": str(payment.outcome_usd),
                "declared_price": payment.subscription_price,
                "difference": str(payment.outcome_usd - payment.declared_price)}

    @app.get("/")
    def success_url():
        """Legacy success URL: record the subscription a T1 token describes."""
        token = flask.request.args.get("token", "").strip()
        if not token:
            raise errors.BadRequest("missing token", field="token")
        subscription = tokens.decode(hops.SUCCESS_URL, token, config)
        web.bind_log_context(user_id=subscription["user_id"])
        # Stamped when the URL was minted, not when it is opened: a replayed URL rewrites the same subscription.
        minted = datetime.fromtimestamp(subscription[tokens.TIMESTAMP], timezone.utc).replace(tzinfo=None)
        with database.transaction() as tx:
            rules.record_success_url(tx, subscription, minted)
        return {"status": "ok"}

    return app


def _utc_now() -> datetime:
    """Naive UTC wall time, as the legacy columns store it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
