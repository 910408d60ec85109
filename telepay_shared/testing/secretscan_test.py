"""Tests of the secret scan: every form a secret can take in a log is found, short values are not looked for."""
from __future__ import annotations

import base64

import pytest

from telepay_shared.testing.secretscan import Finding, SecretScan, secret_forms

SIGNING_KEY = "dummy-success-url-signing-key"
WALLET_KEY = "0x" + "5c" * 32


@pytest.mark.parametrize("text, form", [
    (f"key={SIGNING_KEY};", "raw"),
    (SIGNING_KEY.encode().hex(), "utf8-hex"),
    (base64.b64encode(SIGNING_KEY.encode()).decode(), "utf8-base64"),
])
def test_a_text_secret_is_found_raw_hex_and_base64(text, form):
    assert SecretScan({"SIGNING": SIGNING_KEY}).find(f"line: {text}\n", "probe.log") == [
        Finding("SIGNING", form, "probe.log")]


@pytest.mark.parametrize("text, form", [
    (WALLET_KEY, "raw"), (WALLET_KEY[2:], "hex"), (WALLET_KEY[2:].upper(), "hex-upper"),
    (base64.b64encode(bytes.fromhex(WALLET_KEY[2:])).decode(), "bytes-base64"),
])
def test_a_hex_key_is_found_with_or_without_0x_in_either_case_and_as_base64_of_its_bytes(text, form):
    found = SecretScan({"WALLET": WALLET_KEY}).find(text, "probe.log")
    assert Finding("WALLET", form, "probe.log") in found


def test_bytes_keys_are_looked_for_as_hex_and_base64():
    raw = bytes(range(40, 72))
    assert set(secret_forms(raw)) == {"hex", "hex-upper", "base64", "base64url"}
    assert SecretScan({"RAW": raw}).find(f"sig {raw.hex()}", "x")[0].form == "hex"


def test_clean_text_and_too_short_values_find_nothing():
    scan = SecretScan({"SIGNING": SIGNING_KEY, "SHORT": "abc", "EMPTY": ""})
    assert scan.find("abc dummy-success-url *** nothing", "x") == [] and scan.findings == []


def test_findings_accumulate_and_name_the_secret_never_the_value():
    scan = SecretScan({"SIGNING": SIGNING_KEY})
    scan.find(SIGNING_KEY, "a.log")
    scan.find(SIGNING_KEY, "b.log")
    assert [str(f) for f in scan.findings] == ["a.log: secret SIGNING (raw form)", "b.log: secret SIGNING (raw form)"]


def test_a_secret_learnt_after_the_log_line_is_still_found_in_it():
    scan = SecretScan({"EARLY": "early-secret-0123"})
    assert scan.find("INFO gcsplit2 key late-secret-4567 was used", "test_x") == []
    scan.add("LATE", "late-secret-4567")
    assert [str(finding) for finding in scan.findings] == ["test_x: secret LATE (raw form)"]
    assert scan.find("nothing here", "test_y") == [] and len(scan.findings) == 1

if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
