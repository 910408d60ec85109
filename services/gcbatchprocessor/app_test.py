"""GCBatchProcessor against real PostgreSQL and the Cloud Tasks emulator: who is paid, exactly once."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from decimal import Decimal

import pytest

from telepay_shared import hops, tokens
from telepay_shared.config import ConfigError
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS, delivered_tokens, slow_inserts

from services.gcbatchprocessor.app import CONFIG_PATH, create_app

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T9 = VECTORS["hops"]["gcbatchprocessor->gcsplit1"]
CHANNEL = T9["fields"]["client_id"]  # -1003268562225, the closed channel of the legacy vectors
WALLET = T9["fields"]["wallet_address"]
OTHER_WALLET = "0x" + "77" * 20
CHANNEL_IDS = itertools.count(1)
PAYMENT_IDS = itertools.count(8200000001)


def register_channel(database, closed_channel_id=CHANNEL, threshold="50.00") -> None:
    """A threshold channel in main_clients_database, owned by a registered user."""
    with database.transaction() as tx:
        owner = tx.fetchvalue("INSERT INTO registered_users DEFAULT VALUES RETURNING user_id")
        tx.execute("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_wallet_address,"
                   " client_payout_currency, client_payout_network, payout_strategy, payout_threshold_usd, client_id)"
                   " VALUES (%s, %s, %s, 'link', 'eth', 'threshold', %s, %s)",
                   (f"-100{next(CHANNEL_IDS)}", closed_channel_id, WALLET, Decimal(threshold), owner))


def add_credit(database, usdt: str, *, status="completed", client=CHANNEL, wallet=WALLET, currency="link",
               eth="0.0080") -> int:
    """A payout_accumulation row; 'completed' rows hold their USDT share of a finished micro-batch."""
    with database.transaction() as tx:
        return tx.fetchvalue(
            "INSERT INTO payout_accumulation (client_id, user_id, payment_amount_usd, payment_currency,"
            " payment_timestamp, accumulated_amount_usdt, payment_fee_usd, client_wallet_address,"
            " client_payout_currency, client_payout_network, conversion_status, nowpayments_payment_id,"
            " nowpayments_outcome_amount) VALUES (%s, 1, 27, 'usd', LOCALTIMESTAMP, %s, 0.81, %s, %s, 'eth', %s,"
            " %s, %s) RETURNING id",
            (client, Decimal(usdt), wallet, currency, status, str(next(PAYMENT_IDS)), Decimal(eth)))


def rows(database, sql: str) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall(sql)


def credits(database) -> list[dict]:
    return rows(database, "SELECT * FROM payout_accumulation ORDER BY id")


def batches(database) -> list[dict]:
    return rows(database, "SELECT * FROM payout_batches ORDER BY created_at, batch_id")


def paid_ids(database) -> dict[int, str]:
    """Credit id -> payout batch id of every credit marked paid."""
    return {c["id"]: c["payout_batch_id"] for c in credits(database) if c["is_paid_out"]}


def delivered_t9(deliveries, count: int) -> list[dict]:
    """The T9 tokens GCSplit1's /batch-payout received, decoded (each sent with batch_mode true)."""
    t9s = delivered_tokens(deliveries, hops.BATCH_PAYOUT, "/batch-payout", count=count)
    assert all(json.loads(d.body)["batch_mode"] is True for d in deliveries.deliveries())
    return t9s


@pytest.fixture
def make_client(service_env, load_service_config, database_url, deliveries):
    """A test client; TP_AUTH_MODE is 'none' unless given, the rest of the environment may be overridden."""

    def make(**values):
        env = service_env(CONFIG_PATH, DATABASE_URL=database_url, GCSPLIT1_URL=deliveries.url(""), **values)
        return create_app(load_service_config(CONFIG_PATH, env)).test_client()

    return make


def process(client):
    return client.post("/process")


def test_nothing_due_answers_no_batches(client, database, deliveries):
    register_channel(database)
    add_credit(database, "49.99")
    assert process(client).json == {"status": "success", "message": "No batches to process", "batches_created": 0,
                                    "batches": [], "errors": None}
    assert batches(database) == [] and paid_ids(database) == {}
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_balance_at_threshold_is_sent_to_gcsplit1_and_its_credits_marked_paid(client, database, deliveries, tasks):
    register_channel(database)
    ids = [add_credit(database, "26.19", eth="0.0080"), add_credit(database, "26.19", eth="0.0081")]
    answer = process(client)
    assert answer.status_code == 200, answer.json
    [batch] = batches(database)
    batch_id = batch["batch_id"]
    [t9] = delivered_t9(deliveries, 1)
    # The legacy vector's payout, byte for byte but for the batch id.
    assert t9 == {**T9["fields"], "batch_id": batch_id}
    assert answer.json == {"status": "success", "message": "Processed 1 client(s)", "batches_created": 1,
                           "batches": [{"batch_id": batch_id, "client_id": CHANNEL, "total_usdt": "52.38000000",
                                        "payment_count": 2, "task_name": tasks.task_path(
                                            "gcsplit1-batch-queue", f"gcsplit1-batch:{batch_id}")}],
                           "errors": None}
    assert (batch["client_id"], batch["client_wallet_address"], batch["client_payout_currency"],
            batch["client_payout_network"]) == (CHANNEL, WALLET, "link", "eth")
    assert (batch["total_amount_usdt"], batch["total_payments_count"], batch["status"]) == (
        Decimal("52.38"), 2, "processing")
    assert batch["processing_started_at"] is not None
    assert paid_ids(database) == {ids[0]: batch_id, ids[1]: batch_id}
    assert all(c["paid_out_at"] is not None for c in credits(database))


