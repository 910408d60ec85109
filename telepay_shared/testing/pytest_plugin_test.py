"""Tests of the plugin's helpers (delivered_tokens against its own delivery recorder, slow_inserts, client)
and of its secret scan of every log (run in a pytest subprocess, so a planted leak fails only that session)."""
import json
import os
import sys
import time
import urllib.request

import pytest

from telepay_shared import errors, hops, tokens
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS, delivered_tokens, slow_inserts

pytest_plugins = ["telepay_shared.testing.pytest_plugin", "pytester"]

ESTIMATE = VECTORS["hops"]["gcsplit1->gcsplit2"]
LEGACY_CLOCK = VECTORS["created_at"]


def deliver(recorder, path: str, token: str) -> None:
    """POST a task body carrying `token`, as the emulator delivers it."""
    request = urllib.request.Request(recorder.url(path), data=json.dumps({"token": token}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200


def test_decodes_every_delivered_token_in_order(deliveries):
    fields = {**ESTIMATE["fields"], "user_id": 42}
    deliver(deliveries, "/gcsplit2", ESTIMATE["token"])
    deliver(deliveries, "/gcsplit2", tokens.encode(hops.ESTIMATE_REQUEST, fields, KEYS, now=LEGACY_CLOCK))
    decoded = delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/gcsplit2", count=2, now=LEGACY_CLOCK)
    assert decoded == [{**ESTIMATE["fields"], "timestamp": LEGACY_CLOCK}, {**fields, "timestamp": LEGACY_CLOCK}]


def test_a_delivery_elsewhere_or_a_wrong_count_fails(deliveries):
    deliver(deliveries, "/gcsplit3", ESTIMATE["token"])
    with pytest.raises(AssertionError, match="/gcsplit3"):
        delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/gcsplit2", now=LEGACY_CLOCK)
    deliver(deliveries, "/gcsplit3", ESTIMATE["token"])
    with pytest.raises(AssertionError, match="exactly 1"):
        delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/gcsplit3", now=LEGACY_CLOCK)


def test_keys_and_clock_are_the_callers(deliveries):
    other_keys = {**KEYS, hops.ESTIMATE_REQUEST.key: "another-signing-key"}
    deliver(deliveries, "/", tokens.encode(hops.ESTIMATE_REQUEST, ESTIMATE["fields"], other_keys, now=LEGACY_CLOCK))
    decoded = delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/", keys=other_keys, now=LEGACY_CLOCK)
    assert decoded[0]["timestamp"] == LEGACY_CLOCK
    with pytest.raises(errors.TokenRejected) as rejected:
        delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/", now=LEGACY_CLOCK)
    assert rejected.value.reason == "bad_signature"
    with pytest.raises(errors.TokenRejected) as rejected:
        delivered_tokens(deliveries, hops.ESTIMATE_REQUEST, "/", keys=other_keys, now=LEGACY_CLOCK - 30 * 86400)
    assert rejected.value.reason == "future"


def test_a_stale_task_for_an_earlier_recorder_on_the_same_port_is_not_recorded(deliveries):
    # The session's emulator keeps redelivering earlier tests' tasks; the port may be reused.
    base = deliveries.url("/").split("/", 3)
    stale = urllib.request.Request(f"{base[0]}//{base[2]}/0123456789ab/usdt-eth-estimate", data=b"{}", method="POST")
    assert urllib.request.urlopen(stale).status == 200  # accepted, so the emulator stops retrying
    assert deliveries.deliveries() == []
    deliver(deliveries, "/usdt-eth-estimate", ESTIMATE["token"])
    assert [d.path for d in deliveries.deliveries()] == ["/usdt-eth-estimate"]


@pytest.fixture
def make_client():
    return lambda **values: ("client", values)


def test_client_is_the_modules_make_client_with_its_defaults(client):
    assert client == ("client", {})


def test_slow_inserts_holds_every_insert_into_the_table(database):
    with database.transaction() as tx:
        tx.execute("CREATE TABLE probe (id integer)")
    slow_inserts(database, "probe")
    started = time.monotonic()
    with database.transaction() as tx:
        tx.execute("INSERT INTO probe VALUES (1)")
    assert time.monotonic() - started >= 1.4


LEAKS = {
    "log_record": ('logging.getLogger("probe").warning("signing with %s", KEYS["SUCCESS_URL_SIGNING_KEY"])',
                   "*test_leak.py::test_leak (log record of probe): secret SUCCESS_URL_SIGNING_KEY (raw form)"),
    "stdout_base64": ('print(base64.b64encode(KEYS["TPS_HOSTPAY_SIGNING_KEY"].encode()).decode())',
                      "*test_leak.py::test_leak (Captured stdout call): secret TPS_HOSTPAY_SIGNING_KEY (utf8-base64 form)"),
    "configured_wallet_key": ('print("key", CONFIGURED["HOST_WALLET_PRIVATE_KEY"][2:].upper())',
                              "*test_leak.py::test_leak (Captured stdout call): secret HOST_WALLET_PRIVATE_KEY (hex-upper form)"),
}
LEAK_MODULE = """
import base64, json, logging
from telepay_shared.testing.pytest_plugin import KEYS, add_environment_secrets, scan_of

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
CONFIGURED = {"HOST_WALLET_PRIVATE_KEY": "0x" + "4f" * 32, "DATABASE_URL": "postgresql://app:pg-pass-word@h/db"}

def test_leak(request):
    add_environment_secrets(scan_of(request.config), {"secrets": ["HOST_WALLET_PRIVATE_KEY"]}, CONFIGURED)
    %s
"""


def run_session(pytester, monkeypatch, statement: str):
    """Runs a one-test session executing statement, in a subprocess with this process's import path."""
    pytester.makepyfile(test_leak=LEAK_MODULE % statement)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_a_secret_in_any_log_fails_the_session_naming_it_but_never_its_value(pytester, monkeypatch, leak):
    statement, finding = LEAKS[leak]
    result = run_session(pytester, monkeypatch, statement)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*secrets found in the logs of this test session*", finding])
    assert "1 passed" in result.stdout.str()  # the test itself passed: the scan failed the session
    assert KEYS["SUCCESS_URL_SIGNING_KEY"] not in result.stdout.str() + result.stderr.str()


def test_a_secret_the_service_logger_redacts_passes_and_a_dsn_password_does_not(pytester, monkeypatch):
    statement = ('from telepay_shared import web; web.configure_logging("probe", [KEYS["SUCCESS_URL_SIGNING_KEY"]]);'
                 ' logging.getLogger("probe").warning("signing with %s", KEYS["SUCCESS_URL_SIGNING_KEY"])')
    assert run_session(pytester, monkeypatch, statement).ret == pytest.ExitCode.OK
    leaked_password = run_session(pytester, monkeypatch, 'print(CONFIGURED["DATABASE_URL"])')
    assert leaked_password.ret == pytest.ExitCode.TESTS_FAILED
    leaked_password.stdout.fnmatch_lines(["*secret DATABASE_URL password (raw form)"])


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
