"""GCSplit1 against the legacy T3/T5/T7/T9 vectors, real PostgreSQL and the Cloud Tasks emulator.

The service's clock is pinned at the vectors' created_at, so legacy tokens are served exactly as
minted; tokens the tests build are minted at that clock too.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from decimal import Decimal

import pytest

from telepay_shared import errors, hops, tokens
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS, delivered_tokens

from services.gcsplit1 import rules
from services.gcsplit1.app import CONFIG_PATH, SIGNATURE_HEADER, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
NOW = VECTORS["created_at"]
T3, T4, T5, T6, T7, T8, T9 = (VECTORS["hops"][name] for name in (
    "gcwebhook1->gcsplit1", "gcsplit1->gcsplit2", "gcsplit2->gcsplit1", "gcsplit1->gcsplit3",
    "gcsplit3->gcsplit1", "gcsplit1->gchostpay1", "gcbatchprocessor->gcsplit1"))
DAY = 86400


class RecordingTasks:
    """The real Cloud Tasks client, remembering every enqueue so tests see attempts, not only deliveries."""

    def __init__(self, real):
        self.real, self.keys = real, []

    def enqueue(self, queue, url, body, **options):
        self.keys.append(options.get("idempotency_key"))
        return self.real.enqueue(queue, url, body, **options)


@pytest.fixture
def env(service_env, database_url, deliveries):
    """The service's environment with queues of its own, so task names never collide across tests."""
    run = uuid.uuid4().hex[:8]
    return service_env(
        CONFIG_PATH, DATABASE_URL=database_url,
        GCSPLIT2_URL=deliveries.url("/gcsplit2"), GCSPLIT3_URL=deliveries.url("/gcsplit3"),
        HOSTPAY_WEBHOOK_URL=deliveries.url("/gchostpay1"),
        GCSPLIT2_QUEUE=f"estimate-{run}", GCSPLIT3_QUEUE=f"swap-{run}", HOSTPAY_QUEUE=f"hostpay-{run}",
    )


@pytest.fixture
def spy(tasks):
    return RecordingTasks(tasks)


@pytest.fixture
def client(env, load_service_config, database, spy):
    app = create_app(load_service_config(CONFIG_PATH, env), database=database, tasks=spy, clock=lambda: NOW)
    return app.test_client()


# ---------------------------------------------------------------- helpers


def post_t3(client, signed: dict, signature: str | None = None):
    """Deliver a T3 body with its X-Webhook-Signature header, as GCWebhook1's task does."""
    headers = {SIGNATURE_HEADER: signature if signature is not None else signed["signature"]}
    return client.post("/", data=signed["body"], headers=headers, content_type="application/json")


def signed_t3(**changes) -> dict:
    """The legacy T3 fields with changes, signed as GCWebhook1 signs them."""
    return tokens.encode(hops.INSTANT_SPLIT, {**T3["fields"], **changes}, KEYS, now=NOW)


def token(hop, vector, now=NOW, keys=KEYS, **changes) -> str:
    """A token of `hop` holding the vector's fields with changes."""
    return tokens.encode(hop, {**vector["fields"], **changes}, keys, now=now)


def delivered(deliveries, path, hop, count=1) -> list[dict]:
    """Decode the tokens the emulator delivered to `path` (checks that nothing went anywhere else)."""
    return delivered_tokens(deliveries, hop, path, count=count, now=NOW)


def rows(database, table: str) -> list[dict]:
    """Every row of a split table, oldest first."""
    with database.transaction() as tx:
        return tx.fetchall(f"SELECT * FROM {table} ORDER BY created_at, unique_id")


