"""Tests of the token codec against the legacy golden vectors, every rejection path, and a fuzzer."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telepay_shared import errors, tokens
from telepay_shared.errors import TokenRejected
from telepay_shared.hops import HOPS
from telepay_shared.tokens import STR8, U32, Field, Hop

VECTORS = json.loads((Path(__file__).parent.parent / "testdata" / "token-vectors.json").read_text())
NOW = VECTORS["created_at"]
KEYS = VECTORS["keys"]
SUCCESS = KEYS["SUCCESS_URL_SIGNING_KEY"]
BINARY_HOPS = sorted(n for n, h in HOPS.items() if h.wire == tokens.BINARY)
B64_HOPS = sorted(n for n, h in HOPS.items() if not h.signed_body)
WINDOWED_HOPS = sorted(n for n, h in HOPS.items() if h.window is not None)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What the legacy receivers return beyond the sender's fields: GCHostPay3's defaults for a
# first-attempt token, and the retry encoder's +1 on attempt_count.
LEGACY_RECEIVER_VIEW = {
    "gchostpay1->gchostpay3": {"attempt_count": 1, "first_attempt_at": NOW, "error_code": None},
    "gchostpay3->gchostpay3": {"attempt_count": 2},
}


def vector(name: str) -> dict:
    """The golden vector of a hop."""
    return VECTORS["hops"][name]


def raw_of(token: str) -> bytes:
    """Reference base64url decoding (stdlib, padding restored)."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def token_of(raw: bytes) -> str:
    """Reference base64url encoding without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(payload: bytes, key: str = SUCCESS) -> bytes:
    """payload ‖ first 16 bytes of HMAC-SHA256, computed with the stdlib."""
    return payload + hmac.new(key.encode(), payload, hashlib.sha256).digest()[:16]


def reason(hop, token, now=NOW, keys=KEYS) -> str | None:
    """The rejection reason for a token, or None when it is accepted."""
    try:
        tokens.decode(hop, token, keys, now)
    except TokenRejected as exc:
        return exc.reason
    return None


def decoded_timestamp(name: str) -> int | None:
    """Timestamp the receiver sees for the vector (u16 minutes are floored to the minute)."""
    hop = HOPS[name]
    if hop.timestamp is None:
        return None
    return NOW // 60 * 60 if hop.timestamp == tokens.U16_MINUTES else NOW


# ---------------------------------------------------------------------------- golden vectors

def test_every_vector_hop_is_declared_once_under_its_name():
    assert sorted(HOPS) == sorted(VECTORS["hops"])
    assert all(hop.name == name for name, hop in HOPS.items())
    assert len({id(hop) for hop in HOPS.values()}) == 21


@pytest.mark.parametrize("name", sorted(VECTORS["hops"]))
def test_vector_decodes_to_its_fields(name):
    out = tokens.decode(name, vector(name)["token"], KEYS, NOW)
    assert out.pop(tokens.TIMESTAMP, None) == decoded_timestamp(name)
    assert out == {**vector(name)["fields"], **LEGACY_RECEIVER_VIEW.get(name, {})}


@pytest.mark.parametrize("name", sorted(VECTORS["hops"]))
def test_vector_fields_reencode_byte_exact(name):
    assert tokens.encode(HOPS[name], vector(name)["fields"], KEYS, NOW) == vector(name)["token"]


def test_decode_accepts_token_bytes():
    token = vector("gcsplit1->gcsplit2")["token"]
    assert tokens.decode("gcsplit1->gcsplit2", token.encode(), KEYS, NOW)["adjusted_amount"] == 0.004462


def test_clock_defaults_to_time_time():
    token = tokens.encode("gchostpay1->gchostpay2", vector("gchostpay1->gchostpay2")["fields"], KEYS)
    assert tokens.decode("gchostpay1->gchostpay2", token, KEYS)["cn_api_id"] == "e6c5b2a1d4f3a9"


# ---------------------------------------------------------------------------- rejections per style

# (truncated by one byte, extended by one byte) per decoder style; None = accepted.
LENGTH_OUTCOMES = {"A": ("wrong_length", "wrong_length"), "B": ("bad_signature", "bad_signature"),
                   "C": ("wrong_length", None)}


@pytest.mark.parametrize("name", B64_HOPS)
def test_tampered_payload_byte_is_bad_signature(name):
    raw = bytearray(raw_of(vector(name)["token"]))
    raw[-17] ^= 0x01  # last byte before the signature: structure unchanged
    assert reason(name, token_of(bytes(raw))) == "bad_signature"


@pytest.mark.parametrize("name", B64_HOPS)
def test_tampered_signature_byte_is_bad_signature(name):
    raw = bytearray(raw_of(vector(name)["token"]))
    raw[-1] ^= 0x80
    assert reason(name, token_of(bytes(raw))) == "bad_signature"


@pytest.mark.parametrize("name", B64_HOPS)
def test_wrong_key_is_bad_signature(name):
    keys = {**KEYS, HOPS[name].key: "another-key"}
    assert reason(name, vector(name)["token"], keys=keys) == "bad_signature"


@pytest.mark.parametrize("name", B64_HOPS)
def test_truncated_and_extended_tokens(name):
    raw = raw_of(vector(name)["token"])
    truncated, extended = LENGTH_OUTCOMES[HOPS[name].style]
    assert reason(name, token_of(raw[:-1])) == truncated
    assert reason(name, token_of(raw + b"\x00")) == extended


@pytest.mark.parametrize("name", B64_HOPS)
@pytest.mark.parametrize("bad", ["", "A", "!!!!", "AAAA AAAA", "AAAA\n", "AA==", "ab+/", "é", "A" * 20000])
def test_bad_base64_is_rejected(name, bad):
    assert reason(name, bad) in ("malformed", "wrong_length")


@pytest.mark.parametrize("name", B64_HOPS)
def test_padded_or_standard_alphabet_tokens_are_malformed(name):
    # Deviation: legacy's lenient base64 decoding accepted these; no legacy sender emits them.
    token = vector(name)["token"]
    padded = token + "=" * (-len(token) % 4 or 4)
    assert reason(name, padded) == "malformed"
    standard = base64.b64encode(raw_of(token)).rstrip(b"=").decode()
    if standard != token:
        assert reason(name, standard) == "malformed"


@pytest.mark.parametrize("not_a_token", [None, 12, 1.5, ["a"], {"token": "x"}])
def test_non_string_tokens_are_malformed(not_a_token):
    assert reason("gcsplit1->gcsplit2", not_a_token) == "malformed"


def smallest_fields(hop: Hop) -> dict:
    """Required fields at their smallest wire size: empty strings and zeros."""
    return {f.name: "" if f.enc in (STR8, tokens.FIX16) else 0 for f in hop.fields if not f.optional and not f.const}


@pytest.mark.parametrize("name", sorted(n for n, h in HOPS.items() if h.min_length))
def test_style_a_minimum_length(name):
    token = tokens.encode(name, smallest_fields(HOPS[name]), KEYS, NOW)
    too_short = len(raw_of(token)) < HOPS[name].min_length
    assert reason(name, token) == ("wrong_length" if too_short else None)
    if name in ("gchostpay1->gchostpay2", "gchostpay3->gchostpay1", "gcmicrobatch->gchostpay1"):
        assert too_short  # legacy minimums that well-formed tokens can violate


def test_legacy_success_url_minimum_rejects_four_empty_strings():
    payload = bytes(12) + b"\x00\x00" + b"\x00\x1e" + b"\x00" * 4  # 20 bytes of fields, 36 with signature
    assert reason("telepay->gcwebhook1", token_of(signed(payload))) == "wrong_length"


def test_style_b_shorter_than_a_signature_is_wrong_length():
    assert reason("gcsplit1->gcsplit2", token_of(bytes(15))) == "wrong_length"
    assert reason("gcbatchprocessor->gcsplit1", token_of(bytes(10))) == "wrong_length"


def test_style_b_signed_but_short_fields_is_wrong_length():
    assert reason("gcsplit1->gcsplit2", token_of(signed(b"\x00" * 30))) == "wrong_length"


def test_style_c_shorter_than_its_fields_is_wrong_length():
    raw = raw_of(vector("gchostpay1->gchostpay1")["token"])
    assert reason("gchostpay1->gchostpay1", token_of(raw[:-16])) == "wrong_length"
    assert reason("gchostpay1->gchostpay1", token_of(raw[:3])) == "wrong_length"


def test_style_a_checks_structure_before_signature():
    raw = raw_of(vector("gchostpay1->gchostpay2")["token"])
    wrong_key = {**KEYS, "SUCCESS_URL_SIGNING_KEY": "other"}
    assert reason("gchostpay1->gchostpay2", token_of(raw + b"x"), keys=wrong_key) == "wrong_length"


def test_style_b_checks_signature_before_structure():
    assert reason("gcsplit1->gcsplit2", token_of(b"\x00" * 40)) == "bad_signature"


def test_invalid_utf8_is_malformed_in_every_style():
    a_payload = b"\x02\xff\xfe" + raw_of(vector("gchostpay1->gchostpay2")["token"])[17:-16]
    assert reason("gchostpay1->gchostpay2", token_of(signed(a_payload))) == "malformed"
    b_payload = raw_of(vector("gcaccumulator->gcsplit3")["token"])[:-16].replace(b"-1003", b"\xc3\x28003")
    assert reason("gcaccumulator->gcsplit3", token_of(signed(b_payload))) == "malformed"
    c_payload = b"\x01\xff" + raw_of(vector("gchostpay1->gchostpay1")["token"])[43:-16]
    assert reason("gchostpay1->gchostpay1", token_of(signed(c_payload))) == "malformed"


def test_microbatch_order_requires_the_batch_literal():
    raw = raw_of(vector("gcmicrobatch->gchostpay1")["token"])
    assert raw[:6] == b"\x05batch"
    assert reason("gcmicrobatch->gchostpay1", token_of(signed(b"\x05batcx" + raw[6:-16]))) == "malformed"


def test_unknown_hop():
    assert reason("nobody->nowhere", vector("gcsplit1->gcsplit2")["token"]) == "unknown_hop"
    assert reason(None, "abc") == "unknown_hop"
    with pytest.raises(errors.BadRequest, match="unknown hop"):
        tokens.encode("nobody->nowhere", {}, KEYS, NOW)


def test_rejection_message_never_quotes_the_token():
    token = vector("gcsplit1->gcsplit2")["token"]
    with pytest.raises(TokenRejected) as caught:
        tokens.decode("gcsplit1->gcsplit2", token[:-2] + "zz", KEYS, NOW)
    assert token[:12] not in str(caught.value) and caught.value.http_status == 401


def test_missing_key_is_a_config_error_naming_the_variable():
    name = "gcsplit1->gchostpay1"
    keys = {k: v for k, v in KEYS.items() if k != "TPS_HOSTPAY_SIGNING_KEY"}
    with pytest.raises(errors.ConfigError, match="TPS_HOSTPAY_SIGNING_KEY"):
        tokens.decode(name, vector(name)["token"], keys, NOW)
    with pytest.raises(errors.ConfigError, match="TPS_HOSTPAY_SIGNING_KEY"):
        tokens.encode(name, vector(name)["fields"], {**keys, "TPS_HOSTPAY_SIGNING_KEY": ""}, NOW)


# ---------------------------------------------------------------------------- clock windows

def _window_token(name: str, at: int):
    """The vector's fields encoded at clock `at`, and the timestamp the receiver reads back."""
    token = tokens.encode(name, vector(name)["fields"], KEYS, at)
    return token, tokens.decode(name, token, KEYS, at)[tokens.TIMESTAMP]


