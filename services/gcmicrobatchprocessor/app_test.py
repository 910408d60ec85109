"""GCMicroBatchProcessor against real PostgreSQL, the Cloud Tasks emulator and the ChangeNOW stand-in."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from decimal import Decimal

import pytest

from telepay_shared import errors, hops, tokens
from telepay_shared.config import ConfigError
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS, delivered_tokens, slow_inserts

from services.gcmicrobatchprocessor.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T16 = VECTORS["hops"]["gchostpay1->gcmicrobatch"]
HOST_WALLET = "0x" + "4b" * 20
TX_HASH = "0x" + "cd" * 32
PAYMENT_IDS = itertools.count(9100000001)


def add_credit(database, gross_usd: str, eth: str | None, *, fee=True, status="pending", batch=None) -> int:
    """A payout_accumulation row as GCAccumulator writes it (3 % fee); fee=False: a legacy row without the fee."""
    gross = Decimal(gross_usd)
    net = gross * Decimal("0.97")
    with database.transaction() as tx:
        return tx.fetchvalue(
            "INSERT INTO payout_accumulation (client_id, user_id, payment_amount_usd, payment_currency,"
            " payment_timestamp, accumulated_amount_usdt, payment_fee_usd, client_wallet_address,"
            " client_payout_currency, client_payout_network, conversion_status, batch_conversion_id,"
            " nowpayments_payment_id, nowpayments_outcome_amount)"
            " VALUES ('-1003268562225', 6271402111, %s, 'usd', LOCALTIMESTAMP, %s, %s, %s, 'link', 'eth', %s, %s,"
            " %s, %s) RETURNING id",
            (gross, net, gross - net if fee else None, "0x" + "5a" * 20, status, batch, str(next(PAYMENT_IDS)),
             None if eth is None else Decimal(eth)))


def rows(database, sql: str, params=()) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall(sql, params)


def credits(database) -> list[dict]:
    return rows(database, "SELECT * FROM payout_accumulation ORDER BY id")


def batches(database) -> list[dict]:
    return rows(database, "SELECT * FROM batch_conversions ORDER BY id")


def creates(changenow) -> list[dict]:
    """The POST /exchange bodies ChangeNOW received."""
    return [r["body"] for r in changenow.requests_seen if r["route"] == "create"]


def delivered_orders(deliveries, count: int) -> list[dict]:
    """The T15 tokens delivered to GCHostPay1's POST /, decoded."""
    return delivered_tokens(deliveries, hops.MICROBATCH_ORDER, "/", count=count)


