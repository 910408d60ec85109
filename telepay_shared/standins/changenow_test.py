"""The ChangeNOW stand-in's own contract: validation, pricing, status progression, faults, lifecycle."""
from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest
import requests

from telepay_shared.standins import changenow as standin_module
from telepay_shared.standins.changenow import ChangeNowStandIn

API_KEY = "standin-test-key"
HEADERS = {"x-changenow-api-key": API_KEY}
EVM_WALLET = "0x" + "cd" * 20
ESTIMATE_URL = "/v2/exchange/estimated-amount"


@pytest.fixture
def standin():
    """Prices 1 ETH = 2500 USDT, 1% spread, 0.002 ETH deposit fee, 2 USDT withdrawal fee, $10 minimum."""
    return ChangeNowStandIn(
        api_key=API_KEY,
        prices_usd={"eth": Decimal("2500"), "usdt": Decimal("1")},
        networks={"eth": ("eth",), "usdt": ("eth", "trx")},
        spread=Decimal("0.01"),
        deposit_fees={"eth": Decimal("0.002")},
        withdrawal_fees={"usdt": Decimal("2")},
        min_usd=Decimal("10"),
        max_usd=Decimal("50000"),
        hang_s=2.0,
    )


@pytest.fixture
def http(standin):
    return standin.app.test_client()


def exact_json(response) -> dict:
    """The response body with numbers parsed exactly."""
    return json.loads(response.get_data(), parse_float=Decimal)


def estimate(http, headers=HEADERS, **overrides):
    """GET estimated-amount for 1 ETH to USDT (ERC-20) unless overridden."""
    query = {"fromCurrency": "eth", "toCurrency": "usdt", "fromAmount": "1", "fromNetwork": "eth", "toNetwork": "eth"}
    query.update(overrides)
    return http.get(ESTIMATE_URL, query_string={k: v for k, v in query.items() if v is not None}, headers=headers)


def create(http, **overrides):
    """POST /exchange for 1 ETH to a USDT (ERC-20) wallet unless overridden; returns the response."""
    body = {"fromCurrency": "eth", "toCurrency": "usdt", "fromNetwork": "eth", "toNetwork": "eth",
            "fromAmount": "1", "address": EVM_WALLET, "refundAddress": "", "flow": "standard", "type": "direct"}
    body.update(overrides)
    return http.post("/v2/exchange", json=body, headers=HEADERS)


def assert_error(response, status: int, error: str) -> None:
    """The response is ChangeNOW's JSON error shape with this status and code."""
    assert response.status_code == status
    body = response.get_json()
    assert body["error"] == error and body["message"]


def new_exchange_id(http) -> str:
    response = create(http)
    assert response.status_code == 200
    return response.get_json()["id"]


# ---- authentication and validation --------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-changenow-api-key": "other"}, {"x-changenow-api-key": ""}])
def test_missing_or_wrong_api_key_is_401(http, headers):
    assert_error(estimate(http, headers=headers), 401, "unauthorized")
    assert_error(http.get("/v2/exchange/by-id", query_string={"id": "x"}, headers=headers), 401, "unauthorized")


def test_estimate_prices_with_spread_and_fees_as_exact_json_numbers(http):
    response = estimate(http, fromAmount="1.000000000000000001")
    assert response.status_code == 200
    # (1.000000000000000001 - 0.002) * 2500 * 0.99 - 2, truncated to 8 decimals
    body = exact_json(response)
    assert body["toAmount"] == Decimal("2468.05")
    assert body["fromAmount"] == Decimal("1.000000000000000001")
    assert (body["depositFee"], body["withdrawalFee"]) == (Decimal("0.002"), Decimal("2"))
    assert re.search(rb'"fromAmount": 1\.000000000000000001[,}]', response.get_data())
    assert (body["flow"], body["type"], body["rateId"]) == ("standard", "direct", None)


