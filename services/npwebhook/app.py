"""np-webhook: the NowPayments IPN receiver that starts the pipeline (spec §4.1).

POST /  (IPN, x-nowpayments-sig)  ->  subscription row paid  ->  Cloud Task to GCWebhook1's
/process-validated-payment, signed with X-Webhook-Signature. A notification is answered 200 only
once its payment is forwarded (or was already handled); a missing USD price or a failed enqueue
answers 503 so NowPayments delivers it again (defect 19). GET /api/payment-status and
GET /payment-processing serve the customer's landing page.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import flask

from telepay_shared import errors, hops, tokens, web
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.npwebhook import rules
from services.npwebhook.prices import CoinGeckoPrices

CONFIG_PATH = Path(__file__).with_name("service_config.json")
LANDING_PAGE = Path(__file__).with_name("payment_processing.html")


def create_app(config: Config | None = None, *, database: Database | None = None, tasks: TasksClient | None = None,
               prices=None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database = database or Database.from_env(config)
    tasks = tasks or TasksClient.from_config(config)
    prices = prices or CoinGeckoPrices.from_config(config)
    forward_url = config.GCWEBHOOK1_URL.rstrip("/") + "/process-validated-payment"
    app = web.create_app(config.service, config, health_checks={"database": database.ping})

    @app.post("/")
    def payment_notification():
        """Record a finished payment and forward it to GCWebhook1; other statuses are only acknowledged."""
        notification = web.json_body()
        rules.verify_signature(flask.request.get_data(cache=True), flask.request.headers.get("x-nowpayments-sig"), config)
        status = rules.payment_status(notification)
        if status != rules.FINISHED:
            return {"status": "acknowledged", "message": f"IPN received but payment not finished ({status})",
                    "payment_id": notification.get("payment_id"), "current_status": status,
                    "required_status": rules.FINISHED}
        payment = rules.finished_payment(notification)
        web.bind_log_context(payment_id=payment.payment_id)
        with database.transaction() as tx:
            channel = rules.paid_channel(tx, payment)
            rules.record_payment(tx, payment, channel, datetime.now(timezone.utc).replace(tzinfo=None))
        usd = rules.outcome_usd(payment, prices)
        # The row lock serialises concurrent deliveries; the task name makes a repeated enqueue a no-op.
        with database.transaction() as tx:
            subscription = rules.claim_forwarding(tx, payment, channel)
            if subscription is None:
                return {"status": "success", "message": "IPN processed (already handled)",
                        "payment_id": payment.payment_id}
            rules.store_outcome_usd(tx, subscription, payment, usd)
            body, headers = rules.signed_json(rules.validated_payment(payment, channel, subscription, usd),
                                              config[hops.SUCCESS_KEY].reveal())
            tasks.enqueue(config.GCWEBHOOK1_QUEUE, forward_url, None, raw_body=body, headers=headers,
                          idempotency_key=f"gcwebhook1:{payment.payment_id}")
        return {"status": "success", "message": "IPN processed", "payment_id": payment.payment_id}

    @app.get("/api/payment-status")
    def payment_status():
        """The landing page's poll: is the order's payment confirmed yet?"""
        order_id = flask.request.args.get("order_id", "").strip()
        if not order_id:
            raise errors.BadRequest("Missing order_id parameter", field="order_id")
        rules.check_status_access(order_id, flask.request.args.get("sig"), config.PAYMENT_STATUS_ACCESS,
                                  config[hops.SUCCESS_KEY].reveal())
        with database.transaction() as tx:
            return rules.landing_status(tx, order_id)

    @app.get("/payment-processing")
    def payment_processing():
        """The landing page NowPayments sends the customer to after paying."""
        return flask.Response(LANDING_PAGE.read_bytes(), mimetype="text/html")

    @app.after_request
    def allow_landing_page_origins(response: flask.Response) -> flask.Response:
        """CORS for the status API, for landing pages still served from legacy origins."""
        origin = flask.request.headers.get("Origin")
        if flask.request.path.startswith("/api/") and rules.cors_allowed(origin):
            response.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                                     "Access-Control-Allow-Methods": "GET, OPTIONS",
                                     "Access-Control-Allow-Headers": "Content-Type, Accept"})
        return response

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
