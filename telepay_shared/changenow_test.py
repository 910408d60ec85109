"""ChangeNowClient against the ChangeNOW stand-in over real HTTP on 127.0.0.1."""
from __future__ import annotations

import email.utils
import re
import secrets
import socket
import time
from decimal import Decimal

import pytest

from telepay_shared import errors
from telepay_shared.changenow import ChangeNowClient, decimal_text, retry_after_seconds
from telepay_shared.standins.changenow import ChangeNowStandIn

API_KEY = "cn-test-key-" + secrets.token_hex(8)
USDT_TRX_WALLET = "TJRabPrwbZy45sbavfcjinPJC18kjpRTv8"
EVM_WALLET = "0x" + "ab" * 20
BUDGET_S = 3.0


@pytest.fixture
def standin():
    """A stand-in with round prices: 1 ETH = 2000 USDT, 0.001 ETH deposit fee, 1.5 USDT withdrawal fee."""
    server = ChangeNowStandIn(
        api_key=API_KEY,
        prices_usd={"eth": Decimal("2000"), "usdt": Decimal("1"), "btc": Decimal("50000")},
        networks={"eth": ("eth",), "usdt": ("eth", "trx"), "btc": ("btc",)},
        spread=Decimal("0"),
        deposit_fees={"eth": Decimal("0.001")},
        withdrawal_fees={"usdt": Decimal("1.5")},
        min_usd=Decimal("5"),
        max_usd=Decimal("100000"),
        inactive_pairs=(("btc", "usdt"),),
        hang_s=2.0,
    ).start()
    yield server
    server.stop()


@pytest.fixture
def sleeps():
    """Seconds the client asked to sleep, recorded instead of slept."""
    return []


def make_client(standin, sleeps, **overrides) -> ChangeNowClient:
    """A client on the stand-in with a recording sleep and short limits."""
    settings = dict(timeout_s=0.5, max_attempts=3, max_total_wait_s=BUDGET_S, sleep=sleeps.append, backoff_base_s=0.5)
    settings.update(overrides)
    return ChangeNowClient(API_KEY, base_url=standin.url, **settings)


@pytest.fixture
def client(standin, sleeps):
    return make_client(standin, sleeps)


def estimate_half_eth(client):
    """The estimate most tests use: 0.5 ETH to USDT on Tron."""
    return client.estimate("eth", "usdt", Decimal("0.5"), "eth", "trx")


def create_half_eth(client, **extra):
    """The exchange most tests use: 0.5 ETH to a USDT wallet on Tron."""
    return client.create_exchange("eth", "usdt", Decimal("0.5"), USDT_TRX_WALLET, "eth", "trx", **extra)


# ---- happy paths -------------------------------------------------------------------------


def test_estimate_returns_net_payout_and_fees_as_exact_decimals(client, standin):
    estimate = client.estimate("ETH", "USDT", Decimal("0.5"), "ETH", "TRX")
    # (0.5 - 0.001 deposit fee) * 2000 - 1.5 withdrawal fee
    assert estimate.to_amount == Decimal("996.5")
    assert estimate.from_amount == Decimal("0.5")
    assert estimate.deposit_fee == Decimal("0.001")
    assert estimate.withdrawal_fee == Decimal("1.5")
    assert all(isinstance(v, Decimal) for v in (estimate.to_amount, estimate.deposit_fee, estimate.withdrawal_fee))
    assert (estimate.from_currency, estimate.to_currency, estimate.to_network) == ("eth", "usdt", "trx")
    sent = standin.requests_seen[-1]["args"]
    assert sent["fromCurrency"] == "eth" and sent["toNetwork"] == "trx"
    assert (sent["flow"], sent["type"], sent["fromAmount"]) == ("standard", "direct", "0.5")


@pytest.mark.parametrize(
    "amount, text",
    [
        (Decimal("0.123456789012345678"), "0.123456789012345678"),
        (Decimal("1E+1"), "10"),
        (Decimal("0.10"), "0.10"),
        (Decimal("2.5E-3"), "0.0025"),
    ],
)
def test_amounts_travel_as_exact_decimal_text(client, standin, amount, text):
    estimate = client.estimate("eth", "usdt", amount, "eth", "eth")
    assert standin.requests_seen[-1]["args"]["fromAmount"] == text
    assert estimate.from_amount == amount
    assert str(estimate.from_amount) == text