def test_network_defaults_to_the_currency_first_network(http):
    body = estimate(http, fromNetwork=None, toNetwork=None).get_json()
    assert (body["fromNetwork"], body["toNetwork"]) == ("eth", "eth")


@pytest.mark.parametrize(
    "overrides, status, error",
    [
        ({"fromCurrency": None}, 400, "not_valid_params"),
        ({"fromCurrency": "doge"}, 400, "not_valid_params"),
        ({"toNetwork": "sol"}, 400, "not_valid_params"),
        ({"fromAmount": None}, 400, "not_valid_params"),
        ({"fromAmount": "abc"}, 400, "not_valid_params"),
        ({"fromAmount": "Infinity"}, 400, "not_valid_params"),
        ({"fromAmount": "0"}, 400, "deposit_too_small"),
        ({"fromAmount": "-1"}, 400, "deposit_too_small"),
        ({"fromAmount": "0.003"}, 400, "deposit_too_small"),
        ({"fromAmount": "20.1"}, 400, "out_of_range"),
        ({"flow": "fixed-rate"}, 400, "not_valid_params"),
        ({"type": "reverse"}, 400, "not_valid_params"),
        ({"toCurrency": "eth"}, 400, "pair_is_inactive"),
    ],
)
def test_estimate_validation(http, overrides, status, error):
    assert_error(estimate(http, **overrides), status, error)


def test_amount_that_does_not_cover_fees_is_too_small(standin, http):
    standin.withdrawal_fees["usdt"] = Decimal("100")
    assert_error(estimate(http, fromAmount="0.004"), 400, "deposit_too_small")


def test_configured_inactive_pair_is_refused(standin, http):
    standin.inactive_pairs = frozenset({("eth", "usdt")})
    assert_error(estimate(http), 400, "pair_is_inactive")


# ---- exchanges ---------------------------------------------------------------------------


def test_create_answers_ids_addresses_and_amounts(http):
    first, second = exact_json(create(http, userId="7")), exact_json(create(http))
    assert re.fullmatch(r"[0-9a-f]{14}", first["id"]) and first["id"] != second["id"]
    assert re.fullmatch(r"0x[0-9a-f]{40}", first["payinAddress"]) and first["payinAddress"] != second["payinAddress"]
    # (1 - 0.002) * 2500 * 0.99 - 2
    assert (first["fromAmount"], first["toAmount"]) == (Decimal("1"), Decimal("2468.05"))
    assert first["payoutAddress"] == EVM_WALLET and first["refundAddress"] is None


def test_create_accepts_json_number_amounts(http):
    response = http.post(
        "/v2/exchange",
        data='{"fromCurrency": "eth", "toCurrency": "usdt", "fromAmount": 0.123456789012345678, "address": "%s"}'
        % EVM_WALLET,
        content_type="application/json",
        headers=HEADERS,
    )
    assert exact_json(response)["fromAmount"] == Decimal("0.123456789012345678")


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"address": ""}, "not_valid_address"),
        ({"address": "0x1234"}, "not_valid_address"),
        ({"toNetwork": "trx", "address": EVM_WALLET}, "not_valid_address"),
        ({"refundAddress": "bc1-nope"}, "not_valid_refund_address"),
        ({"fromAmount": "0"}, "deposit_too_small"),
    ],
)
def test_create_validation(http, overrides, error):
    assert_error(create(http, **overrides), 400, error)


def test_create_needs_a_json_object(http):
    response = http.post("/v2/exchange", data="not json", content_type="application/json", headers=HEADERS)
    assert_error(response, 400, "not_valid_params")