class EnqueueFailsFirst:
    """The real TasksClient, except that its first `failures` enqueues fail as a Cloud Tasks outage would."""

    def __init__(self, tasks, failures: int = 1):
        self.tasks, self.failures = tasks, failures

    def enqueue(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise errors.TaskEnqueueFailed("injected outage")
        return self.tasks.enqueue(*args, **kwargs)


@pytest.fixture
def make_client(service_env, load_service_config, database_url, changenow, deliveries):
    """A test client wired to the stand-ins; TP_AUTH_MODE is 'none' unless given."""

    def make(tasks=None, **values):
        env = service_env(CONFIG_PATH, DATABASE_URL=database_url, CHANGENOW_API_URL=changenow.url,
                          GCHOSTPAY1_URL=deliveries.url(""), HOST_WALLET_USDT_ADDRESS=HOST_WALLET, **values)
        return create_app(load_service_config(CONFIG_PATH, env), tasks=tasks).test_client()

    return make


def check(client):
    return client.post("/check-threshold")


def fresh_t16(**fields) -> str:
    """A T16 with the legacy vector's fields (and any changes), signed now."""
    return tokens.encode(hops.MICROBATCH_SWAP_EXECUTED, {**T16["fields"], **fields}, KEYS)


def swapping_batch(client, database, *gross_and_eth) -> dict:
    """Credits for each (gross USD, ETH), claimed and handed over by one run; returns the batch row."""
    for gross, eth in gross_and_eth:
        add_credit(database, gross, eth)
    assert check(client).json["batch_created"] is True
    [batch] = batches(database)
    return batch


# ---------------------------------------------------------------- /check-threshold


def test_below_threshold_nothing_happens(client, database, changenow, deliveries):
    add_credit(database, "10", "0.00333333")
    add_credit(database, "10", "0.00333333")  # 2 x 9.70 = 19.40 < 20.00
    answer = check(client)
    assert answer.status_code == 200
    assert answer.json == {"status": "success", "message": "Below threshold, no batch conversion needed",
                           "total_pending": "19.40000000", "threshold": "20.00", "batch_created": False,
                           "resumed_batches": []}
    assert batches(database) == [] and changenow.requests_seen == []
    assert {c["conversion_status"] for c in credits(database)} == {"pending"}
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_threshold_is_configurable(make_client, database):
    add_credit(database, "10", "0.00333333")
    assert check(make_client(MICRO_BATCH_THRESHOLD_USD="9.70")).json["batch_created"] is True


def test_at_threshold_one_exchange_swaps_the_fee_free_eth_and_t15_goes_to_gchostpay1(client, database, changenow,
                                                                                     deliveries, tasks):
    ids = [add_credit(database, "12", "0.004"), add_credit(database, "12", "0.004")]
    answer = check(client)
    assert answer.status_code == 200, answer.json
    [batch] = batches(database)
    batch_id = str(batch["batch_conversion_id"])
    [order] = delivered_orders(deliveries, 1)
    [create] = creates(changenow)
    # Defect 14: 2 x 0.004 ETH arrived, 3 % of it is the platform's and stays in the host wallet.
    assert Decimal(create["fromAmount"]) == Decimal("0.00776")
    assert (create["fromCurrency"], create["toCurrency"], create["fromNetwork"], create["toNetwork"]) == (
        "eth", "usdt", "eth", "eth")
    assert create["address"] == HOST_WALLET
    assert order == {"batch_conversion_id": batch_id, "cn_api_id": batch["cn_api_id"], "from_currency": "eth",
                     "from_network": "eth", "from_amount": 0.00776, "payin_address": batch["payin_address"],
                     "timestamp": order["timestamp"]}
    exchange = changenow.exchanges[batch["cn_api_id"]]
    assert exchange["payinAddress"] == batch["payin_address"] and exchange["expectedAmountFrom"] == Decimal("0.00776")
    assert (batch["conversion_status"], batch["total_eth_usd"], batch["threshold_at_creation"]) == (
        "swapping", Decimal("23.28"), Decimal("20.00"))
    assert batch["processing_started_at"] is not None  # handed over: later runs leave it alone
    assert [(c["id"], c["conversion_status"], str(c["batch_conversion_id"])) for c in credits(database)] == [
        (ids[0], "swapping", batch_id), (ids[1], "swapping", batch_id)]
    assert answer.json["batch_created"] is True and answer.json["batch_conversion_id"] == batch_id
    assert (answer.json["cn_api_id"], answer.json["payment_count"]) == (batch["cn_api_id"], 2)
    assert answer.json["task_name"] == tasks.task_path("gchostpay1-batch-queue", f"gchostpay1:batch_{batch_id}")


def test_t15_outlives_legacy_five_minute_window(client, database, deliveries):
    """Defect 32: legacy GCHostPay1 refused a T15 older than 300 s, so one retry cycle stranded the batch."""
    swapping_batch(client, database, ("12", "0.004"), ("12", "0.004"))
    token = json.loads(deliveries.expect_exactly(1)[0].body)["token"]
    assert tokens.decode(hops.MICROBATCH_ORDER, token, KEYS, now=time.time() + 3600)["from_amount"] == 0.00776


def test_swap_amount_keeps_the_fee_of_legacy_rows_too(client, database, changenow):
    add_credit(database, "12", "0.004")
    add_credit(database, "30", "0.01", fee=False)  # written by legacy GCAccumulator: no payment_fee_usd
    assert check(client).status_code == 200
    assert Decimal(creates(changenow)[0]["fromAmount"]) == Decimal("0.01358")  # (0.004 + 0.01) x 0.97


def test_credits_without_nowpayments_eth_are_priced_by_a_changenow_estimate(client, database, changenow):
    add_credit(database, "12", "0.004")
    add_credit(database, "30", None)  # legacy fallback: the outcome ETH was not recorded
    assert check(client).status_code == 200
    [estimate] = [r["args"] for r in changenow.requests_seen if r["route"] == "estimate"]
    assert (estimate["fromCurrency"], estimate["toCurrency"]) == ("usdt", "eth")
    assert Decimal(estimate["fromAmount"]) == Decimal("40.74")  # the whole batch's USD, net of fees
    eth_per_usd = changenow.quote(estimate).to_amount / Decimal("40.74")
    expected = (Decimal("0.00388") + Decimal("29.10") * eth_per_usd).quantize(Decimal("1E-8"), "ROUND_DOWN")
    assert Decimal(creates(changenow)[0]["fromAmount"]) == expected


def test_credit_arriving_during_the_claim_is_not_swept_into_the_batch(client, database, changenow):
    """Defect 17 (dilution): legacy flipped every row pending at UPDATE time, even those whose ETH it never swapped."""
    ids = [add_credit(database, "12", "0.004"), add_credit(database, "12", "0.004")]
    with database.transaction() as tx:  # fires inside the claim, after the SUM and before the rows are marked
        tx.execute("""
            CREATE FUNCTION credit_arrives() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              INSERT INTO payout_accumulation (client_id, user_id, payment_amount_usd, payment_currency,
                payment_timestamp, accumulated_amount_usdt, payment_fee_usd, client_wallet_address,
                client_payout_currency, client_payout_network, nowpayments_payment_id, nowpayments_outcome_amount)
              VALUES ('-1009', 7, 50, 'usd', LOCALTIMESTAMP, 48.5, 1.5, '0xab', 'usdt', 'eth', 'late', 0.0166);
              RETURN NEW; END $$;
            CREATE TRIGGER credit_arrives AFTER INSERT ON batch_conversions
              FOR EACH ROW EXECUTE FUNCTION credit_arrives();
        """)
    assert check(client).status_code == 200
    [batch] = batches(database)
    late = [c for c in credits(database) if c["id"] not in ids]
    assert [(c["conversion_status"], c["batch_conversion_id"]) for c in late] == [("pending", None)]
    assert batch["total_eth_usd"] == Decimal("23.28")
    assert Decimal(creates(changenow)[0]["fromAmount"]) == Decimal("0.00776")


def test_two_concurrent_runs_create_one_batch_and_one_exchange(client, database, changenow, deliveries):
    """Defect 17: legacy had no lock, so a second run before the rows flipped swapped the same ETH twice."""
    add_credit(database, "12", "0.004")
    add_credit(database, "12", "0.004")
    slow_inserts(database, "batch_conversions")  # the first run holds the claim lock a while
    answers = []
    first = threading.Thread(target=lambda: answers.append(check(client.application.test_client())))
    first.start()
    deadline = time.monotonic() + 10
    while not rows(database, "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"):
        assert time.monotonic() < deadline, "the first run never reached the claim"
        time.sleep(0.02)
    second = check(client)  # meets the held lock, then finds nothing pending
    first.join()
    assert answers[0].json["batch_created"] is True
    assert (second.status_code, second.json["batch_created"], second.json["total_pending"]) == (200, False, "0")
    assert len(batches(database)) == 1 and len(creates(changenow)) == 1
    delivered_orders(deliveries, 1)


def test_batch_whose_exchange_failed_is_resumed_by_the_next_run(client, database, changenow, deliveries):
    add_credit(database, "12", "0.004")
    add_credit(database, "12", "0.004")
    changenow.inject_fault("create", "server_error", 10)
    failed = check(client)
    assert (failed.status_code, failed.json["error"]) == (503, "changenow_unavailable")
    [batch] = batches(database)
    assert (batch["conversion_status"], batch["cn_api_id"]) == ("pending", None)
    assert {(c["conversion_status"], c["batch_conversion_id"]) for c in credits(database)} == {
        ("swapping", batch["batch_conversion_id"])}  # still owned by the batch: no second claim
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    changenow.clear_faults()
    add_credit(database, "5", "0.00166667")  # arrives meanwhile: stays for a later batch
    resumed = check(client)
    assert resumed.status_code == 200, resumed.json
    assert resumed.json["batch_created"] is False and resumed.json["resumed_batches"] == [
        str(batch["batch_conversion_id"])]
    [batch] = batches(database)
    [order] = delivered_orders(deliveries, 1)
    assert order["cn_api_id"] == batch["cn_api_id"] and order["from_amount"] == 0.00776
    assert sorted(c["conversion_status"] for c in credits(database)) == ["pending", "swapping", "swapping"]


def test_batch_whose_t15_was_not_enqueued_is_handed_over_again_with_the_same_exchange(make_client, tasks, database,
                                                                                      changenow, deliveries):
    client = make_client(tasks=EnqueueFailsFirst(tasks))
    add_credit(database, "12", "0.004")
    add_credit(database, "12", "0.004")
    failed = check(client)
    assert (failed.status_code, failed.json["error"]) == (503, "task_enqueue_failed")
    [batch] = batches(database)
    assert (batch["conversion_status"], batch["processing_started_at"]) == ("swapping", None)
    assert check(client).status_code == 200
    again = check(client)  # handed over now: nothing left to resume
    assert again.json["resumed_batches"] == []
    [order] = delivered_orders(deliveries, 1)
    assert len(creates(changenow)) == 1  # the exchange of the first run, not a second one
    assert (order["cn_api_id"], order["from_amount"], order["payin_address"]) == (
        batch["cn_api_id"], 0.00776, batch["payin_address"])
    assert batches(database)[0]["processing_started_at"] is not None


def test_exchange_refused_by_changenow_returns_the_credits_to_the_pool(client, database, changenow, deliveries):
    add_credit(database, "12", "0.004")
    add_credit(database, "12", "0.004")
    changenow.inject_fault("create", "reply", 1, status=400,
                           body={"error": "pair_is_inactive", "message": "Pair is inactive"})
    refused = check(client)
    assert (refused.status_code, refused.json["error"]) == (400, "changenow_rejected")
    [failed] = batches(database)
    assert failed["conversion_status"] == "failed"
    assert {(c["conversion_status"], c["batch_conversion_id"]) for c in credits(database)} == {("pending", None)}
    assert check(client).json["batch_created"] is True  # the next run claims them again
    assert [b["conversion_status"] for b in batches(database)] == ["failed", "swapping"]
    delivered_orders(deliveries, 1)


@pytest.mark.parametrize("fault, status", [("server_error", 503), ("rate_limit", 429)])
def test_changenow_outage_answers_5xx_or_429(client, database, changenow, fault, status):
    add_credit(database, "30", "0.01")
    changenow.inject_fault("create", fault, 10, retry_after="30")
    assert check(client).status_code == status


def test_scheduler_trigger_needs_oidc_or_an_hmac_by_default(make_client, database, deliveries):
    """Defect 6: anyone could trigger /check-threshold."""
    with pytest.raises(ConfigError, match="oidc needs"):
        make_client(TP_AUTH_MODE="oidc_or_hmac")  # the declared default refuses to start half-configured
    add_credit(database, "30", "0.01")
    client = make_client(TP_AUTH_MODE="oidc_or_hmac", TP_OIDC_AUDIENCES="https://microbatch.example",
                         TP_OIDC_ALLOWED_EMAILS="scheduler@telepay.iam.gserviceaccount.com")
    assert client.post("/check-threshold").status_code == 401
    assert client.post("/check-threshold", headers={"X-Webhook-Signature": "0" * 64}).status_code == 401
    assert batches(database) == []
    signature = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), b"", hashlib.sha256).hexdigest()
    assert client.post("/check-threshold", headers={"X-Webhook-Signature": signature}).status_code == 200
    assert len(batches(database)) == 1


