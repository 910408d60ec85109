"""GCHostPay1 against the legacy vectors, real PostgreSQL, the ChangeNOW stand-in and the Cloud Tasks emulator.

Where the legacy vectors allow it, the token GCHostPay1 emits is compared byte for byte with the
token legacy GCHostPay1 minted from the same input at the same clock.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from decimal import Decimal

import pytest

from telepay_shared import hops, tokens
from telepay_shared.cloudtasks import task_id_for
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gchostpay1 import rules
from services.gchostpay1.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
LEGACY_CLOCK = VECTORS["created_at"]
STATUS_CHECK_QUEUE, RESPONSE_QUEUE, MICROBATCH_QUEUE = (
    "gchostpay2-status-check-queue", "gchostpay1-response-queue", "microbatch-response-queue")
HOST_USDT_WALLET = "0x" + "ab" * 20
TX_HASH = "0x" + "cd" * 32


def vector(hop: tokens.Hop) -> dict:
    return VECTORS["hops"][hop.name]


def mint(hop: tokens.Hop, now: float | None = None, **changes) -> str:
    """The hop's legacy vector fields with `changes`, signed at `now` (default: the real clock)."""
    return tokens.encode(hop, {**vector(hop)["fields"], **changes}, KEYS, now=now)


def new_unique_id() -> str:
    """A payout id never used before: the emulator remembers every task name for the session."""
    return secrets.token_hex(8).upper()


@pytest.fixture
def env(service_env, changenow, deliveries, database_url, slack):
    return service_env(
        CONFIG_PATH, CHANGENOW_API_URL=changenow.url, DATABASE_URL=database_url, SLACK_ALERT_WEBHOOK=slack.url("/hook"),
        GCHOSTPAY2_URL=deliveries.url("/gchostpay2"), GCHOSTPAY3_URL=deliveries.url("/gchostpay3"),
        GCHOSTPAY1_URL=deliveries.url("/"), MICROBATCH_URL=deliveries.url("/"), TP_CALLBACK_RETRY_DELAY_S="0",
    )


@pytest.fixture
def make_client(env, load_service_config, database):
    def make(clock=time.time, **overrides):
        config = load_service_config(CONFIG_PATH, {**env, **overrides})
        return create_app(config, database=database, clock=clock).test_client()
    return make


@pytest.fixture
def legacy_client(make_client):
    """A client whose clock stands at the moment legacy minted the vectors."""
    return make_client(clock=lambda: LEGACY_CLOCK)


def open_exchange(changenow, status="waiting", exchange_id=None, amount_to=None) -> str:
    """An eth->usdt exchange at the stand-in, at `status`, under `exchange_id` if given."""
    return changenow.open_exchange("eth", "usdt", Decimal("0.0161"), HOST_USDT_WALLET, exchange_id=exchange_id,
                                   status=status, amount_to=amount_to)["id"]


def delivered(deliveries, path: str, count: int = 1) -> list:
    """The deliveries the emulator made, all to `path`."""
    got = deliveries.expect_exactly(count)
    assert {d.path for d in got} == {path}
    return got


def token_of(delivery) -> str:
    return json.loads(delivery.body)["token"]


def nothing_sent(deliveries) -> bool:
    return deliveries.expect_exactly(0, quiet_s=0.3) == []


def review_rows(database, unique_id: str) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall(
            "SELECT unique_id, cn_api_id, from_currency, from_network, from_amount, payin_address, context,"
            " error_code, attempt_count, status, last_error_details FROM failed_transactions WHERE unique_id = %s",
            (unique_id,))


