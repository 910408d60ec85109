"""Alerts: the structured record is always written; Slack gets it when enabled; failures never raise."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from telepay_shared.alerts import Alerter
from telepay_shared.config import Secret, load_config

DECLARATION = {
    "service": "alerting-test",
    "secrets": {"HOST_WALLET_PRIVATE_KEY": {}, "SLACK_ALERT_WEBHOOK": {"type": "url", "optional": True}},
    "env": {"ALERTING_ENABLED": {"type": "bool", "default": "true"}},
}
PRIVATE_KEY = "0x" + "5e" * 32


class Slack:
    """A local stand-in for a Slack incoming webhook: records bodies, answers `status` after `delay_s`."""

    def __init__(self, status: int = 200, delay_s: float = 0.0):
        self.bodies: list[dict] = []
        slack = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                slack.bodies.append(json.loads(body))
                time.sleep(delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/secret-path"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack():
    stand_in = Slack()
    yield stand_in
    stand_in.close()


def config_for(tmp_path, **env):
    path = tmp_path / "service_config.json"
    path.write_text(json.dumps(DECLARATION))
    return load_config(path, environ={"HOST_WALLET_PRIVATE_KEY": PRIVATE_KEY, **env})


def alert_records(caplog):
    return [r for r in caplog.records if getattr(r, "alert", False)]


def test_alerting_is_on_when_the_variable_is_unset(tmp_path, slack):
    # Defect 26: legacy crashed on the unset variable and ran with alerting silently off.
    alerter = Alerter.from_config("gchostpay3", config_for(tmp_path, SLACK_ALERT_WEBHOOK=slack.url))
    assert alerter.enabled and alerter.notifies
    assert alerter.alert("eth_payment_failed_permanently", "transfer reverted", unique_id="K7Q2ZP9X4M1B8C3D")
    assert len(slack.bodies) == 1


def test_alert_is_a_structured_error_record_with_its_ids(caplog):
    alerter = Alerter("gchostpay3")
    with caplog.at_level(logging.INFO):
        assert alerter.alert("eth_payment_failed_permanently", "transfer reverted",
                             unique_id="batch_" + "0" * 36, tx_hash="0xab", attempt_count=3) is False
        alerter.alert("host_wallet_key_mismatch", "wrong key", severity="CRITICAL", name="shadowed field")
    first, second = alert_records(caplog)
    assert (first.levelname, first.event_type, first.unique_id, first.tx_hash, first.attempt_count) == (
        "ERROR", "eth_payment_failed_permanently", "batch_" + "0" * 36, "0xab", 3)
    assert first.alert_service == "gchostpay3" and "transfer reverted" in first.getMessage()
    assert (second.levelname, second.alert_name) == ("CRITICAL", "shadowed field")
    with pytest.raises(ValueError):
        alerter.alert("x", "y", severity="WARNING")


def test_slack_message_carries_the_fields_but_never_a_secret(tmp_path, slack):
    config = config_for(tmp_path, SLACK_ALERT_WEBHOOK=slack.url)
    alerter = Alerter.from_config("gchostpay3", config)
    alerter.alert("eth_payment_failed_permanently", f"signing with {PRIVATE_KEY} failed",
                  unique_id="K7Q2ZP9X4M1B8C3D", key=Secret("HOST_WALLET_PRIVATE_KEY", PRIVATE_KEY),
                  details={"amount": "0.004462", "currency": "eth"})
    [body] = slack.bodies
    text = body["text"]
    assert "eth_payment_failed_permanently" in text and "K7Q2ZP9X4M1B8C3D" in text and "0.004462" in text
    assert PRIVATE_KEY not in text and "5e5e5e" not in text and "secret-path" not in text
    assert text.count("***") == 2


@pytest.mark.parametrize("enabled, notify", [("false", True), ("true", False)])
def test_no_slack_message_when_disabled_or_not_asked_but_the_record_is_written(tmp_path, slack, caplog,
                                                                                enabled, notify):
    alerter = Alerter.from_config("gchostpay3", config_for(tmp_path, ALERTING_ENABLED=enabled,
                                                           SLACK_ALERT_WEBHOOK=slack.url))
    assert alerter.alert("insufficient_funds", "top up the wallet", notify=notify) is False
    assert slack.bodies == []
    assert [r.event_type for r in alert_records(caplog)] == ["insufficient_funds"]


def test_without_a_webhook_only_the_record_is_written(tmp_path, caplog):
    alerter = Alerter.from_config("gchostpay3", config_for(tmp_path))
    assert alerter.enabled and not alerter.notifies
    assert alerter.alert("eth_payment_failed_permanently", "reverted") is False
    assert len(alert_records(caplog)) == 1


@pytest.mark.parametrize("status, delay_s", [(500, 0.0), (200, 1.0)])
def test_slack_failure_or_timeout_is_logged_never_raised(caplog, status, delay_s):
    failing = Slack(status=status, delay_s=delay_s)
    try:
        alerter = Alerter("gchostpay3", slack_webhook=failing.url, timeout_s=0.3)
        started = time.monotonic()
        assert alerter.alert("eth_payment_failed_permanently", "reverted") is False
        assert time.monotonic() - started < 0.9
    finally:
        failing.close()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "not delivered to Slack" in warning.getMessage() and "secret-path" not in warning.getMessage()


def test_unreachable_slack_is_logged_never_raised(caplog):
    alerter = Alerter("gchostpay3", slack_webhook="http://127.0.0.1:9/hooks/secret-path", timeout_s=1)
    assert alerter.alert("eth_payment_failed_permanently", "reverted") is False
    assert any("not delivered to Slack" in r.getMessage() for r in caplog.records)
