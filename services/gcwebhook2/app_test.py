"""GCWebhook2 against the legacy T2 vector, real PostgreSQL and the Telegram stand-in."""
from __future__ import annotations

import logging
import threading
import time
import types
from decimal import Decimal

import pytest

from telepay_shared import hops, tokens
from telepay_shared.standins.telegram import TelegramStandIn
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS
from telepay_shared.testing.tasks_emulator import free_port

from services.gcwebhook2.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T2 = VECTORS["hops"]["gcwebhook1->gcwebhook2"]
USER, CHANNEL = T2["fields"]["user_id"], T2["fields"]["closed_channel_id"]
BOT_TOKEN = "5550002:gcwebhook2-app-test"
PAYMENT_ID = 5077125051


@pytest.fixture
def telegram():
    with TelegramStandIn(tokens=(BOT_TOKEN,)) as standin:
        yield standin


@pytest.fixture
def make_client(load_service_config, database_url, telegram):
    """Clients of the service wired to the test database and the Telegram stand-in."""

    def make(**env):
        values = {**KEYS, "DATABASE_URL": database_url, "TELEGRAM_BOT_SECRET_NAME": BOT_TOKEN,
                  "TELEGRAM_API_URL": telegram.url, **env}
        return create_app(load_service_config(CONFIG_PATH, values)).test_client()

    return make


@pytest.fixture
def paid(database):
    """Record the customer's subscription row as np-webhook leaves it; returns a function to change it."""
    with database.transaction() as tx:
        tx.execute("INSERT INTO private_channel_users_database (user_id, private_channel_id, nowpayments_payment_id,"
                   " nowpayments_payment_status, nowpayments_outcome_amount_usd, nowpayments_price_amount)"
                   " VALUES (%s, %s, %s, 'finished', 13.800552, 15)", (USER, str(CHANNEL), str(PAYMENT_ID)))

    def change(assignments: str, *params) -> None:
        with database.transaction() as tx:
            tx.execute(f"UPDATE private_channel_users_database SET {assignments}", params)

    return change


@pytest.fixture
def client(make_client, paid):
    return make_client()


def fresh_t2(**changes) -> str:
    return tokens.encode(hops.INVITE, {**T2["fields"], **changes}, KEYS)


def invite_state(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT payment_id, telegram_invite_sent, telegram_invite_link FROM processed_payments")


def test_legacy_t2_vector_sends_one_single_use_invite(client, database, telegram, monkeypatch):
    monkeypatch.setattr(tokens, "time", types.SimpleNamespace(time=lambda: VECTORS["created_at"] + 60))
    answer = client.post("/", json={"token": T2["token"], "payment_id": PAYMENT_ID})
    assert answer.status_code == 200, answer.json
    assert answer.json == {"status": "success", "message": "Telegram invite sent successfully", "user_id": USER,
                           "channel_id": CHANNEL, "payment_id": PAYMENT_ID}
    [link] = telegram.invite_links.values()
    assert (link["chat_id"], link["member_limit"]) == (CHANNEL, 1)
    assert abs(link["expire_date"] - (time.time() + 3600)) < 60
    [message] = telegram.messages_to(USER)
    assert message["text"] == f"✅ You've been granted access!\nHere is your one-time invite link:\n{link['invite_link']}"
    assert message["link_preview_disabled"] is True
    assert invite_state(database) == [{"payment_id": PAYMENT_ID, "telegram_invite_sent": True,
                                       "telegram_invite_link": link["invite_link"]}]


def test_redelivery_does_not_invite_twice(client, telegram):
    body = {"token": fresh_t2(), "payment_id": str(PAYMENT_ID)}
    assert client.post("/", json=body).status_code == 200
    again = client.post("/", json=body)
    assert (again.status_code, again.json["message"]) == (200, "Telegram invite already sent")
    assert len(telegram.messages) == 1 and len(telegram.invite_links) == 1


def test_token_minted_a_little_ahead_of_our_clock_is_accepted(client, telegram):
    """Defect 31: legacy read any future minute stamp as ~45 days old and rejected the invite."""
    ahead = tokens.encode(hops.INVITE, T2["fields"], KEYS, now=time.time() + 120)
    assert client.post("/", json={"token": ahead, "payment_id": PAYMENT_ID}).status_code == 200
    too_far = tokens.encode(hops.INVITE, T2["fields"], KEYS, now=time.time() + 900)
    assert client.post("/", json={"token": too_far, "payment_id": PAYMENT_ID}).json["reason"] == "future"
    assert len(telegram.messages) == 1


def test_concurrent_deliveries_send_one_invite(make_client, paid, database, telegram):
    body, answers = {"token": fresh_t2(), "payment_id": PAYMENT_ID}, []
    with database.transaction() as tx:  # np-webhook has recorded the payment, as in production
        tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)",
                   (PAYMENT_ID, USER, CHANNEL))
    threads = [threading.Thread(target=lambda c=c: answers.append(c.post("/", json=body).status_code))
               for c in [make_client() for _ in range(3)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]
    assert len(telegram.messages) == 1 and len(telegram.invite_links) == 1


@pytest.mark.parametrize("assignments, params", [
    ("nowpayments_payment_id = NULL", ()),
    ("nowpayments_payment_status = %s", ("confirming",)),
    ("private_channel_id = %s", ("-1000000000001",)),  # no subscription row for this channel yet
])
def test_payment_not_yet_confirmed_is_retried(client, paid, database, telegram, assignments, params):
    paid(assignments, *params)
    answer = client.post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID})
    assert (answer.status_code, answer.json["error"]) == (503, "payment_not_confirmed")
    assert telegram.requests_seen == [] and invite_state(database) == []


