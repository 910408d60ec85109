"""np-webhook against the legacy IPN vector, real PostgreSQL, the Cloud Tasks emulator and a CoinGecko stand-in."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from google.api_core import exceptions as gexc

from telepay_shared import hops, tokens
from telepay_shared.config import ConfigError
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.testing.pytest_plugin import KEYS, TEST_LOCATION, TEST_PROJECT, VECTORS
from telepay_shared.testing.tasks_emulator import free_port

from services.npwebhook import rules
from services.npwebhook.app import CONFIG_PATH, create_app
from services.npwebhook.coingecko_standin import CoinGeckoStandIn

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
IPN = VECTORS["hops"]["nowpayments->np-webhook"]
USER, OPEN_CHANNEL, CLOSED_CHANNEL = 6271402111, "-1003268562225", "-1003999999999"
FORWARD_PATH = "/process-validated-payment"
_payment_ids = itertools.count(9_100_000_001)  # the emulator remembers task names for the whole session


@pytest.fixture
def coingecko():
    with CoinGeckoStandIn() as standin:
        yield standin


@pytest.fixture
def make_client(service_env, load_service_config, database_url, deliveries, coingecko):
    """Clients of the service wired to the test database, emulator, recorder and price stand-in."""

    def make(**overrides):
        env = service_env(CONFIG_PATH, **{"DATABASE_URL": database_url, "GCWEBHOOK1_URL": deliveries.url(""),
                                          "COINGECKO_API_URL": coingecko.url, **overrides.pop("env", {})})
        return create_app(load_service_config(CONFIG_PATH, env), **overrides).test_client()

    return make


@pytest.fixture
def client(make_client, database):
    with database.transaction() as tx:
        owner = tx.fetchvalue("INSERT INTO registered_users DEFAULT VALUES RETURNING user_id")
        tx.execute("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_wallet_address,"
                   " client_payout_currency, client_payout_network, sub_1_price, sub_1_time, sub_2_price, sub_2_time,"
                   " client_id) VALUES (%s, %s, '0x5a1b2c3d4e5f60718293a4b5c6d7e8f901234567', 'LINK', 'ETH',"
                   " 15.00, 31, 25.00, 60, %s)", (OPEN_CHANNEL, CLOSED_CHANNEL, owner))
    return make_client()


def finished(**changes) -> dict:
    """The legacy vector's notification under a payment id of its own, with changes."""
    return {**IPN["fields"], "payment_id": next(_payment_ids), **changes}


def post_ipn(client, fields: dict, key: str = KEYS[hops.IPN_KEY]):
    """POST the notification as NowPayments signs it (compact JSON, sorted keys)."""
    signed = tokens.encode(hops.NOWPAYMENTS_IPN, fields, {hops.IPN_KEY: key})
    return client.post("/", data=signed["body"], content_type="application/json",
                       headers={"x-nowpayments-sig": signed["signature"]})


def subscriptions(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT * FROM private_channel_users_database ORDER BY id")


def processed(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT * FROM processed_payments ORDER BY payment_id")


def forwarded(deliveries, count: int = 1) -> list[dict]:
    """The validated payments delivered to GCWebhook1, each checked against its X-Webhook-Signature."""
    got = deliveries.expect_exactly(count, quiet_s=0.5)
    for delivery in got:
        assert delivery.path == FORWARD_PATH
        expected = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), delivery.body, hashlib.sha256).hexdigest()
        assert delivery.headers["x-webhook-signature"] == expected
    return [json.loads(d.body) for d in got]


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def expiry(row: dict) -> datetime:
    return datetime.combine(row["expire_date"], row["expire_time"])


def test_legacy_ipn_vector_is_recorded_and_forwarded(client, database, deliveries, coingecko):
    answer = client.post("/", data=IPN["token"]["body"], content_type="application/json",
                         headers={"x-nowpayments-sig": IPN["token"]["signature"]})
    assert answer.status_code == 200, answer.json
    assert answer.json["message"] == "IPN processed"
    [row] = subscriptions(database)
    assert (row["user_id"], row["private_channel_id"], row["payment_status"]) == (USER, CLOSED_CHANNEL, "confirmed")
    assert row["nowpayments_payment_id"] == "5077125051" and row["nowpayments_invoice_id"] == "4651237812"
    assert (row["nowpayments_outcome_amount"], row["nowpayments_price_amount"]) == (Decimal("0.0046"), Decimal(15))
    assert row["nowpayments_outcome_amount_usd"] == Decimal("0.0046") * Decimal("3000.12")
    assert (row["sub_time"], row["sub_price"], row["is_active"]) == (31, Decimal("15.00"), True)  # tier 1: 31 days
    assert abs(expiry(row) - (utc_now() + timedelta(days=31))) < timedelta(minutes=1)
    assert [(p["payment_id"], p["user_id"], p["channel_id"], p["gcwebhook1_processed"]) for p in processed(database)] \
        == [(5077125051, USER, int(CLOSED_CHANNEL), False)]
    [task] = forwarded(deliveries)
    assert task == {
        "user_id": USER, "closed_channel_id": CLOSED_CHANNEL,
        "wallet_address": "0x5a1b2c3d4e5f60718293a4b5c6d7e8f901234567", "payout_currency": "LINK",
        "payout_network": "ETH", "subscription_time_days": 31, "subscription_price": "15.00",
        "outcome_amount_usd": 13.800552, "nowpayments_payment_id": 5077125051,
        "nowpayments_pay_address": "0x9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
        "nowpayments_outcome_amount": 0.0046, "payment_status": "finished",
    }
    assert coingecko.requests_seen == [{"ids": ["ethereum"], "vs_currencies": ["usd"]}]