def test_by_id_returns_the_exchange_and_404_for_unknown(http):
    exchange_id = new_exchange_id(http)
    body = exact_json(http.get("/v2/exchange/by-id", query_string={"id": exchange_id}, headers=HEADERS))
    assert (body["id"], body["status"], body["amountFrom"], body["amountTo"]) == (exchange_id, "waiting", None, None)
    assert body["expectedAmountFrom"] == Decimal("1") and body["payoutHash"] is None
    unknown = http.get("/v2/exchange/by-id", query_string={"id": "ffffffffffffff"}, headers=HEADERS)
    assert_error(unknown, 404, "not_found")
    assert_error(http.get("/v2/exchange/by-id", headers=HEADERS), 400, "not_valid_params")


def test_status_progresses_to_finished(standin, http):
    exchange_id = new_exchange_id(http)
    seen = [standin.advance(exchange_id)["status"] for _ in range(4)]
    assert seen == ["confirming", "exchanging", "sending", "finished"]
    record = standin.exchanges[exchange_id]
    assert record["amountFrom"] == Decimal("1") and record["amountTo"] == Decimal("2468.05")
    assert re.fullmatch(r"0x[0-9a-f]{64}", record["payoutHash"]) and record["depositReceivedAt"]
    with pytest.raises(ValueError):
        standin.advance(exchange_id)


def test_received_deposit_sets_amount_to_from_the_rate(standin, http):
    exchange_id = new_exchange_id(http)
    record = standin.receive_deposit(exchange_id, Decimal("0.5"))
    # (0.5 - 0.002) * 2500 * 0.99 - 2
    assert record["status"] == "confirming"
    assert (record["amountFrom"], record["amountTo"]) == (Decimal("0.5"), Decimal("1230.55"))
    with pytest.raises(ValueError):
        standin.receive_deposit(exchange_id, Decimal("0.5"))


def test_advance_to_an_explicit_or_unknown_status(standin, http):
    exchange_id = new_exchange_id(http)
    assert standin.advance(exchange_id, "expired")["status"] == "expired"
    with pytest.raises(ValueError):
        standin.advance(exchange_id)
    with pytest.raises(ValueError):
        standin.advance(exchange_id, "teleported")
    with pytest.raises(KeyError):
        standin.advance("ffffffffffffff")


def test_control_routes_for_the_dev_stack(http):
    exchange_id = new_exchange_id(http)
    deposit = http.post(f"/_standin/exchanges/{exchange_id}/deposit", json={"amount": "0.5"})
    assert deposit.status_code == 200 and exact_json(deposit)["amountTo"] == Decimal("1230.55")
    advance_url = f"/_standin/exchanges/{exchange_id}/advance"
    assert http.post(advance_url, json={}).get_json()["status"] == "exchanging"
    assert http.post(advance_url, json={"status": "failed"}).get_json()["status"] == "failed"
    assert http.post(advance_url).status_code == 409
    assert http.post("/_standin/exchanges/ffffffffffffff/advance").status_code == 404
    assert http.post("/_standin/faults", json={"route": "by_id", "kind": "server_error"}).status_code == 200
    assert http.get("/v2/exchange/by-id", query_string={"id": exchange_id}, headers=HEADERS).status_code == 502
    assert http.post("/_standin/faults", json={"route": "nowhere", "kind": "hang"}).status_code == 400


def test_open_exchange_creates_one_as_post_exchange_would(standin, http):
    record = standin.open_exchange("eth", "usdt", Decimal("1"), EVM_WALLET)
    assert re.fullmatch(r"[0-9a-f]{14}", record["id"]) and record["status"] == "waiting"
    assert (record["fromNetwork"], record["toNetwork"], record["expectedAmountTo"]) == ("eth", "eth", Decimal("2468.05"))
    body = exact_json(http.get("/v2/exchange/by-id", query_string={"id": record["id"]}, headers=HEADERS))
    assert body == record
    assert [seen["route"] for seen in standin.requests_seen] == ["by_id"]  # nothing went through POST /exchange