def estimate_for(t4: dict, to_amount=0.7321, deposit_fee=0.0, withdrawal_fee=0.0123) -> str:
    """The T5 GCSplit2 answers a T4 with (ChangeNOW echoes the amount asked)."""
    fields = {name: t4[name] for name in (
        "user_id", "closed_channel_id", "wallet_address", "payout_currency", "payout_network", "swap_currency",
        "payout_mode", "actual_eth_amount", "payout_key")}
    return tokens.encode(hops.ESTIMATE_RESPONSE, {
        **fields, "from_amount": t4["adjusted_amount"], "to_amount_eth_post_fee": to_amount,
        "deposit_fee": deposit_fee, "withdrawal_fee": withdrawal_fee}, KEYS, now=NOW)


def insert_payout_request(database, unique_id: str, payout_key: str) -> None:
    """A split_payout_request recorded earlier (by an earlier delivery)."""
    with database.transaction() as tx:
        tx.execute("INSERT INTO split_payout_request (unique_id, idempotency_key) VALUES (%s, %s)",
                   (unique_id, payout_key))


def assert_nothing_happened(database, deliveries) -> None:
    """No row written, no task delivered."""
    assert rows(database, "split_payout_request") == [] and rows(database, "split_payout_que") == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def tampered(token_text: str) -> str:
    """The token with one payload character changed (the signature no longer matches)."""
    swapped = "A" if token_text[5] != "A" else "B"
    return token_text[:5] + swapped + token_text[6:]


# ---------------------------------------------------------------- POST / (T3)


def test_legacy_t3_vector_verifies_and_sends_the_legacy_t4(client, database, spy, deliveries):
    answer = post_t3(client, T3["token"])
    assert answer.status_code == 200, answer.json
    [t4] = delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    legacy_key = "legacy:" + hashlib.sha256(T3["token"]["body"].encode()).hexdigest()
    assert t4.pop("payout_key") == legacy_key
    t4.pop("timestamp")
    assert t4 == T4["fields"]  # exactly what legacy GCSplit1 sent for this payment (0.0046 ETH less 3 %)
    # Legacy never checked the signed timestamp, so a captured request re-triggered the payout
    # (defect 2); once the payout is recorded under the body's key, a replay starts nothing.
    insert_payout_request(database, "K7Q2ZP9X4M1B8C3D", legacy_key)
    replay = post_t3(client, T3["token"])
    assert replay.status_code == 200 and replay.json["idempotent"] is True
    assert spy.keys == [f"gcsplit2:{legacy_key}"]


def test_payment_id_keys_the_payout_and_the_fee_is_exact(env, load_service_config, database, spy, deliveries):
    config = load_service_config(CONFIG_PATH, {**env, "TP_FLAT_FEE": "2.5"})
    client = create_app(config, database=database, tasks=spy, clock=lambda: NOW).test_client()
    answer = post_t3(client, signed_t3(payment_id="5077125051", actual_eth_amount=0.0123456789))
    assert answer.status_code == 200, answer.json
    [t4] = delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    assert t4["payout_key"] == "np:5077125051"
    # 0.0120370369275 less the dust below the payout columns' 8 decimals (the host keeps it).
    assert t4["adjusted_amount"] == float(Decimal("0.01203703"))
    assert t4["actual_eth_amount"] == 0.0123456789
    assert spy.keys == ["gcsplit2:np:5077125051"]


def test_redelivered_t3_sends_one_t4_and_a_recorded_payout_sends_none(client, database, spy, deliveries):
    signed = signed_t3(payment_id="42")
    assert post_t3(client, signed).status_code == 200
    assert post_t3(client, signed).status_code == 200  # Cloud Tasks redelivery: same task name
    delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    insert_payout_request(database, "K7Q2ZP9X4M1B8C3D", "np:42")
    answer = post_t3(client, signed)  # e.g. a replay days later: the request row stops it
    assert answer.status_code == 200 and answer.json["idempotent"] is True
    assert answer.json["unique_id"] == "K7Q2ZP9X4M1B8C3D"
    assert spy.keys == ["gcsplit2:np:42"] * 2
    assert len(deliveries.expect_exactly(1, quiet_s=0.3)) == 1