def test_body_reserialised_in_transit_passes_on_the_sorted_key_signature(client, deliveries):
    fields = finished()
    signature = tokens.encode(hops.NOWPAYMENTS_IPN, fields, KEYS)["signature"]
    reordered = json.dumps(dict(reversed(list(fields.items()))), indent=2)  # not the bytes NowPayments signed
    answer = client.post("/", data=reordered, content_type="application/json", headers={"x-nowpayments-sig": signature})
    assert answer.status_code == 200, answer.json
    assert forwarded(deliveries)[0]["nowpayments_payment_id"] == fields["payment_id"]


@pytest.mark.parametrize("headers", [{}, {"x-nowpayments-sig": "00" * 64}, {"x-nowpayments-sig": "not hex"}])
def test_unsigned_or_missigned_notifications_are_forbidden(client, database, deliveries, headers):
    answer = client.post("/", data=tokens.encode(hops.NOWPAYMENTS_IPN, finished(), KEYS)["body"],
                         content_type="application/json", headers=headers)
    assert answer.status_code == 403
    assert subscriptions(database) == [] and processed(database) == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_notification_signed_with_another_secret_is_forbidden(client, database, deliveries):
    assert post_ipn(client, finished(), key="not-the-ipn-secret").status_code == 403
    assert subscriptions(database) == [] and deliveries.expect_exactly(0, quiet_s=0.3) == []


@pytest.mark.parametrize("data, content_type", [
    ("{not json", "application/json"), ("null", "application/json"), ('{"payment_id": 1}', "text/plain"),
])
def test_unparseable_notifications_are_bad_requests(client, database, data, content_type):
    answer = client.post("/", data=data, content_type=content_type, headers={"x-nowpayments-sig": "ab" * 64})
    assert answer.status_code == 400
    assert subscriptions(database) == []


def test_unfinished_statuses_are_only_acknowledged(client, database, deliveries, coingecko):
    answer = post_ipn(client, finished(payment_status="Confirming"))
    assert answer.status_code == 200
    assert (answer.json["status"], answer.json["current_status"]) == ("acknowledged", "confirming")
    assert subscriptions(database) == [] and processed(database) == [] and coingecko.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


@pytest.mark.parametrize("changes, field", [
    ({"order_id": None}, "order_id"), ({"order_id": "PGP-x|y"}, "order_id"), ({"payment_status": None}, "payment_status"),
    ({"payment_id": "abc"}, "payment_id"),
])
def test_malformed_finished_notifications_are_bad_requests(client, database, deliveries, changes, field):
    answer = post_ipn(client, finished(**changes))
    assert answer.status_code == 400 and answer.json.get("field") == field
    assert subscriptions(database) == [] and processed(database) == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_unregistered_channel_is_retried_not_acknowledged(client, database, deliveries):
    answer = post_ipn(client, finished(order_id="PGP-6271402111|-1009999999999"))
    assert (answer.status_code, answer.json["error"]) == (503, "channel_not_registered")
    assert subscriptions(database) == [] and processed(database) == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_redelivery_forwards_once_and_pays_the_subscription_once(client, database, deliveries):
    fields = finished()
    assert post_ipn(client, fields).status_code == 200
    [first] = subscriptions(database)
    again = post_ipn(client, fields)
    assert again.status_code == 200
    [second] = subscriptions(database)
    assert (expiry(second), second["nowpayments_created_at"]) == (expiry(first), first["nowpayments_created_at"])
    assert len(forwarded(deliveries)) == 1


def test_payment_gcwebhook1_already_processed_is_not_forwarded_again(client, database, deliveries):
    fields = finished()
    assert post_ipn(client, fields).status_code == 200
    forwarded(deliveries)
    with database.transaction() as tx:
        tx.execute("UPDATE processed_payments SET gcwebhook1_processed = TRUE")
    answer = post_ipn(client, fields)
    assert (answer.status_code, answer.json["message"]) == (200, "IPN processed (already handled)")
    assert len(deliveries.expect_exactly(1, quiet_s=0.5)) == 1


