"""GCWebhook1 against the legacy T1/T2/T3 vectors, real PostgreSQL and the Cloud Tasks emulator."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import types
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from telepay_shared import errors, hops, tokens
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.testing.pytest_plugin import KEYS, TEST_LOCATION, TEST_PROJECT, VECTORS
from telepay_shared.testing.tasks_emulator import free_port

from services.gcwebhook1.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T1, T2, T3 = (VECTORS["hops"][name] for name in ("telepay->gcwebhook1", "gcwebhook1->gcwebhook2",
                                                  "gcwebhook1->gcsplit1"))
USER, CLOSED_CHANNEL = 6271402111, -1003268562225
INVITE_QUEUE = "gcwebhook-telegram-invite-queue"
_payment_ids = itertools.count(8_200_000_001)  # the emulator remembers task names for the whole session


class CountingTasks(TasksClient):
    """The real client, counting enqueue calls and failing those on `broken_queue`."""

    def __init__(self, emulator_host: str, broken_queue: str | None = None):
        super().__init__(TEST_PROJECT, TEST_LOCATION, emulator_host=emulator_host)
        self.broken_queue, self.calls = broken_queue, []

    def enqueue(self, queue, url, body, **options):
        self.calls.append(queue)
        if queue == self.broken_queue:
            raise errors.TaskEnqueueFailed(f"enqueue on {queue} failed")
        return super().enqueue(queue, url, body, **options)


@pytest.fixture
def make_client(service_env, load_service_config, database_url, deliveries):
    """Clients of the service (HMAC-authenticated by default) wired to the test database and emulator."""

    def make(tasks=None, **env_overrides):
        env = service_env(CONFIG_PATH, **{
            "DATABASE_URL": database_url, "TP_AUTH_MODE": "hmac", "GCSPLIT1_URL": deliveries.url("/gcsplit1"),
            "GCACCUMULATOR_URL": deliveries.url("/gcaccumulator"), "GCWEBHOOK2_URL": deliveries.url("/gcwebhook2"),
            **env_overrides})
        return create_app(load_service_config(CONFIG_PATH, env), tasks=tasks).test_client()

    return make


@pytest.fixture
def channel(database):
    """Register the channel; returns a function that sets its payout strategy."""
    with database.transaction() as tx:
        owner = tx.fetchvalue("INSERT INTO registered_users DEFAULT VALUES RETURNING user_id")
        tx.execute("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_id, payout_strategy,"
                   " payout_threshold_usd) VALUES ('-1003000000001', %s, %s, 'instant', 0)", (str(CLOSED_CHANNEL), owner))

    def set_strategy(strategy: str | None) -> None:
        with database.transaction() as tx:
            tx.execute("UPDATE main_clients_database SET payout_strategy = %s, payout_threshold_usd = 50", (strategy,))

    return set_strategy


@pytest.fixture
def client(make_client, channel):
    return make_client()


def validated(**changes) -> dict:
    """np-webhook's task body (spec §5) for the vector's subscription, under a payment id of its own."""
    fields = T2["fields"]
    return {"user_id": fields["user_id"], "closed_channel_id": str(fields["closed_channel_id"]),
            "wallet_address": fields["wallet_address"], "payout_currency": fields["payout_currency"],
            "payout_network": fields["payout_network"], "subscription_time_days": fields["subscription_time_days"],
            "subscription_price": fields["subscription_price"], "outcome_amount_usd": 13.800552,
            "nowpayments_payment_id": next(_payment_ids),
            "nowpayments_pay_address": "0x9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
            "nowpayments_outcome_amount": 0.0046, "payment_status": "finished", **changes}


def post(client, body: dict, key: str = KEYS[hops.SUCCESS_KEY], raw: bytes | None = None):
    """POST as our np-webhook does: the JSON bytes and their X-Webhook-Signature."""
    raw = json.dumps(body).encode() if raw is None else raw
    signature = hmac.new(key.encode(), json.dumps(body).encode(), hashlib.sha256).hexdigest()
    return client.post("/process-validated-payment", data=raw, content_type="application/json",
                       headers={"X-Webhook-Signature": signature})


def by_path(deliveries, count: int) -> dict:
    """The delivered tasks keyed by target path (one each)."""
    got = deliveries.expect_exactly(count, quiet_s=0.5)
    paths = [d.path for d in got]
    assert len(set(paths)) == len(paths), paths
    return {d.path: d for d in got}


def decoded_invite(delivery) -> tuple[dict, object]:
    """GCWebhook2's task: the decoded T2 and the payment id beside it."""
    body = json.loads(delivery.body)
    return tokens.decode(hops.INVITE, body["token"], KEYS), body["payment_id"]