def test_open_exchange_under_a_given_id_status_and_amount_to(standin):
    record = standin.open_exchange("eth", "usdt", Decimal("1"), EVM_WALLET, exchange_id="legacy-cn-id",
                                   status="finished", amount_to=Decimal("2400.5"))
    assert (record["id"], record["status"], record["amountTo"]) == ("legacy-cn-id", "finished", Decimal("2400.5"))
    assert record["amountFrom"] == Decimal("1") and re.fullmatch(r"0x[0-9a-f]{64}", record["payoutHash"])
    assert standin.exchanges["legacy-cn-id"] == record and standin.exchanges["legacy-cn-id"] is not record
    with pytest.raises(ValueError):
        standin.open_exchange("eth", "usdt", Decimal("1"), EVM_WALLET, exchange_id="legacy-cn-id")


def test_open_exchange_refuses_what_post_exchange_refuses(standin):
    with pytest.raises(ValueError):
        standin.open_exchange("eth", "usdt", Decimal("1"), EVM_WALLET, status="teleported")
    with pytest.raises(standin_module.ApiError, match="not_valid_address"):
        standin.open_exchange("eth", "usdt", Decimal("1"), "0x1234")
    assert standin.exchanges == {}


# ---- faults ------------------------------------------------------------------------------


def test_faults_play_count_times_on_their_route_only(standin, http):
    standin.inject_fault("estimate", "server_error", count=2, status=503)
    assert estimate(http).status_code == 503
    assert create(http).status_code == 200
    assert estimate(http).status_code == 503
    assert estimate(http).status_code == 200


def test_rate_limit_fault_sends_retry_after(standin, http):
    standin.inject_fault("create", "rate_limit", retry_after="7")
    response = create(http)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.get_json()["error"] == "too_many_requests"


def test_malformed_and_reply_faults(standin, http):
    standin.inject_fault("estimate", "malformed")
    standin.inject_fault("estimate", "reply", status=403, body={"error": "forbidden", "message": "no"})
    malformed = estimate(http)
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        json.loads(malformed.get_data())
    assert_error(estimate(http), 403, "forbidden")


def test_faults_come_before_the_api_key_check_and_are_recorded(standin, http):
    standin.inject_fault("by_id", "server_error")
    assert http.get("/v2/exchange/by-id", query_string={"id": "x"}).status_code == 502
    assert standin.requests_seen == [{"route": "by_id", "args": {"id": "x"}, "body": None, "api_key_ok": False}]


@pytest.mark.parametrize("route, kind", [("nowhere", "hang"), ("estimate", "explode"), ("estimate", "reply")])
def test_unknown_faults_are_refused(standin, route, kind):
    with pytest.raises(ValueError):
        standin.inject_fault(route, kind)


def test_cleared_faults_do_not_play(standin, http):
    standin.inject_fault("estimate", "server_error", count=3)
    standin.clear_faults()
    assert estimate(http).status_code == 200


# ---- real HTTP lifecycle -----------------------------------------------------------------


def test_serves_on_an_ephemeral_port_and_hangs_past_timeouts(standin):
    with standin:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v2", standin.url) and not standin.url.endswith(":0/v2")
        standin.inject_fault("estimate", "hang", hang_s=2.0)
        params = {"fromCurrency": "eth", "toCurrency": "usdt", "fromAmount": "1"}
        with pytest.raises(requests.Timeout):
            requests.get(standin.url + "/exchange/estimated-amount", params=params, headers=HEADERS, timeout=0.3)
        answer = requests.get(standin.url + "/exchange/estimated-amount", params=params, headers=HEADERS, timeout=2)
        assert answer.status_code == 200
        assert json.loads(answer.text, parse_float=Decimal)["toAmount"] == Decimal("2468.05")
    with pytest.raises(RuntimeError):
        standin.url


def test_main_wires_port_and_api_key(monkeypatch):
    served = []
    monkeypatch.setattr(ChangeNowStandIn, "serve_forever", lambda self: served.append((self.port, self.api_key)))
    assert standin_module.main(["--port", "18123", "--api-key", "dev-key"]) == 0
    assert served == [(18123, "dev-key")]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
