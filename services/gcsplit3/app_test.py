"""GCSplit3 against the legacy T6/T18 vectors, the ChangeNOW stand-in and the Cloud Tasks emulator.

The service's clock is pinned at the vectors' created_at, so legacy tokens are served exactly as
minted; tokens the tests build are minted at that clock too.
"""
from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal

import pytest

from telepay_shared import hops, tokens
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gcsplit3.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
NOW = VECTORS["created_at"]
T6, T18 = VECTORS["hops"]["gcsplit1->gcsplit3"], VECTORS["hops"]["gcaccumulator->gcsplit3"]
USDT_WALLET = T18["fields"]["usdt_wallet_address"]


@pytest.fixture
def env(service_env, changenow, deliveries):
    """The service's environment with queues of its own, so task names never collide across tests."""
    run = uuid.uuid4().hex[:8]
    return service_env(
        CONFIG_PATH, CHANGENOW_API_URL=changenow.url,
        GCSPLIT1_SWAP_RESPONSE_URL=deliveries.url("/eth-client-swap"),
        GCSPLIT3_RESPONSE_QUEUE=f"swap-response-{run}", GCACCUMULATOR_RESPONSE_QUEUE=f"swap-created-{run}",
    )


def app_client(load_service_config, env: dict):
    """A test client of the service configured by env, its clock at the vectors' created_at."""
    return create_app(load_service_config(CONFIG_PATH, env), clock=lambda: NOW).test_client()


@pytest.fixture
def client(env, load_service_config):
    return app_client(load_service_config, env)


@pytest.fixture
def accumulator_client(env, load_service_config, deliveries):
    return app_client(load_service_config, {**env, "GCACCUMULATOR_SWAP_CREATED_URL": deliveries.url("/swap-created")})


def t6(**changes) -> str:
    """The legacy T6 fields with changes, minted at the pinned clock."""
    return tokens.encode(hops.SWAP_REQUEST, {**T6["fields"], **changes}, KEYS, now=NOW)


def creates(changenow) -> list[dict]:
    """The POST /exchange bodies ChangeNOW received."""
    return [r["body"] for r in changenow.requests_seen if r["route"] == "create"]


def delivered(deliveries, path, hop, count=1) -> list[dict]:
    """Decode the tokens the emulator delivered to `path` (checks that nothing went anywhere else)."""
    got = deliveries.expect_exactly(count)
    assert {d.path for d in got} == {path}
    return [tokens.decode(hop, json.loads(d.body)["token"], KEYS, now=NOW) for d in got]


# ---------------------------------------------------------------- POST / (T6)


def test_legacy_t6_vector_creates_the_exchange_and_sends_t7(client, changenow, deliveries):
    answer = client.post("/", json={"token": T6["token"]})
    assert answer.status_code == 200, answer.json
    [request] = creates(changenow)
    assert {key: request[key] for key in ("fromCurrency", "toCurrency", "fromNetwork", "toNetwork", "fromAmount",
                                          "address", "userId", "refundAddress", "flow", "type")} == {
        "fromCurrency": "eth", "toCurrency": "link", "fromNetwork": "eth", "toNetwork": "eth",
        "fromAmount": "0.004462", "address": T6["fields"]["wallet_address"], "userId": "6271402111",
        "refundAddress": "", "flow": "standard", "type": "direct"}
    [exchange] = changenow.exchanges.values()
    assert exchange["refundAddress"] is None  # what ChangeNOW answers without a refund address
    [t7] = delivered(deliveries, "/eth-client-swap", hops.SWAP_RESPONSE)
    assert answer.json["cn_api_id"] == t7["cn_api_id"] == exchange["id"]
    t7.pop("timestamp")
    assert t7 == {
        "unique_id": "K7Q2ZP9X4M1B8C3D", "user_id": 6271402111, "closed_channel_id": "-1003268562225",
        "cn_api_id": exchange["id"], "from_currency": "eth", "to_currency": "link", "from_network": "eth",
        "to_network": "eth", "from_amount": 0.004462, "to_amount": float(exchange["expectedAmountTo"]),
        "payin_address": exchange["payinAddress"], "payout_address": T6["fields"]["wallet_address"],
        "refund_address": "",  # defect 29: a null refundAddress no longer breaks the token
        "flow": "standard", "type_": "direct", "actual_eth_amount": 0.0046,
    }


def test_t6_without_the_swap_tail_swaps_usdt_as_legacy(client, changenow, deliveries):
    fields = {k: v for k, v in T6["fields"].items() if k not in ("swap_currency", "payout_mode", "actual_eth_amount")}
    token = tokens.encode(hops.SWAP_REQUEST, {**fields, "eth_amount": 52.38}, KEYS, now=NOW)
    assert client.post("/", json={"token": token}).status_code == 200
    [request] = creates(changenow)
    assert (request["fromCurrency"], request["fromAmount"]) == ("usdt", "52.38")
    [t7] = delivered(deliveries, "/eth-client-swap", hops.SWAP_RESPONSE)
    assert (t7["from_currency"], t7["from_amount"], t7["actual_eth_amount"]) == ("usdt", 52.38, 0.0)


def test_redelivered_t6_reports_one_exchange_to_gcsplit1(client, changenow, deliveries):
    token = t6()
    first = client.post("/", json={"token": token})
    again = client.post("/", json={"token": token})
    assert (first.status_code, again.status_code) == (200, 200)
    assert len(creates(changenow)) == 2  # no database here: GCSplit1 keeps only the first exchange
    [t7] = delivered(deliveries, "/eth-client-swap", hops.SWAP_RESPONSE)
    assert t7["cn_api_id"] == first.json["cn_api_id"] != again.json["cn_api_id"]