@pytest.mark.parametrize(
    "amount, error", [(0.1, TypeError), (True, TypeError), ("0.1", TypeError), (Decimal("NaN"), ValueError)]
)
def test_amounts_that_are_not_finite_decimals_are_refused(amount, error):
    with pytest.raises(error):
        decimal_text(amount)


def test_create_exchange_returns_deposit_details(client, standin):
    exchange = create_half_eth(client, user_id=42)
    assert re.fullmatch(r"[0-9a-f]{14}", exchange.exchange_id)
    assert re.fullmatch(r"0x[0-9a-f]{40}", exchange.payin_address)
    assert exchange.payout_address == USDT_TRX_WALLET
    assert exchange.from_amount == Decimal("0.5") and exchange.to_amount == Decimal("996.5")
    assert (exchange.flow, exchange.exchange_type) == ("standard", "direct")
    body = standin.requests_seen[-1]["body"]
    assert (body["fromAmount"], body["userId"], body["address"]) == ("0.5", "42", USDT_TRX_WALLET)


def test_null_refund_address_becomes_empty_text(client, standin):
    exchange = create_half_eth(client)
    assert standin.exchanges[exchange.exchange_id]["refundAddress"] is None
    assert exchange.refund_address == "" and exchange.payin_extra_id == ""


def test_given_refund_address_is_kept(client):
    assert create_half_eth(client, refund_address=EVM_WALLET).refund_address == EVM_WALLET


def test_exchange_status_follows_the_exchange(client, standin):
    exchange_id = create_half_eth(client).exchange_id
    waiting = client.exchange_status(exchange_id)
    assert (waiting.status, waiting.in_progress, waiting.finished) == ("waiting", True, False)
    assert waiting.amount_from == Decimal(0) and waiting.amount_to == Decimal(0)
    assert waiting.payout_hash is None and waiting.expected_amount_to == Decimal("996.5")
    standin.receive_deposit(exchange_id, Decimal("0.25"))
    standin.advance(exchange_id, "finished")
    finished = client.exchange_status(exchange_id)
    assert (finished.status, finished.in_progress, finished.finished) == ("finished", False, True)
    # (0.25 - 0.001) * 2000 - 1.5
    assert finished.amount_from == Decimal("0.25") and finished.amount_to == Decimal("496.5")
    assert finished.payout_hash and finished.deposit_received_at


def test_status_amounts_may_come_as_strings_and_nulls(client, standin):
    body = {"id": "abcdef01234567", "status": "sending", "amountFrom": "0.3", "amountTo": None, "refundAddress": None}
    standin.inject_fault("by_id", "reply", status=200, body=body)
    status = client.exchange_status("abcdef01234567")
    assert status.amount_from == Decimal("0.3") and status.amount_to == Decimal(0)
    assert status.refund_address == "" and status.expected_amount_from is None


# ---- errors that are not retried -----------------------------------------------------------


@pytest.mark.parametrize(
    "call, changenow_error",
    [
        (lambda c: c.estimate("doge", "usdt", Decimal("1"), "doge", "eth"), "not_valid_params"),
        (lambda c: c.estimate("eth", "usdt", Decimal("0"), "eth", "eth"), "deposit_too_small"),
        (lambda c: c.estimate("eth", "usdt", Decimal("0.001"), "eth", "eth"), "deposit_too_small"),
        (lambda c: c.estimate("eth", "usdt", Decimal("51"), "eth", "eth"), "out_of_range"),
        (lambda c: c.estimate("btc", "usdt", Decimal("1"), "btc", "eth"), "pair_is_inactive"),
        (lambda c: c.create_exchange("eth", "usdt", Decimal("1"), "not-a-wallet", "eth", "eth"), "not_valid_address"),
        (lambda c: c.exchange_status(""), "not_valid_params"),
    ],
)
def test_rejections_carry_changenow_code_and_are_not_retried(client, standin, sleeps, call, changenow_error):
    with pytest.raises(errors.ChangeNowRejected) as caught:
        call(client)
    assert isinstance(caught.value, errors.PermanentError) and caught.value.http_status == 400
    assert caught.value.changenow_error == changenow_error and caught.value.changenow_message
    assert len(standin.requests_seen) == 1 and sleeps == []


def test_unknown_exchange_id_is_not_found(client, standin):
    with pytest.raises(errors.ChangeNowNotFound) as caught:
        client.exchange_status("0123456789abcd")
    assert isinstance(caught.value, errors.NotFound) and caught.value.http_status == 404
    assert len(standin.requests_seen) == 1