@pytest.mark.parametrize("amount", [0.0, -0.5])
def test_non_positive_eth_is_refused_not_swapped_forever(client, database, deliveries, amount):
    answer = post_t3(client, signed_t3(actual_eth_amount=amount))  # defect 18
    assert answer.status_code == 400 and "actual_eth_amount" in answer.json["message"]
    assert_nothing_happened(database, deliveries)


def test_non_instant_mode_keeps_legacy_price_rule(client, deliveries):
    answer = post_t3(client, signed_t3(payout_mode="Threshold", subscription_price=14.83, payment_id="7"))
    assert answer.status_code == 200, answer.json
    [t4] = delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    assert t4["adjusted_amount"] == float(Decimal("14.83") * Decimal("0.97"))
    assert (t4["swap_currency"], t4["payout_mode"]) == ("usdt", "threshold")


@pytest.mark.parametrize("signature", ["", "00" * 32, T3["token"]["signature"][:-2] + "00"])
def test_t3_without_a_valid_signature_is_refused(client, database, deliveries, signature):
    answer = post_t3(client, T3["token"], signature=signature)
    assert answer.status_code == 401
    assert_nothing_happened(database, deliveries)


def test_t3_signed_with_another_key_or_tampered_is_refused(client, database, deliveries):
    other = tokens.encode(hops.INSTANT_SPLIT, T3["fields"], {hops.SUCCESS_KEY: "not-the-key"}, now=NOW)
    assert post_t3(client, other).status_code == 401
    body = T3["token"]["body"].replace("0.0046", "4.6")
    assert post_t3(client, {"body": body, "signature": T3["token"]["signature"]}).status_code == 401
    assert_nothing_happened(database, deliveries)


def test_service_refuses_to_start_without_the_signing_key(env, load_service_config):
    # Legacy skipped the T3 signature check when its key was missing (defect 2): here it cannot start.
    env = {name: value for name, value in env.items() if name != hops.SUCCESS_KEY}
    with pytest.raises(errors.ConfigError, match=hops.SUCCESS_KEY):
        load_service_config(CONFIG_PATH, env)


@pytest.mark.parametrize("changes, status", [
    ({"wallet_address": "  "}, 400),
    ({"payout_currency": ""}, 400),
    ({"payment_id": " "}, 400),
    ({"payment_id": "9" * 98}, 400),  # would not fit the idempotency key
    ({"closed_channel_id": -100326856222512}, 400),  # 16 chars: the split tables hold 14
    ({"user_id": -5}, 400),  # u64 on the wire
])
def test_unusable_t3_fields_are_refused(client, database, deliveries, changes, status):
    assert post_t3(client, signed_t3(**changes)).status_code == status
    assert_nothing_happened(database, deliveries)


def test_signed_body_that_is_not_the_t3_object_is_refused(client, database, deliveries):
    for body in (b"not json", b"[1, 2]", json.dumps({"user_id": 1}).encode()):
        signature = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), body, "sha256").hexdigest()
        assert post_t3(client, {"body": body, "signature": signature}).status_code == 401
    assert_nothing_happened(database, deliveries)


# ---------------------------------------------------------------- POST /usdt-eth-estimate (T5)


def test_legacy_t5_vector_records_the_payout_and_sends_t6(client, database, deliveries):
    answer = client.post("/usdt-eth-estimate", json={"token": T5["token"]})
    assert answer.status_code == 200, answer.json
    [row] = rows(database, "split_payout_request")
    assert row["unique_id"] == answer.json["unique_id"] and len(row["unique_id"]) == 16
    assert row["unique_id"].isalnum() and row["unique_id"].upper() == row["unique_id"]
    assert row["idempotency_key"] == "legacy:" + hashlib.sha256(T5["token"].encode()).hexdigest()
    assert (row["from_currency"], row["to_currency"], row["from_network"], row["to_network"]) == (
        "ETH", "LINK", "ETH", "ETH")
    assert row["from_amount"] == Decimal("0.004462")
    assert row["to_amount"] == Decimal("0.7444")  # 0.004462 x (0.7321 + 0.0123) / (0.004462 - 0)
    assert row["actual_eth_amount"] == Decimal("0.0046")
    assert (row["user_id"], row["closed_channel_id"], row["client_wallet_address"]) == (
        6271402111, "-1003268562225", T5["fields"]["wallet_address"])
    assert (row["refund_address"], row["flow"], row["type"]) == ("", "standard", "direct")
    [t6] = delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)
    t6.pop("timestamp")
    assert t6 == {**T6["fields"], "unique_id": row["unique_id"]}