def processed(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT payment_id, gcwebhook1_processed FROM processed_payments")


def test_instant_payment_sends_t3_to_gcsplit1_and_the_invite(client, database, deliveries):
    body = validated()
    answer = post(client, body)
    assert answer.status_code == 200, answer.json
    assert answer.json["payout_mode"] == "instant" and answer.json["difference"] == str(Decimal("13.800552") - 15)
    tasks = by_path(deliveries, 2)
    split = tasks["/gcsplit1"]
    t3 = tokens.decode_signed_body(hops.INSTANT_SPLIT, split.body, split.headers["x-webhook-signature"], KEYS)
    assert list(json.loads(split.body)) == [*json.loads(T3["token"]["body"]), "payment_id"]  # legacy order, key added
    assert {k: t3[k] for k in T3["fields"]} == {**T3["fields"], "subscription_price": 13.800552}
    assert t3["payment_id"] == str(body["nowpayments_payment_id"])
    invite, payment_id = decoded_invite(tasks["/gcwebhook2"])
    assert {k: invite[k] for k in T2["fields"]} == T2["fields"] and payment_id == body["nowpayments_payment_id"]
    assert processed(database) == [{"payment_id": body["nowpayments_payment_id"], "gcwebhook1_processed": True}]


def test_threshold_payment_credits_gcaccumulator_signed(client, channel, database, deliveries):
    channel("threshold")
    with database.transaction() as tx:
        newest = [tx.fetchvalue("INSERT INTO private_channel_users_database (user_id, private_channel_id)"
                                " VALUES (%s, %s) RETURNING id", (USER, str(CLOSED_CHANNEL))) for _ in range(2)][-1]
    body = validated()
    assert post(client, body).json["payout_mode"] == "threshold"
    tasks = by_path(deliveries, 2)
    credit = tasks["/gcaccumulator"]
    assert credit.headers["x-webhook-signature"] == hmac.new(
        KEYS[hops.SUCCESS_KEY].encode(), credit.body, hashlib.sha256).hexdigest()
    fields = json.loads(credit.body)
    timestamp = datetime.fromisoformat(fields.pop("payment_timestamp"))
    assert abs(timestamp - datetime.now(timezone.utc).replace(tzinfo=None)) < timedelta(minutes=1)
    assert fields == {"user_id": USER, "client_id": CLOSED_CHANNEL, "wallet_address": body["wallet_address"],
                      "payout_currency": "link", "payout_network": "eth", "payment_amount_usd": 13.800552,
                      "subscription_id": newest, "nowpayments_payment_id": body["nowpayments_payment_id"],
                      "nowpayments_pay_address": body["nowpayments_pay_address"], "nowpayments_outcome_amount": 0.0046}
    assert decoded_invite(tasks["/gcwebhook2"])[1] == body["nowpayments_payment_id"]


def test_unknown_or_unset_strategy_pays_instantly(client, channel, deliveries):
    channel(None)
    assert post(client, validated(closed_channel_id="-1009999999999")).json["payout_mode"] == "instant"
    assert post(client, validated()).json["payout_mode"] == "instant"
    assert sorted(d.path for d in deliveries.expect_exactly(4, quiet_s=0.5)) == ["/gcsplit1", "/gcsplit1",
                                                                                  "/gcwebhook2", "/gcwebhook2"]


def test_routed_payment_redelivered_queues_nothing(client, deliveries):
    body = validated()
    assert post(client, body).status_code == 200
    again = post(client, body)
    assert (again.status_code, again.json["message"]) == (200, "Payment already processed")
    assert len(by_path(deliveries, 2)) == 2


def test_failed_invite_enqueue_is_retried_and_the_retry_completes(make_client, channel, tasks_emulator, database,
                                                                  deliveries):
    """Defect 20: legacy marked the payment processed although the invite task was never created."""
    body = validated()
    broken = CountingTasks(tasks_emulator.host, broken_queue=INVITE_QUEUE)
    answer = post(make_client(tasks=broken), body)
    assert (answer.status_code, answer.json["error"]) == (503, "task_enqueue_failed")
    assert processed(database) == []
    assert deliveries.wait_for(1)[0].path == "/gcsplit1"  # the payout task of the partial attempt
    assert post(make_client(), body).status_code == 200
    assert set(by_path(deliveries, 2)) == {"/gcsplit1", "/gcwebhook2"}  # the payout task is not repeated
    assert processed(database)[0]["gcwebhook1_processed"] is True


@pytest.mark.parametrize("changes, field", [
    ({"subscription_time_days": None}, "subscription_time_days"),
    ({"subscription_time_days": 0}, "subscription_time_days"),
    ({"subscription_time_days": 70000}, "subscription_time_days"),
    ({"subscription_price": "None"}, "subscription_price"),
    ({"subscription_price": "0"}, "subscription_price"),
    ({"subscription_price": "9" * 300}, "subscription_price"),
    ({"outcome_amount_usd": 0}, "outcome_amount_usd"),
    ({"nowpayments_outcome_amount": None}, "nowpayments_outcome_amount"),
    ({"nowpayments_payment_id": "x"}, "nowpayments_payment_id"),
    ({"user_id": "me"}, "user_id"),
    ({"closed_channel_id": "-1e3"}, "closed_channel_id"),
    ({"closed_channel_id": str(2 ** 47)}, "closed_channel_id"),
    ({"wallet_address": 42}, "wallet_address"),
    ({"wallet_address": "0x" + "a" * 300}, "wallet_address"),
])
def test_invalid_payment_is_refused_before_any_task(client, database, deliveries, changes, field):
    """Defect 8: legacy queued the payout first, then failed on these fields and queued another per retry."""
    answer = post(client, validated(**changes))
    assert answer.status_code == 400
    assert answer.json.get("field") == field or field in answer.json.get("missing", [])
    assert processed(database) == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_unfinished_payment_is_rejected_without_effect(client, database, deliveries):
    answer = post(client, validated(payment_status="confirming"))
    assert (answer.status_code, answer.json["status"]) == (200, "rejected")
    assert processed(database) == [] and deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_unsigned_tampered_or_wrongly_signed_requests_are_refused(client, database, deliveries):
    """Defect 1: legacy accepted anyone's "finished" payment on this endpoint."""
    body = validated()
    unsigned = client.post("/process-validated-payment", json=body)
    wrong_key = post(client, body, key="not-the-key")
    tampered = post(client, body, raw=json.dumps({**body, "wallet_address": "0xattacker"}).encode())
    assert [r.status_code for r in (unsigned, wrong_key, tampered)] == [401, 401, 401]
    assert processed(database) == [] and deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_auth_mode_switch_for_mixed_deployments(make_client, channel, deliveries):
    assert make_client(TP_AUTH_MODE="none").post("/process-validated-payment", json=validated()).status_code == 200
    with pytest.raises(errors.ConfigError, match="TP_OIDC_AUDIENCES"):
        make_client(TP_AUTH_MODE="oidc")


def test_bad_json_is_a_bad_request(client):
    raw = b"{nope"
    signature = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), raw, hashlib.sha256).hexdigest()
    answer = client.post("/process-validated-payment", data=raw, content_type="application/json",
                         headers={"X-Webhook-Signature": signature})
    assert answer.status_code == 400