@pytest.mark.parametrize("name", WINDOWED_HOPS)
def test_expired_at_one_second_past_the_window(name):
    past = HOPS[name].window[0]
    token, stamped = _window_token(name, NOW)
    assert reason(name, token, now=stamped + past) is None
    assert reason(name, token, now=stamped + past + 1) == "expired"


@pytest.mark.parametrize("name", WINDOWED_HOPS)
def test_future_beyond_the_skew_allowance(name):
    future = HOPS[name].window[1]
    token, stamped = _window_token(name, NOW)
    assert reason(name, token, now=stamped - future) is None
    assert reason(name, token, now=stamped - future - 1) == "future"


def test_signature_is_checked_before_the_clock():
    name = "gchostpay1->gchostpay2"
    raw = bytearray(raw_of(vector(name)["token"]))
    raw[3] ^= 0x20
    assert reason(name, token_of(bytes(raw)), now=NOW + 10**6) == "bad_signature"


def test_windows_follow_the_spec_with_the_documented_deviations():
    windows = {name: hop.window for name, hop in HOPS.items()}
    assert windows["telepay->gcwebhook1"] == (7200, 300) and windows["gcwebhook1->gcwebhook2"] == (86400, 300)
    assert windows["gcsplit1->gchostpay1"] == (7200, 5) and windows["gchostpay1->gcmicrobatch"] == (1800, 5)
    assert windows["gchostpay1->gchostpay1"] == (86400, 300) and windows["gcaccumulator->gcsplit3"] == (300, 5)
    # Deviation (defect 32): legacy allowed only 300 s of age on these two hops.
    assert windows["gchostpay1->gchostpay2"] == windows["gcmicrobatch->gchostpay1"] == (7200, 5)
    assert windows["gcwebhook1->gcsplit1"] is None and HOPS["gcbatchprocessor->gcsplit1"].timestamp is None


