"""GCHostPay3's pure rules: the order a token carries, exact base units, fees, nonces, the classifier."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import requests

from telepay_shared import errors, hops, tokens
from telepay_shared.config import load_config
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gchostpay3 import rules
from services.gchostpay3.app import CONFIG_PATH
from services.gchostpay3.rules import Asset, Failure, Fees, InvalidOrder

T12 = VECTORS["hops"]["gchostpay1->gchostpay3"]
T13 = VECTORS["hops"]["gchostpay3->gchostpay3"]
MINTED_AT = VECTORS["created_at"]
ETH = Asset("eth", 18)
USDT = Asset("usdt", 6, "0xdAC17F958D2ee523a2206206994597C13D831ec7")
DAI = Asset("dai", 18, "0x6B175474E89094C44Da98b954EedeAC495271d0F")
ASSETS = {"eth": ETH, "usdt": USDT, "dai": DAI}
PAYIN = T12["fields"]["payin_address"]


def order(**changes) -> rules.Order:
    fields = {**T12["fields"], "attempt_count": 1, "first_attempt_at": MINTED_AT, "error_code": None,
              "timestamp": MINTED_AT, **changes}
    return rules.order_from_token(fields)


def test_legacy_t12_vector_decodes_into_a_first_attempt():
    fields = tokens.decode(hops.EXECUTE_PAYMENT, T12["token"], KEYS, now=MINTED_AT)
    decoded = rules.order_from_token(fields)
    assert decoded == rules.Order(
        unique_id="K7Q2ZP9X4M1B8C3D", cn_api_id="e6c5b2a1d4f3a9", currency="eth", network="eth",
        amount=Decimal("0.004462"), payin_address=PAYIN, context="instant", attempt=1,
        first_attempt_at=MINTED_AT, last_error_code=None, issued_at=MINTED_AT)


def test_legacy_t13_vector_decodes_with_its_retry_fields():
    decoded = rules.order_from_token(tokens.decode(hops.EXECUTE_PAYMENT, T13["token"], KEYS, now=MINTED_AT))
    # Legacy's encoder was given attempt_count 1 and sent 2 (the next attempt's number).
    assert (decoded.attempt, decoded.first_attempt_at, decoded.last_error_code) == (2, 1795863061,
                                                                                  "CONFIRMATION_TIMEOUT")
    assert decoded.amount == Decimal("0.004462") and decoded.unique_id == "K7Q2ZP9X4M1B8C3D"


def test_retry_token_round_trips_through_the_endpoint_decoder():
    failure = Failure("RPC_CONNECTION_FAILED", True)
    token = tokens.encode(hops.EXECUTE_RETRY, rules.retry_token_fields(order(), failure), KEYS, now=MINTED_AT)
    again = rules.order_from_token(tokens.decode(hops.EXECUTE_PAYMENT, token, KEYS, now=MINTED_AT))
    assert again == order(attempt_count=2, error_code="RPC_CONNECTION_FAILED")


@pytest.mark.parametrize("amount, asset, units", [
    (0.004462, ETH, 4_462_000_000_000_000),
    (12.345678, USDT, 12_345_678),
    (250.5, USDT, 250_500_000),
    (0.123456789012345678, DAI, 123_456_789_012_345_680),  # the f64's shortest repr, digit for digit
    (0.1 + 0.2, ETH, 300_000_000_000_000_040),
    (1e-18, ETH, 1),
])
def test_amounts_become_exact_base_units(amount, asset, units):
    assert rules.transfer_for(order(from_amount=amount, from_currency=asset.symbol), ASSETS).units == units


@pytest.mark.parametrize("amount", [1.0000001, 0.1 + 0.2, 1e-7])
def test_amounts_finer_than_the_token_are_refused_not_truncated(amount):
    # Defect 34: legacy sent int(amount * 10**6) and silently dropped the rest.
    assert int(amount * 10**6) != Decimal(repr(amount)) * 10**6
    with pytest.raises(InvalidOrder) as refused:
        rules.transfer_for(order(from_amount=amount, from_currency="usdt"), ASSETS)
    assert refused.value.error_code == "INVALID_AMOUNT" and refused.value.http_status == 400


@pytest.mark.parametrize("changes, code", [
    ({"from_amount": 0.0}, "INVALID_AMOUNT"),
    ({"from_amount": -1.5}, "INVALID_AMOUNT"),
    ({"from_amount": float("nan")}, "INVALID_AMOUNT"),
    ({"from_amount": float("inf")}, "INVALID_AMOUNT"),
    ({"from_currency": "btc"}, "UNSUPPORTED_CURRENCY"),
    ({"from_currency": "link"}, "UNSUPPORTED_CURRENCY"),
    ({"from_network": "trx"}, "UNSUPPORTED_NETWORK"),
    ({"payin_address": "0x123"}, "INVALID_ADDRESS"),
    ({"payin_address": "TXYZ1234567890abcdefghijklmnopqrstuv"}, "INVALID_ADDRESS"),
    ({"payin_address": "0x9f8E7D6C5B4a39281706f5e4d3C2b1a098765432"}, "INVALID_ADDRESS"),  # bad checksum
    ({"unique_id": ""}, "INVALID_UNIQUE_ID"),
    ({"unique_id": "x" * 65}, "INVALID_UNIQUE_ID"),
])
def test_orders_that_cannot_be_paid_are_refused(changes, code):
    with pytest.raises(InvalidOrder) as refused:
        rules.transfer_for(order(**changes), ASSETS)
    assert refused.value.error_code == code


def test_deposit_address_is_checksummed_whatever_its_case():
    checksummed = "0x9F8E7D6C5B4a39281706f5e4d3C2b1a098765432"
    for written in (PAYIN, "0x" + PAYIN[2:].upper(), checksummed):
        assert rules.transfer_for(order(payin_address=written), ASSETS).payin == checksummed
    assert rules.transfer_for(order(unique_id="batch_" + "f" * 36), ASSETS).asset is ETH


def test_erc20_assets_come_from_the_configuration_with_mainnet_defaults(tmp_path):
    env = {"SUCCESS_URL_SIGNING_KEY": "k", "HOST_WALLET_PRIVATE_KEY": "k", "ETHEREUM_RPC_URL": "http://node:8545",
           "HOST_WALLET_ETH_ADDRESS": PAYIN, "CLOUD_TASKS_PROJECT_ID": "p", "CLOUD_TASKS_LOCATION": "l",
           "GCHOSTPAY1_URL": "http://hp1", "GCHOSTPAY3_URL": "http://hp3"}
    assets = rules.assets_from_config(load_config(CONFIG_PATH, environ=env))
    assert assets == {"eth": ETH, "usdt": USDT, "dai": DAI,
                      "usdc": Asset("usdc", 6, "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48")}
    local = {**env, "ERC20_DAI_CONTRACT": "0x" + "42" * 20, "ERC20_DAI_DECIMALS": "6"}
    assert rules.assets_from_config(load_config(CONFIG_PATH, environ=local))["dai"] == Asset(
        "dai", 6, "0x" + "42" * 20)
    with pytest.raises(errors.ConfigError, match="ERC20_USDT_CONTRACT"):
        rules.assets_from_config(load_config(CONFIG_PATH, environ={**env, "ERC20_USDT_CONTRACT": "0x12"}))
    assert json.loads(CONFIG_PATH.read_text())["env"]["ALERTING_ENABLED"]["default"] == "true"  # defect 26


def test_gas_limits_and_the_eth_a_transfer_needs():
    fees = Fees(max_fee=30, priority_fee=2)
    assert rules.eth_needed(rules.Transfer(ETH, PAYIN, 1000), fees) == 1000 + 21_000 * 30
    assert rules.eth_needed(rules.Transfer(USDT, PAYIN, 10**9), fees) == 100_000 * 30  # tokens: gas only


@pytest.mark.parametrize("base_fee, tip, gas_price, expected", [
    (10 * 10**9, 10**9, None, Fees(21 * 10**9, 10**9)),  # 2 x base + median tip
    (10 * 10**9, None, None, Fees(22 * 10**9, 2 * 10**9)),  # no rewards reported: legacy's 2 gwei tip
    (None, None, 30 * 10**9, Fees(30 * 10**9, 2 * 10**9)),  # no fee history: gas price + 2 gwei
    (None, None, 5 * 10**8, Fees(5 * 10**8, 5 * 10**8)),  # the tip never exceeds the cap
])
def test_eip1559_fees(base_fee, tip, gas_price, expected):
    assert rules.eip1559_fees(base_fee, tip, gas_price) == expected


def test_eip1559_fees_without_any_data_fail():
    with pytest.raises(ValueError):
        rules.eip1559_fees(None, None, None)


@pytest.mark.parametrize("chain_pending, recorded, expected", [
    (0, None, 0), (5, None, 5), (5, 2, 5), (5, 5, 6), (0, 7, 8),
])
def test_next_nonce_passes_the_node_and_every_recorded_nonce(chain_pending, recorded, expected):
    assert rules.next_nonce(chain_pending, recorded) == expected


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


@pytest.mark.parametrize("exc, failure", [
    (requests.ConnectionError("Max retries exceeded"), Failure("RPC_CONNECTION_FAILED", True)),
    (requests.ReadTimeout("read timed out"), Failure("NETWORK_TIMEOUT", True)),
    (_http_error(429), Failure("RATE_LIMIT_EXCEEDED", True)),
    (_http_error(503), Failure("RPC_CONNECTION_FAILED", True)),
    (_http_error(401), Failure("RPC_CONNECTION_FAILED", False)),
    (ValueError("insufficient funds for gas * price + value"), Failure("INSUFFICIENT_FUNDS", False)),
    (ValueError("Sender does not have enough balance to cover transaction value and gas"),
     Failure("INSUFFICIENT_FUNDS", False)),
    (ValueError("nonce too low"), Failure("NONCE_CONFLICT", True)),
    (ValueError("replacement transaction underpriced"), Failure("NONCE_CONFLICT", True)),
    (ValueError("max fee per gas less than block base fee"), Failure("GAS_PRICE_SPIKE", True)),
    (ValueError("execution reverted: blocked"), Failure("TRANSACTION_REVERTED_PERMANENT", False)),
    (ValueError("Transaction 0xab is not in the chain after 300 seconds"), Failure("CONFIRMATION_TIMEOUT", True)),
    (ValueError("Unknown format 'xyz', attempted to normalize to an address"), Failure("UNKNOWN_ERROR", True)),
    (RuntimeError("something odd"), Failure("UNKNOWN_ERROR", True)),
])
def test_classifier_names_failures_like_legacy(exc, failure):
    assert rules.classify(exc) == failure


def test_broadcast_refusals_are_told_apart():
    assert rules.nonce_already_used(ValueError("nonce too low: next nonce 5, tx nonce 3"))
    assert rules.nonce_already_used(ValueError("Invalid transaction nonce: Expected 1, but got 0"))
    assert not rules.nonce_already_used(ValueError("Invalid transaction nonce: Expected 1, but got 2"))
    assert rules.already_known(ValueError("already known")) and not rules.already_known(ValueError("nonce too low"))


def test_review_is_due_before_the_token_window_closes():
    issued = order(timestamp=1_000_000)
    assert not rules.review_due(issued, 1_000_000 + 6599, 6600)
    assert rules.review_due(issued, 1_000_000 + 6600, 6600)
    assert 6600 < hops.EXECUTE_PAYMENT.window[0]


def test_completion_token_carries_the_receipt_for_gchostpay1():
    fields = rules.completion_token_fields(order(), "0x" + "ab" * 32, 21000, 21456789)
    token = tokens.encode(hops.PAYMENT_COMPLETED, fields, KEYS, now=MINTED_AT)
    assert token == VECTORS["hops"]["gchostpay3->gchostpay1"]["token"]  # byte for byte what legacy sent


def test_endpoint_joins_base_and_path():
    assert rules.endpoint("https://hp1.run.app/", "/payment-completed") == "https://hp1.run.app/payment-completed"
    assert rules.endpoint("https://hp3.run.app", "/") == "https://hp3.run.app/"