@pytest.mark.parametrize("usd, price, env, sent", [
    ("7.49", "15", {}, False),        # below 50 % of 15.0
    ("7.50", "15", {}, True),
    (None, "11.24", {}, False),      # no USD value: the invoiced price must reach 75 %
    (None, "11.25", {}, True),
    (None, None, {}, False),
    ("13.80", "15", {"PAYMENT_MIN_TOLERANCE": "0.95"}, False),
])
def test_amount_tolerance(make_client, paid, database, telegram, caplog, usd, price, env, sent):
    paid("nowpayments_outcome_amount_usd = %s, nowpayments_price_amount = %s",
         *(None if v is None else Decimal(v) for v in (usd, price)))
    answer = make_client(**env).post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID})
    assert (answer.status_code == 200) is sent and len(telegram.messages) == int(sent)
    if not sent:
        assert (answer.status_code, answer.json["error"]) == (400, "payment_below_tolerance")
        assert any(r.levelno == logging.ERROR and "below tolerance" in r.getMessage() for r in caplog.records)
        assert invite_state(database) == []


def test_flood_control_answers_429_with_telegrams_delay_and_retry_sends(client, telegram):
    telegram.inject_fault("sendMessage", "rate_limit", retry_after=12)
    body = {"token": fresh_t2(), "payment_id": PAYMENT_ID}
    answer = client.post("/", json=body)
    assert (answer.status_code, answer.headers["Retry-After"]) == (429, "12")
    assert client.post("/", json=body).status_code == 200
    assert len(telegram.messages) == 1


def test_telegram_outage_is_retried(client, database, telegram):
    telegram.inject_fault("createChatInviteLink", "server_error")
    assert client.post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID}).status_code == 503
    assert telegram.messages == [] and invite_state(database) == []


def test_channel_refusing_invites_is_retried_with_an_error_log(client, telegram, caplog):
    telegram.set_chat(CHANNEL, bot_is_admin=False)
    answer = client.post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID})
    assert (answer.status_code, answer.json["error"]) == (503, "channel_refuses_invites")
    assert any(r.levelno == logging.ERROR for r in caplog.records) and telegram.messages == []


def test_customer_who_blocked_the_bot_is_dropped_and_the_link_kept(client, database, telegram):
    telegram.set_chat(USER, blocked_bot=True)
    answer = client.post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID})
    assert (answer.status_code, answer.json["error"]) == (400, "telegram_rejected")
    [state] = invite_state(database)
    assert state["telegram_invite_sent"] is False
    assert state["telegram_invite_link"] in telegram.invite_links


@pytest.mark.parametrize("body, status", [
    ({"payment_id": PAYMENT_ID}, 400),
    ({"token": "not-a-token", "payment_id": PAYMENT_ID}, 401),
    ({"token": tokens.encode(hops.INVITE, T2["fields"], KEYS, now=time.time() - 86400 - 120), "payment_id": 1}, 401),
    ({"token": tokens.encode(hops.INVITE, T2["fields"], {hops.SUCCESS_KEY: "other"}), "payment_id": 1}, 401),
    ({"token": (lambda t: t[:40] + ("B" if t[40] == "A" else "A") + t[41:])(fresh_t2()), "payment_id": 1}, 401),
    ({"token": fresh_t2(), "payment_id": "12x"}, 400),
    ({"token": fresh_t2(), "payment_id": 0}, 400),
    ({"token": fresh_t2(subscription_price="free"), "payment_id": PAYMENT_ID}, 400),
])
def test_rejections_touch_nothing(client, database, telegram, body, status):
    assert client.post("/", json=body).status_code == status
    assert telegram.requests_seen == [] and invite_state(database) == []


def test_payment_of_another_subscriber_is_refused(client, database, telegram):
    with database.transaction() as tx:
        tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, 42, %s)",
                   (PAYMENT_ID, CHANNEL))
    answer = client.post("/", json={"token": fresh_t2(), "payment_id": PAYMENT_ID})
    assert answer.status_code == 409 and telegram.requests_seen == []


def test_bad_json_is_a_bad_request(client):
    assert client.post("/", data="{", content_type="application/json").status_code == 400


def test_health(client, make_client):
    assert client.get("/health").status_code == 200
    down = make_client(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/telepay")
    assert down.get("/health").status_code == 503