def test_declared_default_auth_mode_is_oidc_or_hmac():
    declared = json.loads(CONFIG_PATH.read_text())["env"]["TP_AUTH_MODE"]
    assert declared["default"] == "oidc_or_hmac"


# ---------------------------------------------------------------- /swap-executed (T16)


def test_vector_layout_is_what_swap_executed_reads():
    assert tokens.encode(hops.MICROBATCH_SWAP_EXECUTED, T16["fields"], KEYS, now=VECTORS["created_at"]) == T16["token"]


def test_swap_executed_needs_the_callers_authentication_too(make_client, database):
    """Legacy trusted the T16 token alone; a valid token replayed by anyone else must not distribute USDT."""
    batch = swapping_batch(make_client(), database, ("30", "0.01"))
    fields = {"batch_conversion_id": str(batch["batch_conversion_id"]), "cn_api_id": batch["cn_api_id"],
              "tx_hash": TX_HASH}
    client = make_client(TP_AUTH_MODE="oidc_or_hmac", TP_OIDC_AUDIENCES="https://microbatch.example",
                         TP_OIDC_ALLOWED_EMAILS="hostpay1@telepay.iam.gserviceaccount.com")
    raw = json.dumps({"token": fresh_t16(**fields, actual_usdt_received=29.0)}).encode()
    unsigned = client.post("/swap-executed", data=raw, content_type="application/json")
    assert unsigned.status_code == 401
    assert [row["conversion_status"] for row in credits(database)] == ["swapping"]
    signature = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), raw, hashlib.sha256).hexdigest()
    signed = client.post("/swap-executed", data=raw, content_type="application/json",
                         headers={"X-Webhook-Signature": signature})
    assert signed.status_code == 200, signed.json
    assert [row["conversion_status"] for row in credits(database)] == ["completed"]


