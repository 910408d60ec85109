"""GCAccumulator against a real PostgreSQL: signed credits, the fee, redeliveries and every rejection."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from telepay_shared import hops
from telepay_shared.db import Database
from telepay_shared.testing.pytest_plugin import KEYS

from services.gcaccumulator.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]

# What GCWebhook1 sends for a threshold payment (spec §5), with the values of the legacy vectors.
PAYMENT = {
    "user_id": 6271402111,
    "client_id": -1003268562225,
    "wallet_address": "0x5a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
    "payout_currency": "link",
    "payout_network": "eth",
    "payment_amount_usd": 52.38,
    "subscription_id": 412,
    "payment_timestamp": "2026-11-28T10:51:01.250000",
    "nowpayments_payment_id": 5077125051,
    "nowpayments_pay_address": "0x9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
    "nowpayments_outcome_amount": "0.0161",
}


def signed(body, key=KEYS[hops.SUCCESS_KEY]) -> dict:
    """Request options for a JSON body carrying its X-Webhook-Signature, as GCWebhook1 sends it."""
    raw = (body if isinstance(body, str) else json.dumps(body)).encode()
    signature = hmac.new(key.encode(), raw, hashlib.sha256).hexdigest()
    return {"data": raw, "content_type": "application/json", "headers": {"X-Webhook-Signature": signature}}


def credits(database) -> list[dict]:
    """Every payout_accumulation row, oldest first."""
    with database.transaction() as tx:
        return tx.fetchall("SELECT * FROM payout_accumulation ORDER BY id")


@pytest.fixture
def make_client(service_env, load_service_config, database_url):
    """A test client over the declared configuration; the auth mode is the declared default unless given."""

    def make(**values):
        env = service_env(CONFIG_PATH, DATABASE_URL=database_url, **values)
        if "TP_AUTH_MODE" not in values:
            del env["TP_AUTH_MODE"]
        return create_app(load_service_config(CONFIG_PATH, env)).test_client()

    return make


def test_signed_payment_is_credited_net_of_the_platform_fee(client, database):
    answer = client.post("/", **signed(PAYMENT))
    assert answer.status_code == 200, answer.json
    [row] = credits(database)
    assert answer.json == {
        "status": "success", "message": "Payment accumulated successfully (micro-batch pending)",
        "accumulation_id": row["id"], "accumulated_eth": "50.80860000", "conversion_status": "pending",
    }
    assert row["accumulated_amount_usdt"] == Decimal("52.38") * Decimal("0.97")
    assert row["payment_fee_usd"] == Decimal("1.5714")  # kept so the micro-batch leaves it in the wallet
    assert row["accumulated_amount_usdt"] + row["payment_fee_usd"] == row["payment_amount_usd"] == Decimal("52.38")
    assert (row["client_id"], row["user_id"], row["subscription_id"]) == ("-1003268562225", 6271402111, 412)
    assert (row["client_wallet_address"], row["client_payout_currency"], row["client_payout_network"]) == (
        PAYMENT["wallet_address"], "link", "eth")
    assert (row["nowpayments_payment_id"], row["nowpayments_pay_address"]) == ("5077125051", PAYMENT[
        "nowpayments_pay_address"])
    assert row["nowpayments_outcome_amount"] == Decimal("0.0161")
    assert row["payment_timestamp"] == datetime(2026, 11, 28, 10, 51, 1, 250000)
    assert (row["payment_currency"], row["conversion_status"], row["is_paid_out"]) == ("usd", "pending", False)
    assert row["batch_conversion_id"] is None and row["payout_batch_id"] is None


def test_fee_is_the_configured_percentage_and_amounts_never_pass_through_float(make_client, database):
    client = make_client(TP_FLAT_FEE="2.5")
    # 12.3456789 has no exact binary form; the body is read as Decimal, so no float artefact appears.
    body = '{"user_id": 1, "client_id": "-100123", "wallet_address": "0xabc", "payout_currency": "usdt", ' \
           '"payout_network": "eth", "payment_amount_usd": 12.3456789, "nowpayments_payment_id": "np-1"}'
    assert client.post("/", **signed(body)).status_code == 200
    [row] = credits(database)
    assert row["accumulated_amount_usdt"] == Decimal("12.03703693")  # 12.3456789 x 0.975, to 8 places
    assert row["payment_fee_usd"] == Decimal("0.30864197")
    assert row["accumulated_amount_usdt"] + row["payment_fee_usd"] == Decimal("12.34567890")
    assert row["payment_amount_usd"] == Decimal("12.35")  # NUMERIC(10,2), as legacy stored it
    assert row["subscription_id"] is None and row["nowpayments_outcome_amount"] is None
    utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert utc_now - row["payment_timestamp"] < timedelta(minutes=1)  # absent: now, in UTC


def test_zone_aware_payment_time_is_stored_in_utc(client, database):
    assert client.post("/", **signed({**PAYMENT, "payment_timestamp": "2026-11-28T12:51:01+02:00"})).status_code == 200
    assert credits(database)[0]["payment_timestamp"] == datetime(2026, 11, 28, 10, 51, 1)


def test_redelivery_answers_the_first_credit_and_never_credits_twice(client, database):
    """Defect 21: legacy inserted a new row for every Cloud Tasks redelivery."""
    first = client.post("/", **signed(PAYMENT))
    again = client.post("/", **signed({**PAYMENT, "nowpayments_payment_id": "5077125051"}))  # same id as text
    assert first.status_code == again.status_code == 200
    assert again.json["accumulation_id"] == first.json["accumulation_id"]
    assert again.json["accumulated_eth"] == "50.80860000" and "already" in again.json["message"]
    assert len(credits(database)) == 1


def test_concurrent_redeliveries_create_one_credit(client, database):
    barrier, answers = threading.Barrier(4), []

    def deliver():
        barrier.wait()
        answers.append(client.application.test_client().post("/", **signed(PAYMENT)))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json["accumulation_id"] for a in answers}) == 1
    assert len(credits(database)) == 1


def test_redelivery_reports_the_row_as_it_is_now(client, database):
    first = client.post("/", **signed(PAYMENT)).json
    with database.transaction() as tx:
        tx.execute("UPDATE payout_accumulation SET conversion_status = 'swapping'")
    again = client.post("/", **signed(PAYMENT)).json
    assert (again["accumulation_id"], again["conversion_status"]) == (first["accumulation_id"], "swapping")


@pytest.mark.parametrize("headers", [
    {},
    {"X-Webhook-Signature": "00" * 32},
    {"X-Webhook-Signature": hmac.new(b"not-the-key", json.dumps(PAYMENT).encode(), hashlib.sha256).hexdigest()},
])
def test_unsigned_or_forged_credit_is_refused(client, database, headers):
    """Defect 1: legacy credited any JSON anyone posted."""
    answer = client.post("/", data=json.dumps(PAYMENT), content_type="application/json", headers=headers)
    assert (answer.status_code, answer.json["error"]) == (401, "unauthorized")
    assert credits(database) == []


def test_signature_of_another_body_is_refused(client, database):
    options = signed(PAYMENT)
    options["data"] = json.dumps({**PAYMENT, "payment_amount_usd": 5238.0}).encode()
    assert client.post("/", **options).status_code == 401
    assert credits(database) == []


def test_unsigned_credit_is_accepted_only_when_auth_is_switched_off(make_client, database):
    client = make_client(TP_AUTH_MODE="none")  # behind Cloud Run IAM, for a legacy GCWebhook1
    assert client.post("/", json=PAYMENT).status_code == 200
    assert len(credits(database)) == 1


@pytest.mark.parametrize("body, field", [
    ({**PAYMENT, "payment_amount_usd": None}, "payment_amount_usd"),
    ({k: v for k, v in PAYMENT.items() if k != "nowpayments_payment_id"}, "nowpayments_payment_id"),
    ({**PAYMENT, "payment_amount_usd": 0}, "payment_amount_usd"),
    ({**PAYMENT, "payment_amount_usd": -5.0}, "payment_amount_usd"),
    ({**PAYMENT, "payment_amount_usd": "fifty"}, "payment_amount_usd"),
    ({**PAYMENT, "payment_amount_usd": True}, "payment_amount_usd"),
    ({**PAYMENT, "payment_amount_usd": 1e9}, "payment_amount_usd"),
    ({**PAYMENT, "nowpayments_outcome_amount": "-0.1"}, "nowpayments_outcome_amount"),
    ({**PAYMENT, "nowpayments_outcome_amount": "NaN"}, "nowpayments_outcome_amount"),
    ({**PAYMENT, "user_id": True}, "user_id"),
    ({**PAYMENT, "user_id": "12ab"}, "user_id"),
    ({**PAYMENT, "client_id": -10**14}, "client_id"),
    ({**PAYMENT, "subscription_id": 2**31}, "subscription_id"),
    ({**PAYMENT, "wallet_address": "0x" + "a" * 199}, "wallet_address"),
    ({**PAYMENT, "payout_currency": 5}, "payout_currency"),
    ({**PAYMENT, "payment_timestamp": "yesterday"}, "payment_timestamp"),
    ({**PAYMENT, "nowpayments_payment_id": ["5077125051"]}, "nowpayments_payment_id"),
])
def test_invalid_payment_is_refused_with_400_and_stores_nothing(client, database, body, field):
    """Defect 23: legacy answered 500 (retried for 24 h) for bodies that can never succeed."""
    answer = client.post("/", **signed(body))
    assert (answer.status_code, answer.json["error"]) == (400, "bad_request"), answer.json
    assert field in answer.json["message"]
    assert credits(database) == []


def test_body_that_is_not_a_json_object_is_refused(client, database):
    assert client.post("/", **signed("[1, 2]")).status_code == 400
    assert client.post("/", **signed("{not json")).status_code == 400
    missing = client.post("/", **signed({"user_id": 1}))
    assert missing.status_code == 400 and set(missing.json["missing"]) == {
        "client_id", "wallet_address", "payout_currency", "payout_network", "payment_amount_usd",
        "nowpayments_payment_id"}
    assert credits(database) == []


def test_unreachable_database_answers_503_so_the_task_is_retried(service_env, load_service_config):
    env = service_env(CONFIG_PATH, DATABASE_URL="postgresql://postgres@127.0.0.1:1/none?sslmode=disable")
    config = load_service_config(CONFIG_PATH, env)
    client = create_app(config, database=Database.from_env(config, acquire_timeout_s=1)).test_client()
    answer = client.post("/", json=PAYMENT)
    assert (answer.status_code, answer.json["error"]) == (503, "database_unavailable")


def test_health(client):
    assert client.get("/health").status_code == 200


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