def test_redelivered_estimate_records_one_request_and_sends_one_t6(client, database, spy, deliveries):
    estimate = token(hops.ESTIMATE_RESPONSE, T5, payout_key="np:5077125051")
    first = client.post("/usdt-eth-estimate", json={"token": estimate})
    again = client.post("/usdt-eth-estimate", json={"token": estimate})
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json["unique_id"] == first.json["unique_id"] and again.json["idempotent"] is True
    [row] = rows(database, "split_payout_request")
    assert row["idempotency_key"] == "np:5077125051"
    [t6] = delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)
    assert t6["unique_id"] == row["unique_id"]
    assert spy.keys == [f"gcsplit3:{row['unique_id']}"] * 2  # re-enqueued, refused by name


def test_a_second_estimate_for_the_same_payout_reuses_its_unique_id(client, database, deliveries):
    insert_payout_request(database, "K7Q2ZP9X4M1B8C3D", "np:77")
    answer = client.post("/usdt-eth-estimate", json={"token": token(hops.ESTIMATE_RESPONSE, T5, payout_key="np:77")})
    assert answer.status_code == 200 and answer.json["unique_id"] == "K7Q2ZP9X4M1B8C3D"
    assert len(rows(database, "split_payout_request")) == 1
    [t6] = delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)
    assert t6["unique_id"] == "K7Q2ZP9X4M1B8C3D"


def test_unique_id_collision_draws_a_new_id(client, database, deliveries, monkeypatch):
    insert_payout_request(database, "AAAAAAAAAAAAAAAA", "np:other")
    drawn = iter(["AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB"])
    monkeypatch.setattr(rules, "new_unique_id", lambda: next(drawn))
    answer = client.post("/usdt-eth-estimate", json={"token": token(hops.ESTIMATE_RESPONSE, T5, payout_key="np:1")})
    assert answer.status_code == 200 and answer.json["unique_id"] == "BBBBBBBBBBBBBBBB"
    assert [r["idempotency_key"] for r in rows(database, "split_payout_request")] == ["np:other", "np:1"]
    delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)


def test_concurrent_delivery_that_commits_first_wins(client, database, deliveries, monkeypatch):
    # The other delivery commits between our look-up and our insert: the unique key reports it.
    insert_payout_request(database, "RACERACERACERACE", "np:race")
    real_look_up, look_ups = rules.payout_request_id, []

    def look_up_too_early(tx, payout_key):
        look_ups.append(payout_key)
        return None if len(look_ups) == 1 else real_look_up(tx, payout_key)

    monkeypatch.setattr(rules, "payout_request_id", look_up_too_early)
    answer = client.post("/usdt-eth-estimate", json={"token": token(hops.ESTIMATE_RESPONSE, T5, payout_key="np:race")})
    assert answer.status_code == 200 and answer.json["unique_id"] == "RACERACERACERACE"
    assert answer.json["idempotent"] is True
    assert len(rows(database, "split_payout_request")) == 1 and look_ups == ["np:race"] * 2
    [t6] = delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)
    assert t6["unique_id"] == "RACERACERACERACE"