def test_missing_price_is_retried_and_the_retry_forwards(client, database, deliveries, coingecko):
    """Defect 19: legacy answered 200 without forwarding when the USD conversion failed."""
    fields = finished()
    coingecko.fail_next(500)
    answer = post_ipn(client, fields)
    assert (answer.status_code, answer.json["error"]) == (503, "price_unavailable")
    [row] = subscriptions(database)
    assert row["payment_status"] == "confirmed" and row["nowpayments_outcome_amount_usd"] is None
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    assert post_ipn(client, fields).status_code == 200
    assert len(forwarded(deliveries)) == 1
    assert subscriptions(database)[0]["expire_date"] == row["expire_date"]


class UnavailableTasks:
    """A Cloud Tasks API that is down."""

    def create_task(self, **request):
        raise gexc.ServiceUnavailable("tasks backend unavailable")


def test_failed_enqueue_is_retried_not_acknowledged(client, make_client, database, deliveries):
    """Defect 19: legacy answered 200 when the GCWebhook1 task could not be created."""
    fields = finished()
    down = make_client(tasks=TasksClient(TEST_PROJECT, TEST_LOCATION, client=UnavailableTasks()))
    answer = post_ipn(down, fields)
    assert (answer.status_code, answer.json["error"]) == (503, "task_enqueue_failed")
    assert subscriptions(database)[0]["nowpayments_outcome_amount_usd"] is None  # rolled back with the gate
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    assert post_ipn(client, fields).status_code == 200
    assert len(forwarded(deliveries)) == 1


def test_concurrent_deliveries_forward_and_extend_once(client, make_client, database, deliveries):
    """Defect 10: legacy's check-then-insert let two concurrent IPNs both enqueue GCWebhook1."""
    with database.transaction() as tx:
        tx.execute("INSERT INTO private_channel_users_database (user_id, private_channel_id, sub_time, sub_price,"
                   " expire_date, expire_time, is_active, payment_status, nowpayments_payment_id)"
                   " VALUES (%s, %s, 31, 15.00, %s, '09:00:00', TRUE, 'confirmed', '111')",
                   (USER, CLOSED_CHANNEL, date.today() + timedelta(days=10)))
    fields, answers = finished(), []
    threads = [threading.Thread(target=lambda c=c: answers.append(post_ipn(c, fields).status_code))
               for c in (client, make_client(), make_client())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]
    [row] = subscriptions(database)
    assert expiry(row) == datetime.combine(date.today() + timedelta(days=41), time(9, 0))
    assert len(forwarded(deliveries)) == 1 and len(processed(database)) == 1