def test_unchecked_timestamps_are_still_returned():
    name = "gcwebhook1->gcsplit1"
    assert tokens.decode(name, vector(name)["token"], KEYS, NOW + 10**7)["timestamp"] == NOW
    assert "timestamp" not in tokens.decode("gcbatchprocessor->gcsplit1", vector("gcbatchprocessor->gcsplit1")["token"],
                                            KEYS, NOW + 10**9)


# ---------------------------------------------------------------------------- u16-minute timestamps

def legacy_u16_reading(minutes: int, now: int) -> int:
    """Legacy GCWebhook1/2 reconstruction (spec §2.4 note), kept here as the reference."""
    m = now // 60
    c = m % 65536
    base = m - c
    return (base - 65536 + minutes) * 60 if minutes > c else (base + minutes) * 60


def minutes_token(name: str, made_at: int) -> str:
    """A success-URL/invite token minted at made_at."""
    return tokens.encode(name, vector(name)["fields"], KEYS, made_at)


@pytest.mark.parametrize("name", ["telepay->gcwebhook1", "gcwebhook1->gcwebhook2"])
def test_u16_minute_boundary_floors_to_the_minute(name):
    minute = NOW // 60 * 60
    for made_at in (minute, minute + 59):
        out = tokens.decode(name, minutes_token(name, made_at), KEYS, minute + 60)
        assert out["timestamp"] == minute
    assert raw_of(minutes_token(name, minute + 60))[12:14] == ((minute // 60 + 1) % 65536).to_bytes(2, "big")


@pytest.mark.parametrize("name", ["telepay->gcwebhook1", "gcwebhook1->gcwebhook2"])
def test_u16_minute_cycle_wrap(name):
    wrap = (NOW // 60 // 65536 + 1) * 65536 * 60  # first second of a new 65536-minute cycle
    older = minutes_token(name, wrap - 60)  # stamped minute 65535
    assert raw_of(older)[12:14] == b"\xff\xff"
    assert tokens.decode(name, older, KEYS, wrap + 30)["timestamp"] == wrap - 60
    assert legacy_u16_reading(0xFFFF, wrap + 30) == wrap - 60
    newer = minutes_token(name, wrap)  # stamped minute 0, read one minute early (clock skew)
    assert tokens.decode(name, newer, KEYS, wrap - 30)["timestamp"] == wrap


@given(age=st.integers(0, 86400), now=st.integers(10**9, 4 * 10**9))
@FUZZ
def test_u16_minute_reading_matches_legacy_for_every_token_legacy_accepts(age, now):
    name = "gcwebhook1->gcwebhook2"
    past, future = HOPS[name].window
    minutes = (now - age) // 60 % 65536
    ts = legacy_u16_reading(minutes, now)
    if now - ts <= past:
        out = tokens.decode(name, minutes_token(name, now - age), KEYS, now)
        assert out["timestamp"] == ts
    else:
        assert reason(name, minutes_token(name, now - age), now=now) == "expired"


@pytest.mark.parametrize("ahead", [1, 59, 60, 120, 299])
def test_defect_31_fixed_small_future_skew_is_accepted(ahead):
    # Deviation from legacy: it read a stamp even one minute ahead as ~45.5 days old and rejected it.
    name = "telepay->gcwebhook1"
    now = NOW // 60 * 60 + 30
    token = minutes_token(name, now + ahead)
    stamped_minute = (now + ahead) // 60 % 65536
    if stamped_minute != now // 60 % 65536:
        assert now - legacy_u16_reading(stamped_minute, now) > 45 * 86400 - 120  # legacy: "too far"
    assert tokens.decode(name, token, KEYS, now)["timestamp"] == (now + ahead) // 60 * 60


@pytest.mark.parametrize("ahead", [360, 3600, 10 * 86400])
def test_u16_minute_tokens_far_ahead_are_future(ahead):
    now = NOW // 60 * 60
    assert reason("telepay->gcwebhook1", minutes_token("telepay->gcwebhook1", now + ahead), now=now) == "future"


@pytest.mark.parametrize("age_days", [2, 30, 45.5, 60])
def test_u16_minute_tokens_long_past_are_rejected(age_days):
    token = minutes_token("gcwebhook1->gcwebhook2", int(NOW - age_days * 86400))
    assert reason("gcwebhook1->gcwebhook2", token) in ("expired", "future")


# ---------------------------------------------------------------------------- field encodings

INVITE = "gcwebhook1->gcwebhook2"


@pytest.mark.parametrize("user_id", [-1, -(2**47), 2**47 - 1, 0, -1003268562225])
def test_id48_round_trips_negative_and_extreme_values(user_id):
    fields = {**vector(INVITE)["fields"], "user_id": user_id}
    token = tokens.encode(INVITE, fields, KEYS, NOW)
    assert raw_of(token)[:6] == (user_id % 2**48).to_bytes(6, "big")
    assert tokens.decode(INVITE, token, KEYS, NOW)["user_id"] == user_id


@pytest.mark.parametrize("user_id", [2**47, -(2**47) - 1, 1.5, "6271402111"])
def test_id48_out_of_range_or_wrong_type_is_refused(user_id):
    with pytest.raises(errors.BadRequest, match="'user_id'"):
        tokens.encode(INVITE, {**vector(INVITE)["fields"], "user_id": user_id}, KEYS, NOW)


SWAP = "gcsplit1->gcsplit3"


@pytest.mark.parametrize("unique_id, wire, decoded", [
    ("AB", b"AB" + b"\x00" * 14, "AB"),
    ("K7Q2ZP9X4M1B8C3D", b"K7Q2ZP9X4M1B8C3D", "K7Q2ZP9X4M1B8C3D"),
    ("K7Q2ZP9X4M1B8C3D-extra", b"K7Q2ZP9X4M1B8C3D", "K7Q2ZP9X4M1B8C3D"),
    # Deviation: legacy cut "é" in half and could not decode its own token; we cut before it.
    ("K7Q2ZP9X4M1B8C3" + "é", b"K7Q2ZP9X4M1B8C3\x00", "K7Q2ZP9X4M1B8C3"),
])
def test_fix16_pads_and_truncates(unique_id, wire, decoded):
    token = tokens.encode(SWAP, {**vector(SWAP)["fields"], "unique_id": unique_id}, KEYS, NOW)
    assert raw_of(token)[:16] == wire
    assert tokens.decode(SWAP, token, KEYS, NOW)["unique_id"] == decoded


STATUS = "gchostpay1->gchostpay2"


@pytest.mark.parametrize("payin", ["x" * 256, "é" * 128])
def test_str8_over_255_bytes_is_refused_on_encode(payin):
    with pytest.raises(errors.BadRequest, match=r"'payin_address'.*256 UTF-8 bytes.*255"):
        tokens.encode(STATUS, {**vector(STATUS)["fields"], "payin_address": payin}, KEYS, NOW)


def test_str8_of_exactly_255_bytes_round_trips():
    token = tokens.encode(STATUS, {**vector(STATUS)["fields"], "payin_address": "x" * 255}, KEYS, NOW)
    assert tokens.decode(STATUS, token, KEYS, NOW)["payin_address"] == "x" * 255


def test_encoder_lowercases_where_legacy_does():
    fields = {**vector(STATUS)["fields"], "from_currency": "ETH", "from_network": "Eth"}
    assert tokens.encode(STATUS, fields, KEYS, NOW) == vector(STATUS)["token"]


def test_encoder_refuses_missing_unknown_and_mistyped_fields():
    fields = vector(STATUS)["fields"]
    with pytest.raises(errors.BadRequest, match="'cn_api_id' is missing"):
        tokens.encode(STATUS, {k: v for k, v in fields.items() if k != "cn_api_id"}, KEYS, NOW)
    with pytest.raises(errors.BadRequest, match="'cn_api_id' is missing"):
        tokens.encode(STATUS, {**fields, "cn_api_id": None}, KEYS, NOW)
    with pytest.raises(errors.BadRequest, match="unknown field"):
        tokens.encode(STATUS, {**fields, "cn_api_idd": "x"}, KEYS, NOW)
    with pytest.raises(errors.BadRequest, match="'from_amount'"):
        tokens.encode(STATUS, {**fields, "from_amount": "0.1"}, KEYS, NOW)
    with pytest.raises(errors.BadRequest, match="'unique_id'"):
        tokens.encode(STATUS, {**fields, "unique_id": 42}, KEYS, NOW)
    with pytest.raises(errors.BadRequest, match="mapping"):
        tokens.encode(STATUS, [("unique_id", "x")], KEYS, NOW)


def test_encoder_accepts_its_own_decoded_dict():
    out = tokens.decode(STATUS, vector(STATUS)["token"], KEYS, NOW)
    assert tokens.encode(STATUS, out, KEYS, NOW) == vector(STATUS)["token"]


def test_decimal_amounts_are_sent_as_f64():
    fields = {**vector(STATUS)["fields"], "from_amount": Decimal("0.004462")}
    assert tokens.encode(STATUS, fields, KEYS, NOW) == vector(STATUS)["token"]


def test_encode_refuses_a_clock_outside_u32():
    with pytest.raises(errors.BadRequest):
        tokens.encode(STATUS, vector(STATUS)["fields"], KEYS, 2**32)


# ---------------------------------------------------------------------------- style B / C tolerance

def test_style_b_ignores_signed_bytes_between_fields_and_signature():
    name = "gcsplit1->gcsplit2"
    payload = raw_of(vector(name)["token"])[:-16]
    out = tokens.decode(name, token_of(signed(payload + b"\x00junk\xff")), KEYS, NOW)
    assert out == tokens.decode(name, vector(name)["token"], KEYS, NOW)


def test_style_a_refuses_signed_bytes_between_fields_and_signature():
    payload = raw_of(vector(STATUS)["token"])[:-16]
    assert reason(STATUS, token_of(signed(payload + b"junk"))) == "wrong_length"


def test_style_c_ignores_trailing_bytes_after_the_signature():
    name = "gchostpay1->gchostpay1"
    out = tokens.decode(name, token_of(raw_of(vector(name)["token"]) + b"trailing bytes"), KEYS, NOW)
    assert out["retry_count"] == 1 and out["unique_id"].startswith("batch_")


# ---------------------------------------------------------------------------- optional fields

def test_swap_request_without_the_swap_tail_gets_legacy_defaults():
    fields = {k: v for k, v in vector(SWAP)["fields"].items()
              if k not in ("swap_currency", "payout_mode", "actual_eth_amount")}
    token = tokens.encode(SWAP, fields, KEYS, NOW)
    assert len(raw_of(token)) == len(raw_of(vector(SWAP)["token"])) - 1 - 3 - 1 - 7 - 8
    out = tokens.decode(SWAP, token, KEYS, NOW)
    assert (out["swap_currency"], out["payout_mode"], out["actual_eth_amount"]) == ("usdt", "instant", 0.0)


def test_swap_response_without_actual_eth_amount_defaults_to_zero():
    name = "gcsplit3->gcsplit1"
    fields = {k: v for k, v in vector(name)["fields"].items() if k != "actual_eth_amount"}
    assert tokens.decode(name, tokens.encode(name, fields, KEYS, NOW), KEYS, NOW)["actual_eth_amount"] == 0.0


def test_execute_payment_refuses_a_status_check_token_without_context():
    # T10 carries T12's fields minus context under the same key: it must not order a payment.
    token = tokens.encode(STATUS, vector(STATUS)["fields"], KEYS, NOW)
    assert reason("gchostpay1->gchostpay3", token) == "wrong_length"


def test_execute_payment_defaults_the_retry_fields_of_a_first_attempt():
    out = tokens.decode("gchostpay1->gchostpay3", vector("gchostpay1->gchostpay3")["token"], KEYS, NOW + 7)
    assert out["context"] == "instant" and out["attempt_count"] == 1 and out["first_attempt_at"] == NOW + 7


def test_execute_payment_reads_the_retry_fields_of_a_retry_token():
    out = tokens.decode("gchostpay1->gchostpay3", vector("gchostpay3->gchostpay3")["token"], KEYS, NOW)
    assert (out["attempt_count"], out["first_attempt_at"], out["error_code"]) == (2, NOW, "CONFIRMATION_TIMEOUT")


def test_retry_token_requires_the_retry_fields():
    assert reason("gchostpay3->gchostpay3", vector("gchostpay1->gchostpay3")["token"]) == "wrong_length"


def test_optional_groups_are_all_or_nothing_and_trailing():
    base = vector("gchostpay1->gchostpay3")["fields"]
    with pytest.raises(errors.BadRequest, match="together"):
        tokens.encode("gchostpay1->gchostpay3", {**base, "attempt_count": 2, "first_attempt_at": NOW}, KEYS, NOW)
    no_context = {k: v for k, v in base.items() if k != "context"}
    retry = {"attempt_count": 2, "first_attempt_at": NOW, "error_code": ""}
    with pytest.raises(errors.BadRequest, match="'context' is missing"):  # required: see hops.EXECUTE_PAYMENT
        tokens.encode("gchostpay1->gchostpay3", {**no_context, **retry}, KEYS, NOW)
    token = tokens.encode("gchostpay1->gchostpay3", {**base, **retry}, KEYS, NOW)
    assert tokens.decode("gchostpay1->gchostpay3", token, KEYS, NOW)["error_code"] == ""


def test_retry_encoder_sends_the_next_attempt_number():
    fields = {**vector("gchostpay3->gchostpay3")["fields"], "attempt_count": 5}
    token = tokens.encode("gchostpay3->gchostpay3", fields, KEYS, NOW)
    assert tokens.decode("gchostpay3->gchostpay3", token, KEYS, NOW)["attempt_count"] == 6


def test_declarations_are_validated():
    with pytest.raises(ValueError, match="fixed-size"):
        Hop("x", (Field("a", STR8, default=""), Field("b", STR8)), "K")
    with pytest.raises(ValueError, match="constant"):
        Hop("x", (Field("a", U32, const="1"),), "K")
    with pytest.raises(ValueError, match="not allowed"):
        Hop("x", (Field("a", "u128"),), "K")
    with pytest.raises(ValueError, match="style B"):
        Hop("x", (), "K", tokens.STRICT, wire=tokens.JSON_SIG16)


# ---------------------------------------------------------------------------- JSON hops

SPLIT = "gcwebhook1->gcsplit1"
IPN = "nowpayments->np-webhook"
BATCH = "gcbatchprocessor->gcsplit1"


def hex_sig(body: bytes, key: str, digest=hashlib.sha256) -> str:
    """Lowercase hex HMAC, computed with the stdlib."""
    return hmac.new(key.encode(), body, digest).hexdigest()


def test_signed_json_accepts_the_subscription_price_alias():
    body = vector(SPLIT)["token"]["body"].replace('"sub_price"', '"subscription_price"').encode()
    out = tokens.decode_signed_body(SPLIT, body, hex_sig(body, SUCCESS), KEYS, NOW)
    assert out["subscription_price"] == 14.83


def test_signed_json_rejections():
    token = vector(SPLIT)["token"]
    tampered = token["body"].replace("14.83", "94.83")
    assert reason(SPLIT, {**token, "body": tampered}) == "bad_signature"
    assert reason(SPLIT, {**token, "signature": hex_sig(token["body"].encode(), "another-key")}) == "bad_signature"
    assert reason(SPLIT, {**token, "signature": token["signature"].upper()}) is None
    assert reason(SPLIT, {**token, "signature": "é" * 64}) == "malformed"
    assert reason(SPLIT, {"body": token["body"]}) == "malformed"
    assert reason(SPLIT, "not-a-dict") == "malformed"
    for body in (b'{"user_id": "6271402111"}', b"[1, 2]", b"{not json", b'{"user_id": true}'):
        assert reason(SPLIT, {"body": body, "signature": hex_sig(body, SUCCESS)}) == "malformed"


def test_signed_json_encodes_floats_and_refuses_bad_types():
    fields = {**vector(SPLIT)["fields"], "subscription_price": Decimal("14.83")}
    assert tokens.encode(SPLIT, fields, KEYS, NOW) == vector(SPLIT)["token"]
    with pytest.raises(errors.BadRequest, match="'user_id'"):
        tokens.encode(SPLIT, {**fields, "user_id": "6271402111"}, KEYS, NOW)


def test_nowpayments_signature_over_raw_body_bytes():
    body = b'{"payment_status": "finished",  "payment_id": 5077125051, "extra": null}'
    out = tokens.decode_signed_body(IPN, body, hex_sig(body, "dummy-ipn-secret", hashlib.sha512), KEYS, NOW)
    assert out == {"payment_status": "finished", "payment_id": 5077125051, "extra": None}


def test_nowpayments_signature_over_sorted_reserialisation():
    sorted_body = vector(IPN)["token"]["body"]
    delivered = json.dumps(dict(reversed(list(json.loads(sorted_body).items()))), indent=2)
    out = tokens.decode(IPN, {"body": delivered, "signature": vector(IPN)["token"]["signature"]}, KEYS, NOW)
    assert out == vector(IPN)["fields"]
    unicode_obj = {"order_id": "PGP-é", "payment_id": 1}
    canonical = json.dumps(unicode_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    signature = hex_sig(canonical, "dummy-ipn-secret", hashlib.sha512)
    assert tokens.decode(IPN, {"body": json.dumps(unicode_obj), "signature": signature}, KEYS, NOW) == unicode_obj


def test_nowpayments_rejections():
    token = vector(IPN)["token"]
    assert reason(IPN, {**token, "body": token["body"].replace("finished", "finishes")}) == "bad_signature"
    assert reason(IPN, {**token, "signature": hex_sig(token["body"].encode(), SUCCESS)}) == "bad_signature"
    assert reason(IPN, {**token, "body": "{broken"}) == "malformed"
    assert reason(IPN, {**token, "body": b"\xff\xfe"}) == "malformed"
    assert reason(IPN, {**token, "body": 12}) == "malformed"


def test_batch_token_amount_is_a_decimal_string_and_never_expires():
    fields = {**vector(BATCH)["fields"], "total_amount_usdt": Decimal("52.38000000")}
    token = tokens.encode(BATCH, fields, {"TPS_HOSTPAY_SIGNING_KEY": KEYS["TPS_HOSTPAY_SIGNING_KEY"]}, 0)
    assert token == vector(BATCH)["token"]
    assert tokens.decode(BATCH, token, KEYS, NOW + 10**9)["total_amount_usdt"] == "52.38000000"


def test_batch_token_signed_garbage_is_malformed():
    tps = KEYS["TPS_HOSTPAY_SIGNING_KEY"]
    for payload in (b"not json", b"[]", b'{"batch_id": 1}', b"\xff"):
        assert reason(BATCH, token_of(signed(payload, tps))) == "malformed"


# ---------------------------------------------------------------------------- HMAC and fuzzing

@given(key=st.binary(max_size=300), message=st.binary(max_size=300), digest=st.sampled_from(["sha256", "sha512"]))
@FUZZ
def test_cached_hmac_equals_stdlib_hmac(key, message, digest):
    assert tokens._mac(key, digest, message) == hmac.new(key, message, digest).digest()


def _only_rejections(name: str, token) -> None:
    """Decoding anything returns a dict or raises TokenRejected, nothing else."""
    try:
        assert isinstance(tokens.decode(name, token, KEYS, NOW), dict)
    except TokenRejected as exc:
        assert exc.reason in TokenRejected.REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@given(name=st.sampled_from(sorted(HOPS)), data=st.text(max_size=400) | st.binary(max_size=400) | json_values)
@FUZZ
def test_fuzz_random_input_only_raises_token_rejected(name, data):
    if HOPS[name].signed_body:
        data = {"body": data, "signature": data if isinstance(data, str) else "00"}
    _only_rejections(name, data)


@given(name=st.sampled_from(B64_HOPS), data=st.data())
@FUZZ
def test_fuzz_signed_mutations_of_real_tokens(name, data):
    payload = bytearray(raw_of(vector(name)["token"])[:-16])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and at < len(payload):
            payload[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del payload[at:at + data.draw(st.integers(1, 8))]
        else:
            del payload[at:]
    _only_rejections(name, token_of(signed(bytes(payload), KEYS[HOPS[name].key])))


@given(name=st.sampled_from(sorted(n for n, h in HOPS.items() if h.signed_body)), value=json_values)
@FUZZ
def test_fuzz_correctly_signed_json_bodies(name, value):
    body = json.dumps(value).encode()
    digest = hashlib.sha512 if HOPS[name].digest == "sha512" else hashlib.sha256
    _only_rejections(name, {"body": body, "signature": hex_sig(body, KEYS[HOPS[name].key], digest)})


@given(name=st.sampled_from(BINARY_HOPS), payload=st.binary(max_size=300))
@FUZZ
def test_fuzz_correctly_signed_random_payloads(name, payload):
    _only_rejections(name, token_of(signed(payload, KEYS[HOPS[name].key])))


# ---------------------------------------------------------------- our additions legacy ignores

def _without_trailer(name: str) -> Hop:
    """The hop as a legacy receiver declares it: same layout, no trailer."""
    import dataclasses
    return dataclasses.replace(HOPS[name], trailer=None)


@pytest.mark.parametrize("name", ["gcsplit1->gcsplit2", "gcsplit2->gcsplit1"])
def test_payout_key_trailer_round_trips_and_legacy_layout_still_decodes(name):
    fields = dict(vector(name)["fields"], payout_key="np:5077125051")
    token = tokens.encode(name, fields, KEYS, NOW)
    assert tokens.decode(name, token, KEYS, NOW)["payout_key"] == "np:5077125051"
    # A legacy (trailer-less) style-B decoder reads the same fields and ignores the signed trailer.
    legacy_view = tokens.decode(_without_trailer(name), token, KEYS, NOW)
    assert legacy_view == {**vector(name)["fields"], "timestamp": NOW}
    # Without the key the token is the legacy token, byte for byte.
    assert tokens.encode(name, vector(name)["fields"], KEYS, NOW) == vector(name)["token"]


def test_trailer_that_is_not_one_str8_is_ignored_like_legacy():
    name = "gcsplit1->gcsplit2"
    body = raw_of(vector(name)["token"])[:-16]
    for junk in (b"\x05ab", b"\x00\x00", b"\x02\xff\xfe"):
        decoded = tokens.decode(name, token_of(signed(body + junk)), KEYS, NOW)
        assert "payout_key" not in decoded
        assert decoded["adjusted_amount"] == vector(name)["fields"]["adjusted_amount"]


def test_trailer_too_long_is_refused_on_encode():
    fields = dict(vector("gcsplit1->gcsplit2")["fields"], payout_key="k" * 256)
    with pytest.raises(errors.BadRequest, match="payout_key"):
        tokens.encode("gcsplit1->gcsplit2", fields, KEYS, NOW)


def test_trailer_is_declared_only_on_last16_binary_hops():
    with pytest.raises(ValueError, match="trailer"):
        Hop("x", (Field("a", STR8),), "K", tokens.STRICT, U32, trailer="extra")


def test_instant_split_payment_id_is_an_extra_json_key_legacy_ignores():
    name = "gcwebhook1->gcsplit1"
    legacy = vector(name)["token"]
    ours = tokens.encode(name, dict(vector(name)["fields"], payment_id="5077125051"), KEYS, NOW)
    assert ours["body"] == legacy["body"][:-1] + ', "payment_id": "5077125051"}'
    assert tokens.decode(name, ours, KEYS, NOW)["payment_id"] == "5077125051"
    assert "payment_id" not in tokens.decode(name, legacy, KEYS, NOW)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