def test_market_value_counts_both_changenow_fees(client, database, deliveries):
    estimate = token(hops.ESTIMATE_RESPONSE, T5, from_amount=1.0, to_amount_eth_post_fee=2900.0,
                     deposit_fee=0.01, withdrawal_fee=5.0)
    assert client.post("/usdt-eth-estimate", json={"token": estimate}).status_code == 200
    [row] = rows(database, "split_payout_request")
    assert row["to_amount"] == (Decimal("2905") / Decimal("0.99")).quantize(Decimal("1E-8"))
    [t6] = delivered(deliveries, "/gcsplit3", hops.SWAP_REQUEST)
    assert t6["eth_amount"] == 1.0


@pytest.mark.parametrize("changes", [{"from_amount": 0.0}, {"closed_channel_id": "-10032685622251"}])
def test_unusable_estimate_is_refused(client, database, deliveries, changes):
    answer = client.post("/usdt-eth-estimate", json={"token": token(hops.ESTIMATE_RESPONSE, T5, **changes)})
    assert answer.status_code == 400
    assert_nothing_happened(database, deliveries)


# ---------------------------------------------------------------- POST /eth-client-swap (T7)


def test_legacy_t7_vector_records_the_exchange_and_orders_the_legacy_t8(client, database, spy, deliveries):
    answer = client.post("/eth-client-swap", json={"token": T7["token"]})
    assert answer.status_code == 200, answer.json
    [row] = rows(database, "split_payout_que")
    assert (row["unique_id"], row["cn_api_id"]) == ("K7Q2ZP9X4M1B8C3D", "e6c5b2a1d4f3a9")
    assert (row["from_currency"], row["to_currency"], row["from_network"], row["to_network"]) == (
        "ETH", "LINK", "ETH", "ETH")
    assert (row["from_amount"], row["to_amount"], row["actual_eth_amount"]) == (
        Decimal("0.004462"), Decimal("0.7321"), Decimal("0.0046"))
    assert (row["payin_address"], row["refund_address"], row["type"]) == (T7["fields"]["payin_address"], "", "direct")
    [t8] = delivered(deliveries, "/gchostpay1", hops.HOSTPAY_ORDER)
    t8.pop("timestamp")
    assert t8 == T8["fields"]  # pays the exchange's fromAmount 0.004462, not the payment's 0.0046
    assert spy.keys == ["gchostpay1:K7Q2ZP9X4M1B8C3D"]


def test_t8_is_signed_with_the_hostpay_key_only(client, deliveries):
    assert client.post("/eth-client-swap", json={"token": T7["token"]}).status_code == 200
    [delivery] = deliveries.expect_exactly(1)
    order = json.loads(delivery.body)["token"]
    with pytest.raises(errors.TokenRejected):
        tokens.decode(hops.HOSTPAY_ORDER, order, {hops.TPS_KEY: KEYS[hops.SUCCESS_KEY]}, now=NOW)


@pytest.mark.parametrize("changes, sent", [
    ({"from_currency": "usdt", "from_amount": 52.38, "actual_eth_amount": 0.0}, (52.38, 52.38)),
    ({"actual_eth_amount": 0.0}, (0.004462, 0.004462)),  # no NowPayments outcome: the exchange amount
])
def test_hostpay_amounts_follow_the_swap_currency(client, deliveries, changes, sent):
    assert client.post("/eth-client-swap", json={"token": token(hops.SWAP_RESPONSE, T7, **changes)}).status_code == 200
    [t8] = delivered(deliveries, "/gchostpay1", hops.HOSTPAY_ORDER)
    assert (t8["actual_eth_amount"], t8["estimated_eth_amount"]) == sent


def test_redelivered_t7_records_once_and_orders_once(client, database, deliveries):
    for _ in range(2):
        answer = client.post("/eth-client-swap", json={"token": T7["token"]})
        assert answer.status_code == 200
    assert answer.json["idempotent"] is True
    assert len(rows(database, "split_payout_que")) == 1
    delivered(deliveries, "/gchostpay1", hops.HOSTPAY_ORDER)