@pytest.mark.parametrize("amount", [0.0, -1.0])
def test_non_positive_amount_is_refused_without_asking_changenow(client, changenow, deliveries, amount):
    answer = client.post("/", json={"token": t6(eth_amount=amount)})
    assert answer.status_code == 400 and "eth_amount" in answer.json["message"]
    assert changenow.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


@pytest.mark.parametrize("fault, options, status", [
    ("reply", {"status": 400, "body": {"error": "out_of_range", "message": "Amount is more than maximal"}}, 400),
    ("server_error", {}, 503),
    ("rate_limit", {"retry_after": "120"}, 429),
    ("reply", {"status": 401, "body": {"error": "unauthorized", "message": "Invalid api key"}}, 503),
])
def test_changenow_rejection_stops_and_outage_is_retried_without_sleeping(
        client, changenow, deliveries, fault, options, status):
    changenow.inject_fault("create", fault, 10, **options)
    started = time.monotonic()
    answer = client.post("/", json={"token": t6()})
    assert answer.status_code == status, answer.json
    assert time.monotonic() - started < 15  # legacy slept 60 s per attempt inside the request (defect 24)
    assert changenow.exchanges == {}
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_exchange_changenow_refuses_is_never_reported(client, changenow, deliveries):
    answer = client.post("/", json={"token": t6(wallet_address="not-an-address")})
    assert answer.status_code == 400 and answer.json["error"] == "changenow_rejected"
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


# ---------------------------------------------------------------- POST /eth-to-usdt (T18)


def test_legacy_t18_vector_creates_the_usdt_exchange_and_sends_t19(accumulator_client, changenow, deliveries):
    answer = accumulator_client.post("/eth-to-usdt", json={"token": T18["token"]})
    assert answer.status_code == 200, answer.json
    [request] = creates(changenow)
    assert (request["fromCurrency"], request["toCurrency"], request["fromNetwork"], request["toNetwork"]) == (
        "eth", "usdt", "eth", "eth")
    assert (request["fromAmount"], request["address"], request["userId"]) == ("14.38", USDT_WALLET, "accumulation_4211")
    [exchange] = changenow.exchanges.values()
    [t19] = delivered(deliveries, "/swap-created", hops.ACCUMULATOR_SWAP_CREATED)
    t19.pop("timestamp")
    assert t19 == {
        "accumulation_id": 4211, "client_id": "-1003268562225", "cn_api_id": exchange["id"],
        "from_amount": 14.38, "to_amount": float(exchange["expectedAmountTo"]),
        "payin_address": exchange["payinAddress"], "payout_address": USDT_WALLET,
    }
    assert Decimal(repr(t19["to_amount"])) > 0


def test_eth_to_usdt_without_a_target_answers_501_before_any_exchange(client, changenow, deliveries):
    # Legacy created the exchange and only then failed for want of a GCAccumulator queue/URL.
    answer = client.post("/eth-to-usdt", json={"token": T18["token"]})
    assert answer.status_code == 501 and "GCACCUMULATOR_SWAP_CREATED_URL" in answer.json["message"]
    assert changenow.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_redelivered_t18_notifies_gcaccumulator_once(accumulator_client, changenow, deliveries):
    for _ in range(2):
        assert accumulator_client.post("/eth-to-usdt", json={"token": T18["token"]}).status_code == 200
    delivered(deliveries, "/swap-created", hops.ACCUMULATOR_SWAP_CREATED)


def test_t18_window_is_legacys_five_minutes(accumulator_client, changenow, deliveries):
    late = tokens.encode(hops.ACCUMULATOR_SWAP_REQUEST, T18["fields"], KEYS, now=NOW - 301)
    answer = accumulator_client.post("/eth-to-usdt", json={"token": late})
    assert answer.status_code == 401 and answer.json["reason"] == "expired"
    assert changenow.requests_seen == []


# ---------------------------------------------------------------- rejections shared by both endpoints


@pytest.mark.parametrize("path, hop, vector", [("/", hops.SWAP_REQUEST, T6),
                                               ("/eth-to-usdt", hops.ACCUMULATOR_SWAP_REQUEST, T18)])
def test_bad_bodies_and_tokens_answer_4xx_and_create_nothing(accumulator_client, changenow, deliveries,
                                                             path, hop, vector):
    post = accumulator_client.post
    assert post(path, data="{not json", content_type="application/json").status_code == 400
    assert post(path, json={}).status_code == 400
    assert post(path, json={"token": "not-a-token"}).status_code == 401
    wrong_key = tokens.encode(hop, vector["fields"], {hops.SUCCESS_KEY: "not-the-key"}, now=NOW)
    assert post(path, json={"token": wrong_key}).json["reason"] == "bad_signature"
    expired = tokens.encode(hop, vector["fields"], KEYS, now=NOW - 86400 - 60)
    assert post(path, json={"token": expired}).json["reason"] == "expired"
    tampered = vector["token"][:3] + ("A" if vector["token"][3] != "A" else "B") + vector["token"][4:]
    assert post(path, json={"token": tampered}).status_code == 401
    assert changenow.requests_seen == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_health(client):
    assert client.get("/health").status_code == 200


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