def test_wrong_api_key_is_auth_failed_transient_and_not_retried(standin, sleeps):
    wrong_key = "wrong-" + secrets.token_hex(8)
    client = ChangeNowClient(wrong_key, base_url=standin.url, sleep=sleeps.append)
    with pytest.raises(errors.ChangeNowAuthFailed) as caught:
        estimate_half_eth(client)
    assert isinstance(caught.value, errors.TransientError) and caught.value.http_status == 503
    assert wrong_key not in str(caught.value) and wrong_key not in repr(caught.value.details)
    assert len(standin.requests_seen) == 1 and sleeps == []


@pytest.mark.parametrize(
    "status, error_class",
    [
        (500, errors.ChangeNowUnavailable),
        (503, errors.ChangeNowUnavailable),
        (408, errors.ChangeNowUnavailable),
        (429, errors.ChangeNowRateLimited),
        (401, errors.ChangeNowAuthFailed),
        (403, errors.ChangeNowAuthFailed),
        (400, errors.ChangeNowRejected),
        (422, errors.ChangeNowRejected),
        (404, errors.ChangeNowRejected),  # a 404 outside by-id is not "unknown exchange"
    ],
)
def test_http_status_maps_to_error_class(standin, sleeps, status, error_class):
    standin.inject_fault("create", "reply", status=status, body={"error": "some_code", "message": "said so"})
    with pytest.raises(error_class) as caught:
        create_half_eth(make_client(standin, sleeps, max_attempts=1))
    assert type(caught.value) is error_class
    assert caught.value.details["changenow_status"] == status


@pytest.mark.parametrize(
    "route, call, body",
    [
        ("create", create_half_eth, {"payinAddress": EVM_WALLET, "fromAmount": 0.5}),
        ("create", create_half_eth, {"id": "abcdef01234567", "payinAddress": None}),
        ("create", create_half_eth, {"id": " ", "payinAddress": EVM_WALLET}),
        ("estimate", estimate_half_eth, {"fromAmount": 0.5, "toAmount": None}),
        ("estimate", estimate_half_eth, {"fromAmount": 0.5, "toAmount": "lots"}),
        ("estimate", estimate_half_eth, {"fromAmount": 0.5, "toAmount": True}),
        ("by_id", lambda c: c.exchange_status("abcdef01234567"), {"id": "abcdef01234567"}),
    ],
)
def test_unusable_success_body_is_bad_response_without_retry(client, standin, sleeps, route, call, body):
    standin.inject_fault(route, "reply", status=200, body=body)
    with pytest.raises(errors.ChangeNowBadResponse) as caught:
        call(client)
    assert isinstance(caught.value, errors.ChangeNowUnavailable)
    # Retrying a create in-call would only mint more exchanges; Cloud Tasks redelivers instead.
    assert len(standin.requests_seen) == 1 and sleeps == []


# ---- retries -----------------------------------------------------------------------------


def test_rate_limit_honours_retry_after_then_succeeds(client, standin, sleeps):
    standin.inject_fault("estimate", "rate_limit", retry_after="2")
    assert estimate_half_eth(client).to_amount == Decimal("996.5")
    assert sleeps == [2.0] and len(standin.requests_seen) == 2


def test_retry_after_as_http_date_is_honoured(client, standin, sleeps):
    standin.inject_fault("by_id", "rate_limit", retry_after=email.utils.formatdate(time.time() + 3, usegmt=True))
    exchange_id = create_half_eth(client).exchange_id
    assert client.exchange_status(exchange_id).status == "waiting"
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 3.0


def test_retry_after_longer_than_budget_raises_at_once(client, standin, sleeps):
    standin.inject_fault("create", "rate_limit", retry_after="30")
    with pytest.raises(errors.ChangeNowRateLimited) as caught:
        create_half_eth(client)
    assert caught.value.retry_after_s == 30.0 and caught.value.http_status == 429
    assert sleeps == [] and len(standin.requests_seen) == 1


def test_rate_limit_until_attempts_run_out(client, standin, sleeps):
    standin.inject_fault("estimate", "rate_limit", count=3, retry_after="1")
    with pytest.raises(errors.ChangeNowRateLimited) as caught:
        estimate_half_eth(client)
    assert caught.value.retry_after_s == 1.0
    assert sleeps == [1.0, 1.0] and len(standin.requests_seen) == 3


def test_rate_limit_without_retry_after_backs_off(client, standin, sleeps):
    standin.inject_fault("estimate", "rate_limit", retry_after=None)
    estimate_half_eth(client)
    assert len(sleeps) == 1 and 0.25 <= sleeps[0] <= 0.5