def test_second_exchange_for_the_same_payout_is_never_ordered(client, database, spy, deliveries):
    assert client.post("/eth-client-swap", json={"token": T7["token"]}).status_code == 200
    second = token(hops.SWAP_RESPONSE, T7, cn_api_id="0123456789abcd",
                   payin_address="0x1111111111111111111111111111111111111111")
    answer = client.post("/eth-client-swap", json={"token": second})
    assert answer.status_code == 200 and answer.json["idempotent"] is True
    assert (answer.json["cn_api_id"], answer.json["ignored_cn_api_id"]) == ("e6c5b2a1d4f3a9", "0123456789abcd")
    assert [r["cn_api_id"] for r in rows(database, "split_payout_que")] == ["e6c5b2a1d4f3a9"]
    [t8] = delivered(deliveries, "/gchostpay1", hops.HOSTPAY_ORDER)
    assert (t8["cn_api_id"], t8["payin_address"]) == ("e6c5b2a1d4f3a9", T7["fields"]["payin_address"])
    assert spy.keys == ["gchostpay1:K7Q2ZP9X4M1B8C3D"]  # not even attempted for the second exchange


def test_exchange_of_another_payout_is_a_conflict(client, database, deliveries):
    assert client.post("/eth-client-swap", json={"token": T7["token"]}).status_code == 200
    other = token(hops.SWAP_RESPONSE, T7, unique_id="ZZZZZZZZZZZZZZZZ")
    assert client.post("/eth-client-swap", json={"token": other}).status_code == 409
    assert [r["unique_id"] for r in rows(database, "split_payout_que")] == ["K7Q2ZP9X4M1B8C3D"]
    delivered(deliveries, "/gchostpay1", hops.HOSTPAY_ORDER)


def test_exchange_without_an_amount_is_refused(client, database, deliveries):
    answer = client.post("/eth-client-swap", json={"token": token(hops.SWAP_RESPONSE, T7, from_amount=0.0)})
    assert answer.status_code == 400
    assert_nothing_happened(database, deliveries)


# ---------------------------------------------------------------- POST /batch-payout (T9)


def test_legacy_batch_token_sends_a_threshold_t4(client, deliveries):
    answer = client.post("/batch-payout", json={"token": T9["token"], "batch_mode": True})
    assert answer.status_code == 200, answer.json
    assert answer.json["batch_id"] == T9["fields"]["batch_id"]
    [t4] = delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    t4.pop("timestamp")
    assert t4 == {
        "user_id": 0, "closed_channel_id": "-1003268562225", "wallet_address": T9["fields"]["wallet_address"],
        "payout_currency": "link", "payout_network": "eth", "adjusted_amount": 52.38, "swap_currency": "usdt",
        "payout_mode": "threshold", "actual_eth_amount": 0.0, "payout_key": f"batch:{T9['fields']['batch_id']}",
    }


def test_replayed_batch_token_never_starts_a_second_payout(client, database, spy, deliveries):
    # Defect 3: the batch token never expires; its batch_id keys the one payout it may start.
    assert client.post("/batch-payout", json={"token": T9["token"]}).status_code == 200
    [t4] = delivered(deliveries, "/gcsplit2", hops.ESTIMATE_REQUEST)
    estimate = client.post("/usdt-eth-estimate", json={"token": estimate_for(t4, to_amount=3.4)})
    assert estimate.status_code == 200
    replay = client.post("/batch-payout", json={"token": T9["token"], "batch_mode": True})
    assert replay.status_code == 200 and replay.json["idempotent"] is True
    assert replay.json["unique_id"] == estimate.json["unique_id"]
    [row] = rows(database, "split_payout_request")
    assert (row["idempotency_key"], row["from_currency"], row["from_amount"]) == (
        f"batch:{T9['fields']['batch_id']}", "USDT", Decimal("52.38"))
    batch_key = f"batch:{T9['fields']['batch_id']}"
    assert spy.keys == [f"gcsplit2:{batch_key}", f"gcsplit3:{row['unique_id']}"]
    assert sorted(d.path for d in deliveries.expect_exactly(2, quiet_s=0.5)) == ["/gcsplit2", "/gcsplit3"]