def test_database_down_is_retried_not_routed_instantly(make_client, deliveries):
    down = make_client(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/telepay")
    assert post(down, validated()).status_code == 503
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    assert down.get("/health").status_code == 503


def test_concurrent_deliveries_route_once(make_client, channel, tasks_emulator, database, deliveries):
    counting = CountingTasks(tasks_emulator.host)
    clients, body, answers = [make_client(tasks=counting) for _ in range(3)], validated(), []
    with database.transaction() as tx:  # np-webhook has recorded the payment, as in production
        tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)",
                   (body["nowpayments_payment_id"], USER, CLOSED_CHANNEL))
    threads = [threading.Thread(target=lambda c=c: answers.append(post(c, body).status_code)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]
    assert len(counting.calls) == 2  # the others waited on the row lock, then found the payment routed
    assert len(by_path(deliveries, 2)) == 2


def subscription_rows(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT user_id, private_channel_id, sub_time, sub_price, expire_date, expire_time,"
                           " is_active FROM private_channel_users_database ORDER BY id")


def test_legacy_success_url_vector_records_the_subscription(client, database, monkeypatch):
    monkeypatch.setattr(tokens, "time", types.SimpleNamespace(time=lambda: VECTORS["created_at"] + 60))
    assert client.get("/", query_string={"token": T1["token"]}).json == {"status": "ok"}
    [row] = subscription_rows(database)
    assert (row["user_id"], row["private_channel_id"], row["sub_time"], row["sub_price"], row["is_active"]) == (
        USER, str(CLOSED_CHANNEL), 30, Decimal("15.00"), True)


def test_success_url_sets_every_row_of_the_subscription(client, database):
    fresh = tokens.encode(hops.SUCCESS_URL, {**T1["fields"], "subscription_time_days": 90}, KEYS)
    with database.transaction() as tx:
        for _ in range(2):
            tx.execute("INSERT INTO private_channel_users_database (user_id, private_channel_id, is_active)"
                       " VALUES (%s, %s, FALSE)", (USER, str(CLOSED_CHANNEL)))
    assert client.get(f"/?token={fresh}").status_code == 200
    rows = subscription_rows(database)
    expected = (datetime.now(timezone.utc) + timedelta(days=90)).date()
    assert [(r["sub_time"], r["is_active"]) for r in rows] == [(90, True), (90, True)]
    assert all(abs(r["expire_date"] - expected) <= timedelta(days=1) for r in rows)


def test_success_url_minted_a_little_ahead_of_our_clock_is_accepted(client, database):
    """Defect 31: legacy read any future minute stamp as ~45 days old and rejected it."""
    ahead = tokens.encode(hops.SUCCESS_URL, T1["fields"], KEYS, now=time.time() + 120)
    assert client.get("/", query_string={"token": ahead}).status_code == 200
    too_far = tokens.encode(hops.SUCCESS_URL, T1["fields"], KEYS, now=time.time() + 900)
    assert client.get("/", query_string={"token": too_far}).json["reason"] == "future"
    assert len(subscription_rows(database)) == 1


@pytest.mark.parametrize("token, status", [
    (None, 400),
    ("garbage", 401),
    (tokens.encode(hops.SUCCESS_URL, T1["fields"], KEYS, now=time.time() - 3 * 3600), 401),
    (tokens.encode(hops.SUCCESS_URL, T1["fields"], {hops.SUCCESS_KEY: "other"}), 401),
    (tokens.encode(hops.SUCCESS_URL, {**T1["fields"], "subscription_price": "abc"}, KEYS), 400),
])
def test_success_url_rejections_write_nothing(client, database, token, status):
    answer = client.get("/", query_string={} if token is None else {"token": token})
    assert answer.status_code == status
    assert subscription_rows(database) == []


def test_health(client):
    assert client.get("/health").json["checks"] == {"database": "ok"}