def test_database_down_is_retried_never_forwarded(make_client, deliveries):
    """Defect 10: legacy forwarded anyway ("fail-open") when the idempotency check hit a DB error."""
    down = make_client(env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/telepay"})
    answer = post_ipn(down, finished())
    assert (answer.status_code, answer.json["error"]) == (503, "database_unavailable")
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    assert down.get("/health").status_code == 503


def test_renewal_of_a_running_subscription_extends_and_reactivates_it(client, database, deliveries):
    """Defect 22: legacy overwrote the payment columns but kept the old expiry and is_active."""
    old_expiry = date.today() + timedelta(days=5)
    with database.transaction() as tx:
        tx.execute("INSERT INTO private_channel_users_database (user_id, private_channel_id, sub_time, sub_price,"
                   " expire_date, expire_time, is_active, payment_status, nowpayments_payment_id,"
                   " nowpayments_created_at) VALUES (%s, %s, 31, 15.00, %s, '09:00:00', FALSE, 'confirmed',"
                   " '4000000001', '2025-01-01 00:00:00')", (USER, CLOSED_CHANNEL, old_expiry))
    assert post_ipn(client, finished(price_amount=25.0)).status_code == 200
    [row] = subscriptions(database)
    assert expiry(row) == datetime.combine(old_expiry + timedelta(days=60), time(9, 0))  # tier 2: 60 days more
    assert (row["is_active"], row["sub_time"], row["sub_price"]) == (True, 60, Decimal("25.00"))
    assert abs(row["nowpayments_created_at"] - utc_now()) < timedelta(minutes=1)
    assert forwarded(deliveries)[0]["subscription_price"] == "25.00"


def test_renewal_of_a_lapsed_subscription_runs_from_now(client, database):
    with database.transaction() as tx:
        tx.execute("INSERT INTO private_channel_users_database (user_id, private_channel_id, expire_date,"
                   " expire_time, is_active, payment_status) VALUES (%s, %s, '2025-01-01', '09:00:00', FALSE,"
                   " 'confirmed')", (USER, CLOSED_CHANNEL))
    assert post_ipn(client, finished(price_amount=19.99)).status_code == 200
    [row] = subscriptions(database)
    assert abs(expiry(row) - (utc_now() + timedelta(days=30))) < timedelta(minutes=1)  # no tier at 19.99: 30 days
    assert row["is_active"] is True


def test_stablecoin_outcome_needs_no_price(client, database, deliveries, coingecko):
    assert post_ipn(client, finished(outcome_currency="usdttrc20", outcome_amount=14.83)).status_code == 200
    assert coingecko.requests_seen == []
    assert subscriptions(database)[0]["nowpayments_outcome_amount_usd"] == Decimal("14.83")
    assert forwarded(deliveries)[0]["outcome_amount_usd"] == 14.83


def test_finished_payment_without_outcome_is_refused_and_not_forwarded(client, deliveries):
    fields = {k: v for k, v in finished().items() if k != "outcome_amount"}
    assert post_ipn(client, fields).status_code == 400
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_payment_status_api(client, database):
    assert client.get("/api/payment-status").status_code == 400
    assert client.get("/api/payment-status?order_id=nonsense").status_code == 400
    assert client.get("/api/payment-status?order_id=PGP-1|-42").status_code == 404
    order_id = IPN["fields"]["order_id"]
    pending = client.get("/api/payment-status", query_string={"order_id": order_id})
    assert (pending.status_code, pending.json["status"], pending.json["data"]["confirmed"]) == (200, "pending", False)
    fields = finished()
    assert post_ipn(client, fields).status_code == 200
    confirmed = client.get("/api/payment-status", query_string={"order_id": order_id}).json
    assert confirmed["status"] == "confirmed"
    # The NowPayments payment_id is no longer disclosed to whoever knows the order id (defect 6).
    assert confirmed["data"] == {"order_id": order_id, "payment_status": "confirmed", "confirmed": True}
    with database.transaction() as tx:
        tx.execute("UPDATE private_channel_users_database SET payment_status = 'failed'")
    assert client.get("/api/payment-status", query_string={"order_id": order_id}).json["status"] == "failed"


def test_status_api_in_signed_mode_answers_only_the_signed_link(client, make_client):
    """Defect 6: order ids (PGP-<user>|<channel>) are guessable; in signed mode a status read needs the link's sig."""
    client = make_client(env={"PAYMENT_STATUS_ACCESS": "signed"})
    order_id = IPN["fields"]["order_id"]
    assert post_ipn(client, finished()).status_code == 200
    unsigned = client.get("/api/payment-status", query_string={"order_id": order_id})
    assert unsigned.status_code == 403 and "signed link" in unsigned.json["message"]
    assert "confirmed" not in unsigned.get_data(as_text=True)
    sig = rules.status_signature(order_id, KEYS[hops.SUCCESS_KEY])
    other = rules.status_signature("PGP-1|-42", KEYS[hops.SUCCESS_KEY])
    assert client.get("/api/payment-status", query_string={"order_id": order_id, "sig": other}).status_code == 403
    assert client.get("/api/payment-status", query_string={"order_id": order_id, "sig": ""}).status_code == 403
    signed = client.get("/api/payment-status", query_string={"order_id": order_id, "sig": sig.upper()})
    assert (signed.status_code, signed.json["status"]) == (200, "confirmed")


def test_status_api_in_legacy_mode_still_refuses_a_wrong_signature(client):
    order_id = IPN["fields"]["order_id"]
    wrong = client.get("/api/payment-status", query_string={"order_id": order_id, "sig": "00" * 32})
    assert wrong.status_code == 403 and wrong.json["field"] == "sig"
    sig = rules.status_signature(order_id, KEYS[hops.SUCCESS_KEY])
    assert client.get("/api/payment-status", query_string={"order_id": order_id, "sig": sig}).status_code == 200


def test_status_api_access_switch_refuses_an_unknown_mode(make_client):
    with pytest.raises(ConfigError, match="PAYMENT_STATUS_ACCESS"):
        make_client(env={"PAYMENT_STATUS_ACCESS": "anyone"})


def test_status_api_answers_cors_only_to_landing_page_origins(client):
    url = "/api/payment-status?order_id=PGP-1|-42"
    allowed = client.get(url, headers={"Origin": "https://www.paygateprime.com"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://www.paygateprime.com"
    assert "Access-Control-Allow-Origin" not in client.get(url, headers={"Origin": "https://evil.example"}).headers
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "http://localhost"}).headers


def test_landing_page_polls_the_status_api(client):
    page = client.get("/payment-processing")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b"/api/payment-status?order_id=" in page.data and b'"&sig="' in page.data


def test_health(client):
    assert client.get("/health").json["checks"] == {"database": "ok"}