def test_emitted_t9_is_the_legacy_wire_format(client, database, deliveries):
    register_channel(database)
    add_credit(database, "26.19", eth="0.0080")
    add_credit(database, "26.19", eth="0.0081")
    process(client)
    token = json.loads(deliveries.expect_exactly(1)[0].body)["token"]
    legacy = tokens.encode(hops.BATCH_PAYOUT, {**T9["fields"], "batch_id": batches(database)[0]["batch_id"]}, KEYS)
    assert token == legacy
    assert tokens.encode(hops.BATCH_PAYOUT, T9["fields"], KEYS) == T9["token"]


def test_next_run_pays_nothing_again(client, database, deliveries):
    register_channel(database)
    add_credit(database, "60")
    assert process(client).json["batches_created"] == 1
    assert process(client).json["message"] == "No batches to process"
    assert len(batches(database)) == 1
    delivered_t9(deliveries, 1)


def test_unconverted_credits_are_never_paid(client, database, deliveries):
    """Defect 15: legacy summed pending/swapping rows, which hold USD bookkeeping, not USDT in the wallet."""
    register_channel(database)
    pending, swapping = add_credit(database, "40", status="pending"), add_credit(database, "40", status="swapping")
    completed = add_credit(database, "20")
    assert process(client).json["batches_created"] == 0  # 20 USDT converted < 50
    assert paid_ids(database) == {}
    add_credit(database, "30")
    assert process(client).status_code == 200
    [batch] = batches(database)
    assert batch["total_amount_usdt"] == Decimal("50")
    assert pending not in paid_ids(database) and swapping not in paid_ids(database)
    assert completed in paid_ids(database)
    delivered_t9(deliveries, 1)


def test_each_destination_is_paid_on_its_own(client, database, deliveries):
    """Defect 16: legacy marked every unpaid row of the client, whatever wallet or currency it was for."""
    register_channel(database)
    link_credit = add_credit(database, "55")
    usdt_credit = add_credit(database, "30", currency="usdt")
    other_wallet_credit = add_credit(database, "10", wallet=OTHER_WALLET)
    assert process(client).json["batches_created"] == 1
    assert set(paid_ids(database)) == {link_credit}
    assert usdt_credit not in paid_ids(database) and other_wallet_credit not in paid_ids(database)
    [t9] = delivered_t9(deliveries, 1)
    assert (t9["payout_currency"], t9["wallet_address"], t9["total_amount_usdt"]) == ("link", WALLET, "55.00000000")


def test_two_destinations_due_make_two_batches(client, database, deliveries):
    register_channel(database)
    register_channel(database, closed_channel_id="-1009999", threshold="10")
    add_credit(database, "50")
    add_credit(database, "12", client="-1009999", currency="usdt")
    assert process(client).json["batches_created"] == 2
    sent = delivered_t9(deliveries, 2)
    assert sorted((t["client_id"], t["total_amount_usdt"]) for t in sent) == [
        ("-1003268562225", "50.00000000"), ("-1009999", "12.00000000")]


def test_client_without_a_registered_channel_is_not_paid(client, database):
    add_credit(database, "500")
    assert process(client).json["batches_created"] == 0
    assert paid_ids(database) == {}


def test_channel_registered_twice_does_not_double_its_balance(client, database):
    register_channel(database, threshold="50")
    register_channel(database, threshold="60")  # a second open channel on the same closed channel
    add_credit(database, "55")
    assert process(client).json["batches_created"] == 0  # 55 < 60: legacy's join would have seen 110


