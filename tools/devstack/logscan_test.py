"""The stack's log scan on a stack folder of its own (no process started): planted secrets are found."""
from __future__ import annotations

import base64
import json

import pytest

from tools.devstack.logscan import find_secrets, stack_secrets
from tools.devstack.stack import Settings, Stack
from tools.devstack.wiring import OIDC_KEY_NAME

HOST_KEY = "0x" + "a7" * 32


@pytest.fixture
def stack(tmp_path):
    """A stack folder with its secrets made and a chain's info.json, as `up` leaves them."""
    local = Stack(tmp_path / "dev", source_root=tmp_path, bin_root=tmp_path, settings=Settings(), say=lambda text: None)
    local.path("chain").mkdir(parents=True)
    local.path("chain", "info.json").write_text(json.dumps({"host_private_key": HOST_KEY, "rpc_url": "http://x"}))
    local.path("logs").mkdir()
    return local


def write_log(stack, name: str, *lines: str) -> None:
    """A part's log, as the stack writes it."""
    stack.path("logs", name).write_text("\n".join(["starting", *lines, "stopped"]) + "\n")


def test_the_stack_secrets_are_its_keys_the_oidc_key_and_the_host_wallet_key(stack):
    secrets = stack_secrets(stack)
    assert {"SUCCESS_URL_SIGNING_KEY", "TPS_HOSTPAY_SIGNING_KEY", "NOWPAYMENTS_IPN_SECRET", "CHANGENOW_API_KEY",
            "TELEGRAM_BOT_SECRET_NAME", OIDC_KEY_NAME, "HOST_WALLET_PRIVATE_KEY"} <= set(secrets)
    assert secrets["HOST_WALLET_PRIVATE_KEY"] == HOST_KEY


def test_clean_logs_have_no_finding(stack):
    write_log(stack, "gcsplit1.log", '{"severity": "INFO", "message": "task enqueued", "key": "***"}')
    assert find_secrets(stack.path("logs"), stack_secrets(stack)) == []


@pytest.mark.parametrize("planted, expected", [
    (lambda s: f"signature key {s['SUCCESS_URL_SIGNING_KEY']}", "gchostpay3.log: secret SUCCESS_URL_SIGNING_KEY (raw form)"),
    (lambda s: "key=" + HOST_KEY[2:].upper(), "gchostpay3.log: secret HOST_WALLET_PRIVATE_KEY (hex-upper form)"),
    (lambda s: base64.b64encode(bytes.fromhex(HOST_KEY[2:])).decode(),
     "gchostpay3.log: secret HOST_WALLET_PRIVATE_KEY (bytes-base64 form)"),
    (lambda s: s[OIDC_KEY_NAME].splitlines()[3], f"gchostpay3.log: secret {OIDC_KEY_NAME} (pem-line-2 form)"),
    (lambda s: f"bot/{s['TELEGRAM_BOT_SECRET_NAME']}/sendMessage",
     "gchostpay3.log: secret TELEGRAM_BOT_SECRET_NAME (raw form)"),
])
def test_a_planted_secret_is_found_naming_file_secret_and_form_never_the_value(stack, planted, expected):
    secrets = stack_secrets(stack)
    write_log(stack, "gcsplit1.log", "nothing here")
    write_log(stack, "gchostpay3.log", planted(secrets))
    findings = find_secrets(stack.path("logs"), secrets)
    assert expected in findings and all(f.startswith("gchostpay3.log: ") for f in findings), findings
    assert not any(value in "\n".join(findings) for value in secrets.values())


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
