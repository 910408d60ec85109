"""GCWebhook2: sends the customer a single-use invite to the private channel, once per payment (spec §4.3).

POST /  {"token": T2, "payment_id"}  ->  payment checked in the database (§8.6)  ->  Telegram
createChatInviteLink + sendMessage  ->  processed_payments.telegram_invite_sent. The payment's
processed_payments row is locked for the whole delivery, so two concurrent deliveries cannot both
send. A payment not yet confirmed answers 503 (retried); one paid too little answers 4xx (dropped,
logged as ERROR).
"""
from __future__ import annotations

import time
from pathlib import Path

import flask

from telepay_shared import hops, tokens, web
from telepay_shared.config import Config, load_config, read_declaration
from telepay_shared.db import Database

from services.gcwebhook2 import rules
from services.gcwebhook2.telegram import TelegramBot

CONFIG_PATH = Path(__file__).with_name("service_config.json")


def create_app(config: Config | None = None, *, database: Database | None = None,
               bot: TelegramBot | None = None) -> flask.Flask:
    """Build the service from its declared configuration (read from the environment by default)."""
    config = config or load_config(CONFIG_PATH)
    database, bot = database or Database.from_env(config), bot or TelegramBot.from_config(config)
    app = web.create_app(config.service, config, health_checks={"database": database.ping})

    @app.post("/")
    @app.auth.required
    def send_invite():
        """Invite the paying customer to the channel the T2 token names."""
        token, payment_id = web.require_fields(web.json_body(), "token", "payment_id")
        invite = tokens.decode(hops.INVITE, token, config)
        payment_id = rules.payment_id(payment_id)
        web.bind_log_context(payment_id=payment_id, user_id=invite["user_id"])
        with database.transaction() as tx:
            state = rules.claim_invite(tx, payment_id, invite)
            if state["telegram_invite_sent"]:
                return {"status": "success", "message": "Telegram invite already sent", "payment_id": payment_id,
                        "invite_sent_at": str(state["telegram_invite_sent_at"])}
            rules.check_payment(tx, invite, config.PAYMENT_MIN_TOLERANCE, config.PAYMENT_FALLBACK_TOLERANCE)
            refusal = rules.deliver_invite(tx, bot, payment_id, invite, time.time())
        if refusal is not None:
            raise refusal  # after the commit, so the created link stays on record
        return {"status": "success", "message": "Telegram invite sent successfully", "user_id": invite["user_id"],
                "channel_id": invite["closed_channel_id"], "payment_id": payment_id}

    return app


if __name__ == "__main__":
    web.serve(create_app, service_name=read_declaration(CONFIG_PATH).service)