@pytest.mark.parametrize("changes", [
    {"total_amount_usdt": "0"}, {"total_amount_usdt": "-1"}, {"total_amount_usdt": "NaN"},
    {"total_amount_usdt": "lots"}, {"batch_id": ""}, {"wallet_address": ""},
])
def test_unusable_batch_fields_are_refused(client, database, deliveries, changes):
    batch = token(hops.BATCH_PAYOUT, T9, keys=KEYS, **changes)
    assert client.post("/batch-payout", json={"token": batch}).status_code == 400
    assert_nothing_happened(database, deliveries)


def test_batch_token_signed_with_the_success_key_is_refused(client, database, deliveries):
    # Legacy fell back to SUCCESS_URL_SIGNING_KEY; a hop has exactly one key here.
    batch = token(hops.BATCH_PAYOUT, T9, keys={hops.TPS_KEY: KEYS[hops.SUCCESS_KEY]})
    assert client.post("/batch-payout", json={"token": batch}).status_code == 401
    assert_nothing_happened(database, deliveries)


# ---------------------------------------------------------------- rejections shared by the token endpoints


TOKEN_ENDPOINTS = [
    ("/usdt-eth-estimate", hops.ESTIMATE_RESPONSE, T5),
    ("/eth-client-swap", hops.SWAP_RESPONSE, T7),
    ("/batch-payout", hops.BATCH_PAYOUT, T9),
]


@pytest.mark.parametrize("path, hop, vector", TOKEN_ENDPOINTS)
def test_bad_bodies_and_tokens_answer_4xx_and_change_nothing(client, database, deliveries, path, hop, vector):
    assert client.post(path, data="{not json", content_type="application/json").status_code == 400
    assert client.post(path, json={}).status_code == 400
    assert client.post(path, json=["token"]).status_code == 400
    assert client.post(path, json={"token": "not-a-token"}).status_code == 401
    assert client.post(path, json={"token": tampered(vector["token"])}).status_code == 401
    wrong_key = token(hop, vector, keys={hop.key: "not-the-key"})
    assert client.post(path, json={"token": wrong_key}).json["error"] == "token_rejected"
    assert_nothing_happened(database, deliveries)


@pytest.mark.parametrize("path, hop, vector", TOKEN_ENDPOINTS[:2])
def test_expired_tokens_are_refused(client, database, deliveries, path, hop, vector):
    expired = token(hop, vector, now=NOW - DAY - 60)
    answer = client.post(path, json={"token": expired})
    assert answer.status_code == 401 and answer.json["reason"] == "expired"
    assert_nothing_happened(database, deliveries)


# ---------------------------------------------------------------- database outages and health


@pytest.fixture
def client_without_database(env, load_service_config, spy):
    env = {**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere"}
    return create_app(load_service_config(CONFIG_PATH, env), tasks=spy, clock=lambda: NOW).test_client()


def test_database_outage_is_retried_and_sends_nothing(client_without_database, spy, deliveries):
    assert post_t3(client_without_database, T3["token"]).status_code == 503
    answer = client_without_database.post("/usdt-eth-estimate", json={"token": T5["token"]})
    assert answer.status_code == 503 and answer.json["error"] == "database_unavailable"
    assert client_without_database.post("/eth-client-swap", json={"token": T7["token"]}).status_code == 503
    assert spy.keys == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_health_checks_the_database(client, client_without_database):
    assert client.get("/health").status_code == 200
    answer = client_without_database.get("/health")
    assert answer.status_code == 503 and answer.json["checks"] == {"database": "fail"}


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