def test_server_errors_then_success_back_off_exponentially_with_jitter(client, standin, sleeps):
    standin.inject_fault("create", "server_error", count=2)
    assert create_half_eth(client).payin_address.startswith("0x")
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    assert len(standin.requests_seen) == 3


def test_timeout_then_success(client, standin, sleeps):
    standin.inject_fault("estimate", "hang", hang_s=2.0)
    started = time.monotonic()
    assert estimate_half_eth(client).to_amount == Decimal("996.5")
    assert time.monotonic() - started < 1.8, "the client must give up on the hung request at timeout_s"
    assert len(sleeps) == 1


def test_retries_exhausted_raise_unavailable(client, standin, sleeps):
    standin.inject_fault("estimate", "server_error", count=5, status=503)
    with pytest.raises(errors.ChangeNowUnavailable) as caught:
        estimate_half_eth(client)
    assert type(caught.value) is errors.ChangeNowUnavailable and caught.value.details["changenow_status"] == 503
    assert len(standin.requests_seen) == 3 and len(sleeps) == 2


def test_malformed_json_is_retried(client, standin, sleeps):
    standin.inject_fault("create", "malformed")
    assert create_half_eth(client).exchange_id
    assert len(sleeps) == 1


def test_malformed_json_every_time_is_unavailable(client, standin):
    standin.inject_fault("create", "malformed", count=3)
    with pytest.raises(errors.ChangeNowUnavailable):
        create_half_eth(client)
    assert len(standin.requests_seen) == 3


def test_connection_refused_is_unavailable(sleeps):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = ChangeNowClient(API_KEY, base_url=f"http://127.0.0.1:{closed_port}/v2", sleep=sleeps.append)
    with pytest.raises(errors.ChangeNowUnavailable) as caught:
        client.exchange_status("0123456789abcd")
    assert "unreachable" in str(caught.value) and len(sleeps) == 2


@pytest.mark.parametrize("kind", ["server_error", "rate_limit", "malformed"])
def test_total_sleep_stays_within_budget(standin, sleeps, kind):
    for _ in range(5):  # the jitter is random: several rounds
        sleeps.clear()
        standin.inject_fault("estimate", kind, count=10, retry_after="0.4")
        client = make_client(standin, sleeps, max_attempts=10, max_total_wait_s=1.0)
        with pytest.raises(errors.ChangeNowUnavailable if kind != "rate_limit" else errors.ChangeNowRateLimited):
            estimate_half_eth(client)
        assert sleeps and sum(sleeps) <= 1.0 + 1e-9
        standin.clear_faults()


# ---- secrets -----------------------------------------------------------------------------


def test_api_key_never_in_errors_or_logs(standin, sleeps, caplog):
    caplog.set_level("DEBUG")
    echo = {"error": "not_valid_params", "message": f"key {API_KEY}"}
    standin.inject_fault("estimate", "reply", status=400, body=echo)
    standin.inject_fault("estimate", "reply", status=401, body={"error": "unauthorized", "message": API_KEY})
    standin.inject_fault("estimate", "server_error", count=3)
    standin.inject_fault("estimate", "rate_limit", count=3, retry_after="0")
    standin.inject_fault("estimate", "malformed", count=3)
    standin.inject_fault("estimate", "reply", status=200, body={"toAmount": None, "echo": API_KEY})
    client = make_client(standin, sleeps)
    raised = []
    for _ in range(6):
        with pytest.raises(errors.TelePayError) as caught:
            estimate_half_eth(client)
        raised.append(caught.value)
    assert [type(e) for e in raised] == [
        errors.ChangeNowRejected,
        errors.ChangeNowAuthFailed,
        errors.ChangeNowUnavailable,
        errors.ChangeNowRateLimited,
        errors.ChangeNowUnavailable,
        errors.ChangeNowBadResponse,
    ]
    for error in raised:
        for text in (str(error), repr(error), repr(error.details), repr(vars(error)), str(error.__cause__)):
            assert API_KEY not in text
    assert "***" in raised[0].changenow_message
    assert API_KEY not in caplog.text and API_KEY not in repr(client)


def test_empty_api_key_is_a_config_error():
    with pytest.raises(errors.ConfigError):
        ChangeNowClient("  ")


@pytest.mark.parametrize(
    "header, expected",
    [
        ("5", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("", None),
        (None, None),
        ("-1", None),
        ("inf", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_retry_after_seconds(header, expected):
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert retry_after_seconds(header, now=lambda: now) == expected


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