def test_legacy_t16_fields_complete_the_batch_they_name(client, database):
    batch_id, cn_api_id = T16["fields"]["batch_conversion_id"], T16["fields"]["cn_api_id"]
    with database.transaction() as tx:
        tx.execute("INSERT INTO batch_conversions (batch_conversion_id, total_eth_usd, threshold_at_creation,"
                   " cn_api_id, payin_address, conversion_status, processing_started_at)"
                   " VALUES (%s, 52.38, 20, %s, '0x9f', 'swapping', NOW())", (batch_id, cn_api_id))
    credit = add_credit(database, "54", "0.018", status="swapping", batch=batch_id)
    answer = client.post("/swap-executed", json={"token": fresh_t16()})
    assert answer.status_code == 200, answer.json
    assert answer.json == {"status": "success", "message": "USDT distributed to the batch's credits",
                           "batch_conversion_id": batch_id, "actual_usdt_received": "52.381234",
                           "records_updated": 1, "tx_hash": T16["fields"]["tx_hash"]}
    [row] = credits(database)
    assert (row["id"], row["accumulated_amount_usdt"], row["conversion_status"], row["conversion_tx_hash"]) == (
        credit, Decimal("52.381234"), "completed", T16["fields"]["tx_hash"])
    [batch] = batches(database)
    assert (batch["conversion_status"], batch["actual_usdt_received"], batch["conversion_tx_hash"]) == (
        "completed", Decimal("52.381234"), T16["fields"]["tx_hash"])
    assert batch["completed_at"] is not None


