"""Tests of the token CLI through main()."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from telepay_shared import tokens_cli

VECTORS = json.loads((Path(__file__).parent.parent / "testdata" / "token-vectors.json").read_text())
NOW = str(VECTORS["created_at"])
SUCCESS_KEY = "SUCCESS_URL_SIGNING_KEY=" + VECTORS["keys"]["SUCCESS_URL_SIGNING_KEY"]
ALL_KEYS = [arg for name, value in VECTORS["keys"].items() for arg in ("--key", f"{name}={value}")]


def run(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """Run the CLI with the given stdin; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = tokens_cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name", ["gcsplit1->gcsplit2", "telepay->gcwebhook1", "gcbatchprocessor->gcsplit1"])
def test_encode_prints_the_vector_token(monkeypatch, capsys, name):
    fields = json.dumps(VECTORS["hops"][name]["fields"])
    status, out, err = run(monkeypatch, capsys, ["encode", name, *ALL_KEYS, "--now", NOW], fields)
    assert (status, out.strip(), err) == (0, VECTORS["hops"][name]["token"], "")


def test_decode_prints_fields_and_round_trips(monkeypatch, capsys):
    name = "gcsplit1->gcsplit2"
    status, out, _ = run(monkeypatch, capsys, ["decode", name, VECTORS["hops"][name]["token"],
                                               "--key", SUCCESS_KEY, "--now", NOW])
    decoded = json.loads(out)
    assert status == 0 and decoded.pop("timestamp") == VECTORS["created_at"]
    assert decoded == VECTORS["hops"][name]["fields"]
    status, again, _ = run(monkeypatch, capsys, ["encode", name, "--key", SUCCESS_KEY, "--now", NOW], out)
    assert (status, again.strip()) == (0, VECTORS["hops"][name]["token"])


def test_json_hop_encodes_and_decodes_body_and_signature(monkeypatch, capsys):
    name = "gcwebhook1->gcsplit1"
    fields = json.dumps(VECTORS["hops"][name]["fields"])
    status, out, _ = run(monkeypatch, capsys, ["encode", name, "--key", SUCCESS_KEY, "--now", NOW], fields)
    assert status == 0 and json.loads(out) == VECTORS["hops"][name]["token"]
    status, decoded, _ = run(monkeypatch, capsys, ["decode", name, out.strip(), "--key", SUCCESS_KEY])
    assert status == 0 and json.loads(decoded)["subscription_price"] == 14.83


def test_decode_reads_the_token_from_stdin(monkeypatch, capsys):
    name = "nowpayments->np-webhook"
    token = json.dumps(VECTORS["hops"][name]["token"])
    status, out, _ = run(monkeypatch, capsys, ["decode", name, "-", *ALL_KEYS], token)
    assert status == 0 and json.loads(out) == VECTORS["hops"][name]["fields"]


@pytest.mark.parametrize("now, expected", [(NOW, "rejected: bad_signature"), ("1795873061", "rejected: bad_signature")])
def test_rejection_exits_1_with_the_reason(monkeypatch, capsys, now, expected):
    token = VECTORS["hops"]["gchostpay1->gchostpay2"]["token"]
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    status, out, err = run(monkeypatch, capsys, ["decode", "gchostpay1->gchostpay2", tampered,
                                                 "--key", SUCCESS_KEY, "--now", now])
    assert (status, out, err.strip()) == (1, "", expected)


def test_expired_token_exits_1(monkeypatch, capsys):
    token = VECTORS["hops"]["gchostpay1->gchostpay2"]["token"]
    status, _, err = run(monkeypatch, capsys, ["decode", "gchostpay1->gchostpay2", token,
                                               "--key", SUCCESS_KEY, "--now", str(VECTORS["created_at"] + 7201)])
    assert (status, err.strip()) == (1, "rejected: expired")


def test_unknown_hop_is_a_rejection(monkeypatch, capsys):
    status, _, err = run(monkeypatch, capsys, ["decode", "a->b", "AAAA", "--key", SUCCESS_KEY])
    assert (status, err.strip()) == (1, "rejected: unknown_hop")


def test_missing_key_names_the_flag(monkeypatch, capsys):
    name = "gcsplit1->gchostpay1"
    status, out, err = run(monkeypatch, capsys, ["decode", name, VECTORS["hops"][name]["token"], "--key", SUCCESS_KEY])
    assert status == 2 and out == ""
    assert "--key TPS_HOSTPAY_SIGNING_KEY=VALUE" in err


def test_refused_fields_exit_1(monkeypatch, capsys):
    fields = {**VECTORS["hops"]["gchostpay1->gchostpay2"]["fields"], "payin_address": "x" * 300}
    status, _, err = run(monkeypatch, capsys, ["encode", "gchostpay1->gchostpay2", "--key", SUCCESS_KEY],
                         json.dumps(fields))
    assert status == 1 and "refused:" in err and "'payin_address'" in err


@pytest.mark.parametrize("argv, stdin", [
    (["encode", "gcsplit1->gcsplit2", "--key", "NOEQUALS"], "{}"),
    (["encode", "gcsplit1->gcsplit2", "--key", SUCCESS_KEY], "{not json"),
    (["encode", "gcsplit1->gcsplit2", "--key", SUCCESS_KEY], "[1]"),
    (["decode", "gcsplit1->gcsplit2", "--key", SUCCESS_KEY], ""),
    (["decode", "gcwebhook1->gcsplit1", "{not json", "--key", SUCCESS_KEY], ""),
])
def test_usage_errors_exit_2(monkeypatch, capsys, argv, stdin):
    status, out, err = run(monkeypatch, capsys, argv, stdin)
    assert (status, out) == (2, "") and err.startswith("usage error:")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