def all_review_rows(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT unique_id FROM failed_transactions")


def record_transfer(database, unique_id: str, tx_status: str) -> None:
    """A split_payout_hostpay row as GCHostPay3 writes it."""
    with database.transaction() as tx:
        tx.execute(
            "INSERT INTO split_payout_hostpay (unique_id, cn_api_id, from_currency, from_network, from_amount,"
            " payin_address, is_complete, tx_hash, tx_status) VALUES (%s, 'e6c5b2a1d4f3a9', 'ETH', 'ETH', %s, %s,"
            " %s, %s, %s)",
            (unique_id, Decimal("0.004462"), HOST_USDT_WALLET, tx_status == "success", TX_HASH, tx_status))


# ---------------------------------------------------------------------------- POST / (T8, T20, T15)

def test_legacy_t8_vector_orders_a_status_check_for_the_exchange_amount(legacy_client, deliveries):
    t8 = vector(hops.HOSTPAY_ORDER)
    answer = legacy_client.post("/", json={"token": t8["token"]})
    assert answer.status_code == 200, answer.json
    assert (answer.json["unique_id"], answer.json["context"]) == (t8["fields"]["unique_id"], "instant")
    [t10] = delivered(deliveries, "/gchostpay2")
    # The second amount (ChangeNOW's fromAmount) is sent on, exactly as legacy GCHostPay1 encoded it.
    assert token_of(t10) == vector(hops.STATUS_CHECK)["token"]
    decoded = tokens.decode(hops.STATUS_CHECK, token_of(t10), KEYS, now=LEGACY_CLOCK)
    assert decoded["from_amount"] == t8["fields"]["estimated_eth_amount"] != t8["fields"]["actual_eth_amount"]
    assert t10.headers["x-cloudtasks-taskname"] == task_id_for(STATUS_CHECK_QUEUE, f"gchostpay2:{t8['fields']['unique_id']}")


@pytest.mark.parametrize("hop, unique_id, context", [
    (hops.ACCUMULATOR_HOSTPAY_ORDER, "acc_4211", "threshold"),
    (hops.MICROBATCH_ORDER, "batch_3f2b7c9e-1d4a-4b8e-9c6f-0a1b2c3d4e5f", "batch"),
])
def test_legacy_t20_and_t15_vectors_become_acc_and_batch_payouts(legacy_client, deliveries, hop, unique_id, context):
    order = vector(hop)
    answer = legacy_client.post("/", json={"token": order["token"]})
    assert answer.status_code == 200, answer.json
    assert (answer.json["unique_id"], answer.json["context"]) == (unique_id, context)
    [t10] = delivered(deliveries, "/gchostpay2")
    decoded = tokens.decode(hops.STATUS_CHECK, token_of(t10), KEYS, now=LEGACY_CLOCK)
    fields = order["fields"]
    assert decoded == {"unique_id": unique_id, "cn_api_id": fields["cn_api_id"], "from_currency": "eth",
                       "from_network": "eth", "from_amount": fields["from_amount"],
                       "payin_address": fields["payin_address"], "timestamp": LEGACY_CLOCK}


def test_defect32_a_t15_delayed_past_legacys_300_s_is_still_served(client, deliveries):
    token = mint(hops.MICROBATCH_ORDER, now=time.time() - 600, batch_conversion_id=str(uuid.uuid4()))
    assert client.post("/", json={"token": token}).status_code == 200
    delivered(deliveries, "/gchostpay2")


def test_defects_9_11_a_redelivered_order_sends_one_status_check(client, deliveries):
    token = mint(hops.HOSTPAY_ORDER, unique_id=new_unique_id())
    for _ in range(3):  # Cloud Tasks redeliveries
        assert client.post("/", json={"token": token}).status_code == 200
    delivered(deliveries, "/gchostpay2")


def test_a_paid_payout_is_not_ordered_again(client, database, deliveries):
    unique_id = new_unique_id()
    record_transfer(database, unique_id, "success")
    answer = client.post("/", json={"token": mint(hops.HOSTPAY_ORDER, unique_id=unique_id)})
    assert (answer.status_code, answer.json["status"]) == (200, "already_processed")
    assert nothing_sent(deliveries)


def test_a_transfer_gchostpay3_has_not_finished_does_not_stop_the_order(client, database, deliveries):
    unique_id = new_unique_id()
    record_transfer(database, unique_id, "pending")
    answer = client.post("/", json={"token": mint(hops.HOSTPAY_ORDER, unique_id=unique_id)})
    assert (answer.status_code, answer.json["status"]) == (200, "success")
    delivered(deliveries, "/gchostpay2")


def test_an_order_without_a_payable_amount_is_refused(client, deliveries):
    answer = client.post("/", json={"token": mint(hops.HOSTPAY_ORDER, unique_id=new_unique_id(),
                                                  estimated_eth_amount=0.0)})
    assert answer.status_code == 400 and answer.json["field"] == "from_amount"
    assert nothing_sent(deliveries)


def test_order_tokens_are_checked_against_every_order_hop(client, deliveries):
    expired = mint(hops.HOSTPAY_ORDER, now=time.time() - 2 * 3600 - 60, unique_id=new_unique_id())
    answer = client.post("/", json={"token": expired})
    assert (answer.status_code, answer.json["reason"]) == (401, "expired")
    assert answer.json["tried"]["gcsplit1->gchostpay1"] == "expired"
    # T8 must carry the TPS key: the same fields under SUCCESS_URL_SIGNING_KEY are refused.
    wrong_key = tokens.encode(hops.HOSTPAY_ORDER, vector(hops.HOSTPAY_ORDER)["fields"],
                              {hops.TPS_KEY: KEYS[hops.SUCCESS_KEY]})
    assert client.post("/", json={"token": wrong_key}).status_code == 401
    # A status report is not an order.
    assert client.post("/", json={"token": mint(hops.STATUS_VERIFIED)}).status_code == 401
    assert nothing_sent(deliveries)


# ---------------------------------------------------------------------------- POST /status-verified (T11)

def test_legacy_t11_vector_orders_the_transfer_exactly_as_legacy(legacy_client, deliveries):
    answer = legacy_client.post("/status-verified", json={"token": vector(hops.STATUS_VERIFIED)["token"]})
    assert answer.status_code == 200, answer.json
    [t12] = delivered(deliveries, "/gchostpay3")
    assert token_of(t12) == vector(hops.EXECUTE_PAYMENT)["token"]
    decoded = tokens.decode(hops.EXECUTE_PAYMENT, token_of(t12), KEYS, now=LEGACY_CLOCK)
    assert decoded["context"] == "instant" and decoded["attempt_count"] == 1
    unique_id = vector(hops.STATUS_VERIFIED)["fields"]["unique_id"]
    assert t12.headers["x-cloudtasks-taskname"] == task_id_for("gchostpay3-payment-exec-queue", f"gchostpay3:{unique_id}")


@pytest.mark.parametrize("unique_id, context", [
    (f"batch_{uuid.uuid4()}", "instant"),  # legacy's wire value for batch conversions
    (f"acc_{secrets.randbelow(10**9)}", "threshold"),
    (new_unique_id(), "instant"),
])
def test_t12_context_keeps_legacys_wire_values(client, deliveries, unique_id, context):
    token = mint(hops.STATUS_VERIFIED, unique_id=unique_id)
    for _ in range(2):  # the redelivery orders no second transfer
        assert client.post("/status-verified", json={"token": token}).status_code == 200
    [t12] = delivered(deliveries, "/gchostpay3")
    decoded = tokens.decode(hops.EXECUTE_PAYMENT, token_of(t12), KEYS)
    assert (decoded["unique_id"], decoded["context"]) == (unique_id, context)


@pytest.mark.parametrize("status", sorted(rules.DEPOSIT_RECEIVED_STATUSES))
def test_defect25_a_funded_exchange_gets_no_second_transfer(client, database, deliveries, status):
    unique_id = new_unique_id()
    answer = client.post("/status-verified", json={"token": mint(hops.STATUS_VERIFIED, unique_id=unique_id,
                                                                 status=status)})
    assert (answer.status_code, answer.json["status"]) == (200, "already_funded")
    assert nothing_sent(deliveries)
    assert review_rows(database, unique_id) == []


@pytest.mark.parametrize("status", ["failed", "refunded", "expired", "verifying"])
def test_defect25_a_dead_exchange_is_recorded_for_review_once(client, database, deliveries, caplog, slack, status):
    unique_id = new_unique_id()
    token = mint(hops.STATUS_VERIFIED, unique_id=unique_id, status=status)
    for _ in range(2):  # legacy: 400 and Cloud Tasks retried for 24 h; now done on the first delivery
        answer = client.post("/status-verified", json={"token": token})
        assert (answer.status_code, answer.json["status"]) == (200, "failed_pending_review")
    fields = vector(hops.STATUS_VERIFIED)["fields"]
    [row] = review_rows(database, unique_id)
    assert row == {"unique_id": unique_id, "cn_api_id": fields["cn_api_id"], "from_currency": "eth",
                   "from_network": "eth", "from_amount": Decimal("0.00446200"),
                   "payin_address": fields["payin_address"], "context": "instant",
                   "error_code": f"EXCHANGE_{status.upper()}", "attempt_count": 0, "status": "failed_pending_review",
                   "last_error_details": {"changenow_status": status}}
    alerts = [r for r in caplog.records if getattr(r, "event_type", None) == rules.REVIEW_EVENT]
    assert [(a.levelname, a.unique_id) for a in alerts] == [("ERROR", unique_id)]  # alerted once
    [notification] = slack.expect_exactly(1, quiet_s=0.2)  # and the operators were told, once
    assert unique_id in json.loads(notification.body)["text"] and f"EXCHANGE_{status.upper()}" in notification.body.decode()
    assert nothing_sent(deliveries)


def test_defect25_a_new_exchange_is_retried_until_it_awaits_the_deposit(client, changenow, database, deliveries):
    exchange_id = open_exchange(changenow, status="new")
    token = mint(hops.STATUS_VERIFIED, unique_id=new_unique_id(), cn_api_id=exchange_id, status="new")
    answer = client.post("/status-verified", json={"token": token})
    assert (answer.status_code, answer.json["changenow_status"]) == (503, "new")
    assert nothing_sent(deliveries)
    changenow.advance(exchange_id, "waiting")
    answer = client.post("/status-verified", json={"token": token})  # the redelivery looks again
    assert (answer.status_code, answer.json["changenow_status"]) == (200, "waiting")
    [t12] = delivered(deliveries, "/gchostpay3")
    assert tokens.decode(hops.EXECUTE_PAYMENT, token_of(t12), KEYS)["cn_api_id"] == exchange_id
    assert all_review_rows(database) == []


# ---------------------------------------------------------------------------- POST /payment-completed (T14)

def test_legacy_t14_vector_completes_an_instant_payout(legacy_client, changenow, deliveries):
    answer = legacy_client.post("/payment-completed", json={"token": vector(hops.PAYMENT_COMPLETED)["token"]})
    assert answer.status_code == 200, answer.json
    assert (answer.json["message"], answer.json["payout_batch_id"]) == ("Payment workflow completed", None)
    assert answer.json["tx_hash"] == vector(hops.PAYMENT_COMPLETED)["fields"]["tx_hash"]
    assert changenow.requests_seen == []
    assert nothing_sent(deliveries)


def arrange_batch_payout(database, unique_id: str) -> str:
    """A threshold payout batch at 'processing' and its payout request keyed batch:<batch_id>."""
    batch_id = str(uuid.uuid4())
    with database.transaction() as tx:
        tx.execute(
            "INSERT INTO payout_batches (batch_id, client_id, client_wallet_address, client_payout_currency,"
            " client_payout_network, total_amount_usdt, total_payments_count, status, processing_started_at)"
            " VALUES (%s, '-1003268562225', %s, 'LINK', 'ETH', %s, 3, 'processing', NOW())",
            (batch_id, HOST_USDT_WALLET, Decimal("120.5")))
        tx.execute("INSERT INTO split_payout_request (unique_id, user_id, idempotency_key) VALUES (%s, 0, %s)",
                   (unique_id, f"batch:{batch_id}"))
    return batch_id


def payout_batch(database, batch_id: str) -> dict:
    with database.transaction() as tx:
        return tx.fetchone("SELECT status, tx_hash, tx_status, completed_at FROM payout_batches WHERE batch_id = %s",
                           (batch_id,))


def test_defect27_a_paid_threshold_payout_batch_is_completed_once(client, database, deliveries):
    unique_id = new_unique_id()
    batch_id = arrange_batch_payout(database, unique_id)
    token = mint(hops.PAYMENT_COMPLETED, unique_id=unique_id, tx_hash=TX_HASH)
    answer = client.post("/payment-completed", json={"token": token})
    assert (answer.status_code, answer.json["payout_batch_id"]) == (200, batch_id)
    first = payout_batch(database, batch_id)
    assert (first["status"], first["tx_hash"], first["tx_status"]) == ("completed", TX_HASH, "success")
    assert first["completed_at"] is not None
    assert client.post("/payment-completed", json={"token": token}).status_code == 200
    assert payout_batch(database, batch_id) == first  # the redelivery changes nothing
    assert nothing_sent(deliveries)


def test_a_transfer_not_reported_successful_leaves_the_payout_batch_open(client, database):
    unique_id = new_unique_id()
    batch_id = arrange_batch_payout(database, unique_id)
    token = mint(hops.PAYMENT_COMPLETED, unique_id=unique_id, tx_status="failed")
    assert client.post("/payment-completed", json={"token": token}).status_code == 200
    assert payout_batch(database, batch_id)["status"] == "processing"


def batch_t14(now=None, unique_id=None, **changes) -> str:
    return mint(hops.PAYMENT_COMPLETED, now=now, unique_id=unique_id or f"batch_{uuid.uuid4()}", **changes)


def test_finished_batch_conversion_calls_microbatch_back_exactly_as_legacy(legacy_client, changenow, deliveries):
    t16 = vector(hops.MICROBATCH_SWAP_EXECUTED)["fields"]
    open_exchange(changenow, "finished", exchange_id=t16["cn_api_id"], amount_to=Decimal(repr(t16["actual_usdt_received"])))
    token = batch_t14(LEGACY_CLOCK, f"batch_{t16['batch_conversion_id']}", cn_api_id=t16["cn_api_id"],
                      tx_hash=t16["tx_hash"])
    for _ in range(2):  # the redelivery sends no second callback
        answer = legacy_client.post("/payment-completed", json={"token": token})
        assert answer.status_code == 200, answer.json
    assert answer.json["callback"]["actual_usdt_received"] == "52.381234"
    [callback] = delivered(deliveries, "/swap-executed")
    assert token_of(callback) == vector(hops.MICROBATCH_SWAP_EXECUTED)["token"]
    key = f"microbatch:{t16['batch_conversion_id']}"
    assert callback.headers["x-cloudtasks-taskname"] == task_id_for(MICROBATCH_QUEUE, key)


def test_batch_conversion_in_progress_schedules_a_recheck_exactly_as_legacy(legacy_client, changenow, deliveries):
    t17 = vector(hops.CALLBACK_RETRY)["fields"]
    open_exchange(changenow, "exchanging", exchange_id=t17["cn_api_id"])
    token = batch_t14(LEGACY_CLOCK, t17["unique_id"], cn_api_id=t17["cn_api_id"], tx_hash=t17["tx_hash"])
    answer = legacy_client.post("/payment-completed", json={"token": token})
    assert answer.json["callback"]["status"] == "retry_scheduled", answer.json
    [retry] = delivered(deliveries, "/retry-callback-check")
    assert token_of(retry) == vector(hops.CALLBACK_RETRY)["token"]
    assert retry.headers["x-cloudtasks-taskname"] == task_id_for(RESPONSE_QUEUE, f"retry:{t17['unique_id']}:1")


def test_the_recheck_waits_300_s_by_default(make_client, env, tasks, changenow, deliveries):
    queue = f"gchostpay1-delay-{secrets.token_hex(4)}"  # paused for inspection, so never shared
    tasks.ensure_queue(queue)
    tasks.raw_client.pause_queue(name=tasks.queue_path(queue))
    client = make_client(GCHOSTPAY1_RESPONSE_QUEUE=queue, TP_CALLBACK_RETRY_DELAY_S="")
    before = time.time()
    token = batch_t14(cn_api_id=open_exchange(changenow, "confirming"))
    assert client.post("/payment-completed", json={"token": token}).status_code == 200
    [task] = tasks.raw_client.list_tasks(parent=tasks.queue_path(queue))
    assert before + 300 <= task.schedule_time.timestamp() <= time.time() + 300
    assert task.http_request.url == env["GCHOSTPAY1_URL"].rstrip("/") + "/retry-callback-check"


@pytest.mark.parametrize("status", ["failed", "refunded", "expired"])
def test_a_paid_conversion_that_fails_is_recorded_for_review(client, changenow, database, deliveries, status):
    exchange_id = open_exchange(changenow, status)
    unique_id = f"batch_{uuid.uuid4()}"
    answer = client.post("/payment-completed", json={"token": batch_t14(unique_id=unique_id, cn_api_id=exchange_id)})
    assert (answer.status_code, answer.json["callback"]["status"]) == (200, "failed_pending_review")
    [row] = review_rows(database, unique_id)
    assert (row["error_code"], row["context"], row["cn_api_id"], row["from_amount"]) == (
        f"EXCHANGE_{status.upper()}", "batch", exchange_id, Decimal("0.0161"))
    assert nothing_sent(deliveries)


def test_a_paid_conversion_unknown_to_changenow_is_recorded_for_review(client, database, deliveries):
    unique_id = f"batch_{uuid.uuid4()}"
    token = batch_t14(unique_id=unique_id, cn_api_id="0123456789abcd", tx_hash=TX_HASH)
    assert client.post("/payment-completed", json={"token": token}).status_code == 200
    [row] = review_rows(database, unique_id)
    assert (row["error_code"], row["last_error_details"]["tx_hash"]) == ("EXCHANGE_NOT_FOUND", TX_HASH)
    assert nothing_sent(deliveries)


def test_a_finished_conversion_without_usdt_is_recorded_for_review(client, changenow, database, deliveries):
    unique_id = f"batch_{uuid.uuid4()}"
    exchange_id = open_exchange(changenow, "finished", amount_to=Decimal(0))
    assert client.post("/payment-completed", json={"token": batch_t14(unique_id=unique_id,
                                                                      cn_api_id=exchange_id)}).status_code == 200
    assert [r["error_code"] for r in review_rows(database, unique_id)] == ["EXCHANGE_FINISHED_WITHOUT_AMOUNT"]
    assert nothing_sent(deliveries)


@pytest.mark.parametrize("kind, status", [("server_error", 503), ("rate_limit", 429)])
def test_changenow_outage_during_a_callback_is_retried(client, changenow, database, deliveries, kind, status):
    token = batch_t14(cn_api_id=open_exchange(changenow, "finished"))
    changenow.inject_fault("by_id", kind, 10, retry_after="30")
    assert client.post("/payment-completed", json={"token": token}).status_code == status
    assert nothing_sent(deliveries)
    assert all_review_rows(database) == []


def test_a_failed_enqueue_is_answered_5xx_and_the_redelivery_repairs_it(make_client, tasks, changenow, deliveries):
    missing_queue = f"microbatch-missing-{secrets.token_hex(4)}"
    token = batch_t14(cn_api_id=open_exchange(changenow, "finished"))
    answer = make_client(MICROBATCH_RESPONSE_QUEUE=missing_queue).post("/payment-completed", json={"token": token})
    assert answer.status_code >= 500  # legacy answered 200 and the callback was lost
    assert nothing_sent(deliveries)
    tasks.ensure_queue(missing_queue)  # the operator creates the queue; Cloud Tasks redelivers
    answer = make_client(MICROBATCH_RESPONSE_QUEUE=missing_queue).post("/payment-completed", json={"token": token})
    assert answer.status_code == 200
    delivered(deliveries, "/swap-executed")


def test_defect28_threshold_callbacks_answer_clearly_instead_of_501_forever(client, changenow, deliveries):
    answer = client.post("/payment-completed", json={"token": mint(hops.PAYMENT_COMPLETED, unique_id="acc_4211")})
    assert (answer.status_code, answer.json["status"]) == (200, "not_implemented")
    retry = mint(hops.CALLBACK_RETRY, unique_id="acc_4211", context="threshold")
    answer = client.post("/retry-callback-check", json={"token": retry})
    assert (answer.status_code, answer.json["status"]) == (200, "not_implemented")
    assert changenow.requests_seen == []
    assert nothing_sent(deliveries)


# ---------------------------------------------------------------------------- POST /retry-callback-check (T17)

def test_legacy_t17_vector_rechecks_and_schedules_the_next_one(legacy_client, changenow, deliveries):
    t17 = vector(hops.CALLBACK_RETRY)
    open_exchange(changenow, "sending", exchange_id=t17["fields"]["cn_api_id"])
    answer = legacy_client.post("/retry-callback-check", json={"token": t17["token"]})
    assert (answer.status_code, answer.json["status"], answer.json["retry_count"]) == (200, "retry_scheduled", 2)
    [retry] = delivered(deliveries, "/retry-callback-check")
    decoded = tokens.decode(hops.CALLBACK_RETRY, token_of(retry), KEYS, now=LEGACY_CLOCK)
    assert decoded == {**t17["fields"], "retry_count": 2, "timestamp": LEGACY_CLOCK}
    assert retry.headers["x-cloudtasks-taskname"] == task_id_for(RESPONSE_QUEUE, f"retry:{t17['fields']['unique_id']}:2")


def test_rechecks_follow_the_conversion_until_microbatch_is_called_back(client, changenow, deliveries):
    exchange_id = open_exchange(changenow, "confirming")
    batch_conversion_id = str(uuid.uuid4())
    token = batch_t14(unique_id=f"batch_{batch_conversion_id}", cn_api_id=exchange_id, tx_hash=TX_HASH)
    assert client.post("/payment-completed", json={"token": token}).status_code == 200
    [first] = delivered(deliveries, "/retry-callback-check")
    assert client.post("/retry-callback-check", json={"token": token_of(first)}).status_code == 200
    second = delivered(deliveries, "/retry-callback-check", count=2)[1]
    assert tokens.decode(hops.CALLBACK_RETRY, token_of(second), KEYS)["retry_count"] == 2
    changenow.advance(exchange_id, "finished")
    answer = client.post("/retry-callback-check", json={"token": token_of(second)})
    assert answer.json["status"] == "success", answer.json
    callback = deliveries.expect_exactly(3)[2]
    assert callback.path == "/swap-executed"
    t16 = tokens.decode(hops.MICROBATCH_SWAP_EXECUTED, token_of(callback), KEYS)
    amount_to = changenow.exchanges[exchange_id]["amountTo"]
    assert (t16["batch_conversion_id"], t16["cn_api_id"], t16["tx_hash"]) == (batch_conversion_id, exchange_id, TX_HASH)
    assert Decimal(repr(t16["actual_usdt_received"])) == amount_to > 0


def test_an_unfinished_conversion_after_the_last_recheck_is_recorded_not_looped(client, changenow, database, deliveries):
    exchange_id = open_exchange(changenow, "exchanging")
    unique_id = f"batch_{uuid.uuid4()}"
    token = mint(hops.CALLBACK_RETRY, unique_id=unique_id, cn_api_id=exchange_id, retry_count=3)
    for _ in range(2):  # legacy: 500 max_retries_exceeded, looping for 24 h
        answer = client.post("/retry-callback-check", json={"token": token})
        assert (answer.status_code, answer.json["status"]) == (200, "failed_pending_review")
    [row] = review_rows(database, unique_id)
    assert (row["error_code"], row["attempt_count"], row["context"]) == ("CALLBACK_RETRIES_EXHAUSTED", 4, "batch")
    assert row["last_error_details"]["changenow_status"] == "exchanging"
    assert nothing_sent(deliveries)


# ---------------------------------------------------------------------------- rejections, every endpoint

ENDPOINTS = {"/status-verified": hops.STATUS_VERIFIED, "/payment-completed": hops.PAYMENT_COMPLETED,
             "/retry-callback-check": hops.CALLBACK_RETRY}


@pytest.mark.parametrize("path", ["/", *ENDPOINTS])
def test_bad_requests_answer_4xx_and_change_nothing(client, changenow, database, deliveries, path):
    assert client.post(path, json={}).status_code == 400
    assert client.post(path, data="{not json", content_type="application/json").status_code == 400
    assert client.post(path, json={"token": "not-a-token"}).json["error"] == "token_rejected"
    assert changenow.requests_seen == []
    assert nothing_sent(deliveries)
    assert all_review_rows(database) == []


@pytest.mark.parametrize("path, hop", list(ENDPOINTS.items()))
def test_expired_tampered_and_foreign_tokens_are_rejected(client, changenow, database, deliveries, path, hop):
    expired = mint(hop, now=time.time() - 86400 - 600)  # beyond every window, T17's day included
    assert client.post(path, json={"token": expired}).json["reason"] == "expired"
    token = mint(hop)
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert client.post(path, json={"token": tampered}).status_code == 401
    wrong_key = tokens.encode(hop, vector(hop)["fields"], {hop.key: "not-the-key"})
    assert client.post(path, json={"token": wrong_key}).status_code == 401
    assert client.post(path, json={"token": vector(hops.HOSTPAY_ORDER)["token"]}).status_code == 401
    assert changenow.requests_seen == []
    assert nothing_sent(deliveries)
    assert all_review_rows(database) == []


def test_health_checks_the_database(client):
    answer = client.get("/health")
    assert (answer.status_code, answer.json["checks"]) == (200, {"database": "ok"})


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