def test_received_usdt_is_shared_in_proportion_and_adds_up_exactly(client, database):
    batch = swapping_batch(client, database, ("12", "0.004"), ("5", "0.00166667"), ("10", "0.00333333"))
    before = {c["id"]: c["accumulated_amount_usdt"] for c in credits(database)}
    received = Decimal("25.499999")
    answer = client.post("/swap-executed", json={"token": fresh_t16(
        batch_conversion_id=str(batch["batch_conversion_id"]), cn_api_id=batch["cn_api_id"], tx_hash=TX_HASH,
        actual_usdt_received=float(received))})
    assert answer.status_code == 200 and answer.json["records_updated"] == 3
    after = credits(database)
    assert sum(c["accumulated_amount_usdt"] for c in after) == received  # not a hundred-millionth lost or made up
    total = sum(before.values())
    for credit in after:
        exact = received * before[credit["id"]] / total
        assert abs(credit["accumulated_amount_usdt"] - exact) < Decimal("3E-6")
        assert credit["accumulated_amount_usdt"] == credit["accumulated_amount_usdt"].quantize(Decimal("1E-6"))
        assert (credit["conversion_status"], credit["conversion_tx_hash"]) == ("completed", TX_HASH)
    assert batches(database)[0]["actual_usdt_received"] == received


def test_usdt_finer_than_the_token_is_rounded_down_to_what_arrived(client, database):
    """Regression (tools/dev soak): ChangeNOW's amountTo 52.3400646 USDT pays 52.340064 on chain (6 decimals);
    the batch records that, so payout batches built from its shares are amounts a transfer can send."""
    batch = swapping_batch(client, database, ("12", "0.004"), ("10", "0.00333333"))
    answer = client.post("/swap-executed", json={"token": fresh_t16(
        batch_conversion_id=str(batch["batch_conversion_id"]), cn_api_id=batch["cn_api_id"], tx_hash=TX_HASH,
        actual_usdt_received=52.3400646)})
    assert answer.status_code == 200 and answer.json["actual_usdt_received"] == "52.340064"
    assert sum(c["accumulated_amount_usdt"] for c in credits(database)) == Decimal("52.340064")
    assert all(c["accumulated_amount_usdt"] == c["accumulated_amount_usdt"].quantize(Decimal("1E-6"))
               for c in credits(database))


