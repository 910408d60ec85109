"""GCHostPay2 against the legacy T10/T11 vectors, the ChangeNOW stand-in and the Cloud Tasks emulator."""
from __future__ import annotations

import json
import secrets
import time
from decimal import Decimal

import pytest

from telepay_shared import hops, tokens
from telepay_shared.cloudtasks import task_id_for
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gchostpay2.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T10 = VECTORS["hops"]["gchostpay1->gchostpay2"]
LEGACY_CLOCK = VECTORS["created_at"]
RESPONSE_QUEUE = "gchostpay1-response-queue"
HOST_USDT_WALLET = "0x" + "ab" * 20


@pytest.fixture
def make_client(service_env, load_service_config, changenow, deliveries):
    def make(clock=time.time):
        # GCHOSTPAY1_URL is a base URL: the service appends /status-verified.
        env = service_env(CONFIG_PATH, CHANGENOW_API_URL=changenow.url, GCHOSTPAY1_URL=deliveries.url("/"))
        return create_app(load_service_config(CONFIG_PATH, env), clock=clock).test_client()
    return make


def open_exchange(changenow, status="waiting") -> str:
    """An eth->usdt exchange at the stand-in, moved on to `status`."""
    return changenow.open_exchange("eth", "usdt", Decimal("0.02"), HOST_USDT_WALLET, status=status)["id"]


def fresh_t10(exchange_id: str, **changes) -> tuple[str, str]:
    """A T10 for a new payout (unique ids never repeat: the emulator remembers task names)."""
    unique_id, now = changes.pop("unique_id", secrets.token_hex(8).upper()), changes.pop("now", None)
    fields = {**T10["fields"], "unique_id": unique_id, "cn_api_id": exchange_id, **changes}
    return tokens.encode(hops.STATUS_CHECK, fields, KEYS, now=now), unique_id


def delivered_t11(deliveries, count=1, now=None) -> list[tuple[dict, dict]]:
    """The T11 tokens the emulator delivered to GCHostPay1, decoded, with their request headers."""
    got = deliveries.expect_exactly(count)
    assert {d.path for d in got} == {"/status-verified"}
    return [(tokens.decode(hops.STATUS_VERIFIED, json.loads(d.body)["token"], KEYS, now=now), d.headers)
            for d in got]


def by_id_calls(changenow) -> list[dict]:
    return [r for r in changenow.requests_seen if r["route"] == "by_id"]


def test_legacy_t10_vector_is_checked_and_t11_reports_the_status(make_client, changenow, deliveries):
    # ChangeNOW's by-id answer for the vector's exchange id, scripted (the stand-in mints its own ids).
    exchange_id = T10["fields"]["cn_api_id"]
    changenow.inject_fault("by_id", "reply", 1, status=200, body={"id": exchange_id, "status": "waiting"})
    answer = make_client(clock=lambda: LEGACY_CLOCK).post("/", json={"token": T10["token"]})
    assert answer.status_code == 200, answer.json
    assert answer.json["changenow_status"] == "waiting"
    [(t11, headers)] = delivered_t11(deliveries, now=LEGACY_CLOCK)
    assert t11 == {**T10["fields"], "status": "waiting", "timestamp": LEGACY_CLOCK}
    [call] = by_id_calls(changenow)
    assert call["args"] == {"id": exchange_id} and call["api_key_ok"]
    key = f"status-verified:{T10['fields']['unique_id']}:waiting"
    assert headers["x-cloudtasks-taskname"] == task_id_for(RESPONSE_QUEUE, key)


@pytest.mark.parametrize("status", ["new", "confirming", "finished", "expired", "refunded", "failed", "verifying"])
def test_every_changenow_status_is_reported_for_gchostpay1_to_judge(client, changenow, deliveries, status):
    token, unique_id = fresh_t10(open_exchange(changenow, status))
    assert client.post("/", json={"token": token}).status_code == 200
    [(t11, _)] = delivered_t11(deliveries)
    assert (t11["unique_id"], t11["status"]) == (unique_id, status)


def test_redelivery_reports_once_and_a_status_change_reports_again(client, changenow, deliveries):
    exchange_id = open_exchange(changenow)
    token, unique_id = fresh_t10(exchange_id)
    assert client.post("/", json={"token": token}).status_code == 200
    assert client.post("/", json={"token": token}).status_code == 200  # Cloud Tasks redelivery
    changenow.receive_deposit(exchange_id)
    assert client.post("/", json={"token": token}).status_code == 200
    reports = delivered_t11(deliveries, count=2)
    assert sorted(t11["status"] for t11, _ in reports) == ["confirming", "waiting"]


def test_defect32_a_t10_delayed_past_legacys_300_s_is_still_served(client, changenow, deliveries):
    token, _ = fresh_t10(open_exchange(changenow), now=time.time() - 600)
    assert client.post("/", json={"token": token}).status_code == 200
    delivered_t11(deliveries)


def test_defect25_unknown_exchange_is_permanent_not_500_forever(client, changenow, deliveries):
    token, _ = fresh_t10("0123456789abcd")
    answer = client.post("/", json={"token": token})
    assert (answer.status_code, answer.json["error"]) == (404, "changenow_not_found")
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


@pytest.mark.parametrize("kind, status", [("server_error", 503), ("rate_limit", 429)])
def test_changenow_outage_is_retried_and_sends_nothing(client, changenow, deliveries, kind, status):
    token, _ = fresh_t10(open_exchange(changenow))
    changenow.inject_fault("by_id", kind, 10, retry_after="30")
    assert client.post("/", json={"token": token}).status_code == status
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


@pytest.mark.parametrize("body, status, error", [
    ({}, 400, "bad_request"),
    ({"token": ""}, 400, "bad_request"),
    ({"token": "not-a-token"}, 401, "token_rejected"),
])
def test_bad_requests_answer_4xx_and_send_nothing(client, changenow, deliveries, body, status, error):
    answer = client.post("/", json=body)
    assert (answer.status_code, answer.json["error"]) == (status, error)
    assert changenow.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_non_json_body_is_refused(client, deliveries):
    answer = client.post("/", data="token=x", content_type="application/x-www-form-urlencoded")
    assert answer.status_code == 400
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_expired_tampered_and_foreign_tokens_are_rejected(client, changenow, deliveries):
    exchange_id = open_exchange(changenow)
    expired, _ = fresh_t10(exchange_id, now=time.time() - 2 * 3600 - 60)
    assert client.post("/", json={"token": expired}).json["reason"] == "expired"
    token, _ = fresh_t10(exchange_id)
    tampered = token[:-30] + ("A" if token[-30] != "A" else "B") + token[-29:]
    assert client.post("/", json={"token": tampered}).status_code == 401
    wrong_key = tokens.encode(hops.STATUS_CHECK, T10["fields"], {hops.SUCCESS_KEY: "not-the-key"})
    assert client.post("/", json={"token": wrong_key}).json["reason"] == "bad_signature"
    # A GCSplit1 order (T8, other key and layout) is not a status check.
    t8 = VECTORS["hops"]["gcsplit1->gchostpay1"]["token"]
    assert client.post("/", json={"token": t8}).status_code == 401
    assert by_id_calls(changenow) == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_health(client):
    assert client.get("/health").status_code == 200


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
