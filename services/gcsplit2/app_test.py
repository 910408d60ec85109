"""GCSplit2 against the legacy T4/T5 vectors, the ChangeNOW stand-in and the Cloud Tasks emulator."""
from __future__ import annotations

import json
import time

import pytest

from telepay_shared import hops, tokens
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gcsplit2.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T4 = VECTORS["hops"]["gcsplit1->gcsplit2"]


@pytest.fixture
def client(service_env, load_service_config, changenow, deliveries):
    env = service_env(CONFIG_PATH, CHANGENOW_API_URL=changenow.url,
                      GCSPLIT1_ESTIMATE_RESPONSE_URL=deliveries.url("/usdt-eth-estimate"))
    return create_app(load_service_config(CONFIG_PATH, env)).test_client()


def fresh_t4(**changes) -> str:
    """The legacy vector's fields, signed now (the vector's own timestamp is long expired)."""
    return tokens.encode(hops.ESTIMATE_REQUEST, {**T4["fields"], **changes}, KEYS)


def delivered_t5(deliveries, count=1) -> list[dict]:
    """Decode the T5 tokens the emulator delivered to GCSplit1's endpoint."""
    got = deliveries.expect_exactly(count)
    assert {d.path for d in got} == {"/usdt-eth-estimate"}
    return [tokens.decode(hops.ESTIMATE_RESPONSE, json.loads(d.body)["token"], KEYS) for d in got]


def test_quotes_with_changenow_and_sends_t5_to_gcsplit1(client, changenow, deliveries):
    answer = client.post("/", json={"token": fresh_t4(payout_key="np:5077125051")})
    assert answer.status_code == 200, answer.json
    [t5] = delivered_t5(deliveries)
    [call] = [r for r in changenow.requests_seen if r["route"] == "estimate"]
    assert (call["args"]["fromCurrency"], call["args"]["toCurrency"]) == ("eth", "link")
    assert call["args"]["fromAmount"] == "0.004462"  # the wire f64, not a float artefact
    quote = changenow.quote(call["args"])
    assert t5["from_amount"] == float(quote.from_amount) == 0.004462
    assert t5["to_amount_eth_post_fee"] == float(quote.to_amount) > 0
    for name in ("user_id", "closed_channel_id", "wallet_address", "payout_currency", "swap_currency",
                 "payout_mode", "actual_eth_amount"):
        assert t5[name] == T4["fields"][name]
    assert t5["payout_key"] == "np:5077125051"


def test_legacy_token_without_payout_key_is_served_and_redelivery_sends_one_t5(client, deliveries):
    token = fresh_t4()
    assert client.post("/", json={"token": token}).status_code == 200
    assert client.post("/", json={"token": token}).status_code == 200  # Cloud Tasks redelivery
    [t5] = delivered_t5(deliveries)
    assert "payout_key" not in t5


@pytest.mark.parametrize("body, status, error", [
    ({}, 400, "bad_request"),
    ({"token": "not-a-token"}, 401, "token_rejected"),
])
def test_bad_requests_answer_4xx_and_send_nothing(client, deliveries, body, status, error):
    answer = client.post("/", json=body)
    assert (answer.status_code, answer.json["error"]) == (status, error)
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_expired_and_tampered_tokens_are_rejected(client, deliveries):
    expired = tokens.encode(hops.ESTIMATE_REQUEST, T4["fields"], KEYS, now=time.time() - 86400 - 60)
    assert client.post("/", json={"token": expired}).json["message"].endswith("expired")
    wrong_key = tokens.encode(hops.ESTIMATE_REQUEST, T4["fields"], {hops.SUCCESS_KEY: "not-the-key"})
    assert client.post("/", json={"token": wrong_key}).status_code == 401
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_non_positive_amount_is_refused_without_asking_changenow(client, changenow, deliveries):
    answer = client.post("/", json={"token": fresh_t4(adjusted_amount=0.0)})
    assert answer.status_code == 400 and "adjusted_amount" in answer.json["message"]
    assert changenow.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_changenow_rejection_is_permanent_and_outage_is_retried(client, changenow, deliveries):
    changenow.inject_fault("estimate", "reply", 1, status=400,
                           body={"error": "pair_is_inactive", "message": "Pair is inactive"})
    assert client.post("/", json={"token": fresh_t4()}).status_code == 400
    changenow.inject_fault("estimate", "server_error", 10)
    assert client.post("/", json={"token": fresh_t4()}).status_code == 503
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_health(client):
    assert client.get("/health").status_code == 200