def test_redelivered_t16_changes_nothing(client, database):
    batch = swapping_batch(client, database, ("12", "0.004"), ("12", "0.004"))
    fields = {"batch_conversion_id": str(batch["batch_conversion_id"]), "cn_api_id": batch["cn_api_id"],
              "tx_hash": TX_HASH}
    first = client.post("/swap-executed", json={"token": fresh_t16(**fields, actual_usdt_received=22.5)})
    assert first.status_code == 200
    state = (credits(database), batches(database))
    again = client.post("/swap-executed", json={"token": fresh_t16(**fields, actual_usdt_received=99.0)})
    assert again.status_code == 200
    assert (again.json["records_updated"], again.json["actual_usdt_received"]) == (0, "22.50000000")  # as stored
    assert (credits(database), batches(database)) == state


@pytest.mark.parametrize("changes, status, error", [
    ({"batch_conversion_id": "0b6f9a4e-8a34-4c52-9d7e-0123456789ab"}, 404, "not_found"),
    ({"cn_api_id": "ffffffffffffff"}, 409, "conflict"),
    ({"batch_conversion_id": "not-a-uuid"}, 400, "bad_request"),
    ({"actual_usdt_received": 0.0}, 400, "bad_request"),
    ({"actual_usdt_received": float("nan")}, 400, "bad_request"),
    ({"actual_usdt_received": 4e-9}, 400, "bad_request"),
    ({"actual_usdt_received": 1e300}, 400, "bad_request"),
    ({"tx_hash": "0x" + "e" * 120}, 400, "bad_request"),
])
def test_t16_that_does_not_fit_the_batch_is_refused_and_changes_nothing(client, database, changes, status, error):
    batch = swapping_batch(client, database, ("12", "0.004"), ("12", "0.004"))
    fields = {"batch_conversion_id": str(batch["batch_conversion_id"]), "cn_api_id": batch["cn_api_id"],
              "tx_hash": TX_HASH, "actual_usdt_received": 22.5, **changes}
    state = (credits(database), batches(database))
    answer = client.post("/swap-executed", json={"token": fresh_t16(**fields)})
    assert (answer.status_code, answer.json["error"]) == (status, error), answer.json
    assert (credits(database), batches(database)) == state


def test_t16_for_a_batch_without_an_exchange_is_a_conflict(client, database, changenow):
    add_credit(database, "30", "0.01")
    changenow.inject_fault("create", "server_error", 10)
    assert check(client).status_code == 503
    [batch] = batches(database)
    token = fresh_t16(batch_conversion_id=str(batch["batch_conversion_id"]))
    answer = client.post("/swap-executed", json={"token": token})
    assert answer.status_code == 409
    assert batches(database)[0]["conversion_status"] == "pending"


def test_bad_tokens_are_refused_and_change_nothing(client, database):
    batch = swapping_batch(client, database, ("30", "0.01"))
    fields = {**T16["fields"], "batch_conversion_id": str(batch["batch_conversion_id"]),
              "cn_api_id": batch["cn_api_id"]}
    expired = tokens.encode(hops.MICROBATCH_SWAP_EXECUTED, fields, KEYS, now=time.time() - 1801)
    wrong_key = tokens.encode(hops.MICROBATCH_SWAP_EXECUTED, fields, {hops.SUCCESS_KEY: "not-the-key"})
    good = tokens.encode(hops.MICROBATCH_SWAP_EXECUTED, fields, KEYS)
    tampered = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    state = (credits(database), batches(database))
    for token, reason in ((expired, "expired"), (wrong_key, "bad_signature"), (tampered, "bad_signature"),
                          ("not-a-token", None)):
        answer = client.post("/swap-executed", json={"token": token})
        assert (answer.status_code, answer.json["error"]) == (401, "token_rejected")
        assert reason is None or answer.json["reason"] == reason
    assert client.post("/swap-executed", json={}).status_code == 400
    assert client.post("/swap-executed", data="{", content_type="application/json").status_code == 400
    assert (credits(database), batches(database)) == state


def test_health(client):
    assert client.get("/health").status_code == 200


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