def test_credit_arriving_during_the_claim_is_not_marked_paid(client, database, deliveries):
    """Defect 16: a credit inserted between the SUM and the mark was marked paid but never paid."""
    register_channel(database)
    summed = [add_credit(database, "30"), add_credit(database, "30")]
    with database.transaction() as tx:  # fires inside the claim, after the SUM and before the mark
        tx.execute("""
            CREATE FUNCTION credit_arrives() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              INSERT INTO payout_accumulation (client_id, user_id, payment_amount_usd, payment_currency,
                payment_timestamp, accumulated_amount_usdt, client_wallet_address, client_payout_currency,
                client_payout_network, conversion_status, nowpayments_payment_id)
              VALUES (NEW.client_id, 1, 20, 'usd', LOCALTIMESTAMP, 19.4, NEW.client_wallet_address,
                NEW.client_payout_currency, NEW.client_payout_network, 'completed', 'late');
              RETURN NEW; END $$;
            CREATE TRIGGER credit_arrives AFTER INSERT ON payout_batches FOR EACH ROW EXECUTE FUNCTION credit_arrives();
        """)
    assert process(client).status_code == 200
    [batch] = batches(database)
    assert set(paid_ids(database)) == set(summed)
    [late] = [c for c in credits(database) if c["id"] not in summed]
    assert (late["is_paid_out"], late["payout_batch_id"]) == (False, None)  # it waits for the next payout
    assert batch["total_amount_usdt"] == Decimal("60") and batch["total_payments_count"] == 2
    assert delivered_t9(deliveries, 1)[0]["total_amount_usdt"] == "60.00000000"


def test_two_concurrent_runs_pay_once(client, database, deliveries):
    register_channel(database)
    add_credit(database, "60")
    slow_inserts(database, "payout_batches")  # the first run holds the claim lock a while
    first_answer = []
    first = threading.Thread(target=lambda: first_answer.append(process(client.application.test_client())))
    first.start()
    for _ in range(500):
        if rows(database, "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"):
            break
        time.sleep(0.02)
    second = process(client)
    first.join()
    assert first_answer[0].json["batches_created"] == 1 and second.json["batches_created"] == 0
    assert len(batches(database)) == 1
    delivered_t9(deliveries, 1)


def test_batch_whose_t9_was_not_enqueued_is_sent_by_the_next_run(client, service_env, load_service_config,
                                                                  database_url, database, deliveries):
    register_channel(database)
    ids = [add_credit(database, "60")]
    env = service_env(CONFIG_PATH, DATABASE_URL=database_url, GCSPLIT1_URL=deliveries.url(""))
    # A queue that does not exist (yet): a deployment fault, answered 500 so the scheduler tries again.
    misrouted = create_app(load_service_config(CONFIG_PATH, {**env, "GCSPLIT1_BATCH_QUEUE": "queue-not-created"}))
    assert process(misrouted.test_client()).status_code == 500
    [batch] = batches(database)
    assert (batch["status"], paid_ids(database)) == ("pending", {ids[0]: batch["batch_id"]})
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []
    add_credit(database, "20")  # arrives meanwhile; below the threshold on its own
    resumed = process(client)
    assert resumed.json["batches_created"] == 0
    assert [b["batch_id"] for b in resumed.json["batches"]] == [batch["batch_id"]]
    [t9] = delivered_t9(deliveries, 1)
    assert (t9["batch_id"], t9["total_amount_usdt"]) == (batch["batch_id"], "60.00000000")
    assert batches(database)[0]["status"] == "processing"
    assert process(client).json["batches"] == []  # sent once


def test_legacy_pending_batch_without_credits_is_not_sent(client, database, deliveries):
    with database.transaction() as tx:
        tx.execute("INSERT INTO payout_batches (batch_id, client_id, client_wallet_address, client_payout_currency,"
                   " client_payout_network, total_amount_usdt, total_payments_count) VALUES"
                   " ('legacy-1', %s, %s, 'link', 'eth', 60, 2)", (CHANNEL, WALLET))
    assert process(client).json["batches"] == []
    assert deliveries.expect_exactly(0, quiet_s=0.3) == []


def test_scheduler_trigger_needs_oidc_or_an_hmac_by_default(make_client, database):
    """Defect 6: anyone could trigger /process."""
    with pytest.raises(ConfigError, match="oidc needs"):
        make_client(TP_AUTH_MODE="oidc_or_hmac")
    register_channel(database)
    add_credit(database, "60")
    client = make_client(TP_AUTH_MODE="oidc_or_hmac", TP_OIDC_AUDIENCES="https://batch.example",
                         TP_OIDC_ALLOWED_EMAILS="scheduler@telepay.iam.gserviceaccount.com")
    assert client.post("/process").status_code == 401
    assert client.post("/process", headers={"Authorization": "Basic abc"}).status_code == 401
    assert batches(database) == [] and paid_ids(database) == {}
    signature = hmac.new(KEYS[hops.SUCCESS_KEY].encode(), b"", hashlib.sha256).hexdigest()
    assert client.post("/process", headers={"X-Webhook-Signature": signature}).json["batches_created"] == 1
    assert json.loads(CONFIG_PATH.read_text())["env"]["TP_AUTH_MODE"]["default"] == "oidc_or_hmac"


def test_health(client):
    assert client.get("/health").status_code == 200


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
