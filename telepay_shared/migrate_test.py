"""Tests of telepay_shared.migrate and of the migrations themselves, on a real PostgreSQL server.

LEGACY_SCHEMA below is spec §6.1 written out independently of 0001_legacy_schema.sql; the test
compares the migrated database with it through information_schema, so either one drifting fails.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import pg8000.dbapi
import pytest

from telepay_shared import errors
from telepay_shared.db import Database
from telepay_shared.migrate import MIGRATIONS_DIR, MigrationError, apply_migrations, main, migration_status
from telepay_shared.testing import postgres

# Column spec: "name type" with "!" for NOT NULL and "=default" (casts stripped); "serial" is an
# integer NOT NULL whose default is the table's id sequence.
LEGACY_SCHEMA = {
    "registered_users": "user_id uuid! =gen_random_uuid(); created_at timestamp =CURRENT_TIMESTAMP",
    "main_clients_database": (
        "open_channel_id varchar(14)!; open_channel_title varchar(100); open_channel_description varchar(500); "
        "closed_channel_id varchar(14)!; closed_channel_title varchar(100); "
        "closed_channel_description varchar(500); sub_1_price numeric(10,2); sub_1_time integer; "
        "sub_2_price numeric(10,2); sub_2_time integer; sub_3_price numeric(10,2); sub_3_time integer; "
        "client_wallet_address varchar(200); client_payout_currency varchar(10); "
        "client_payout_network varchar(50); payout_strategy varchar(20) ='instant'; "
        "payout_threshold_usd numeric(10,2) =0; payout_threshold_updated_at timestamp; client_id uuid!; "
        "created_by varchar(50); updated_at timestamp =CURRENT_TIMESTAMP"),
    "private_channel_users_database": (
        "id serial; user_id bigint; private_channel_id varchar(14); sub_time integer; sub_price numeric(10,2); "
        "timestamp time; datestamp date; expire_time time; expire_date date; is_active boolean =true; "
        "payment_status varchar(20) ='pending'; nowpayments_payment_id varchar(50); "
        "nowpayments_invoice_id varchar(50); nowpayments_order_id varchar(100); "
        "nowpayments_pay_address varchar(255); nowpayments_payment_status varchar(50); "
        "nowpayments_pay_amount numeric(30,18); nowpayments_pay_currency varchar(20); "
        "nowpayments_outcome_amount numeric(30,18); nowpayments_price_amount numeric(20,8); "
        "nowpayments_price_currency varchar(10); nowpayments_outcome_currency varchar(10); "
        "nowpayments_outcome_amount_usd numeric(20,8); nowpayments_created_at timestamp; "
        "nowpayments_updated_at timestamp"),
    "processed_payments": (
        "payment_id bigint!; user_id bigint!; channel_id bigint!; gcwebhook1_processed boolean =false; "
        "gcwebhook1_processed_at timestamp; telegram_invite_sent boolean =false; "
        "telegram_invite_sent_at timestamp; telegram_invite_link text; created_at timestamp =CURRENT_TIMESTAMP; "
        "updated_at timestamp =CURRENT_TIMESTAMP"),
    "payout_accumulation": (
        "id serial; client_id varchar(14)!; user_id bigint!; subscription_id integer; "
        "payment_amount_usd numeric(10,2)!; payment_currency varchar(10)!; payment_timestamp timestamp!; "
        "accumulated_amount_usdt numeric(18,8)!; eth_to_usdt_rate numeric(18,8); conversion_timestamp timestamp; "
        "conversion_tx_hash varchar(100); client_wallet_address varchar(200)!; "
        "client_payout_currency varchar(10)!; client_payout_network varchar(50)!; is_paid_out boolean =false; "
        "payout_batch_id varchar(50); paid_out_at timestamp; created_at timestamp =CURRENT_TIMESTAMP; "
        "updated_at timestamp =CURRENT_TIMESTAMP; conversion_status varchar(50) ='pending'; "
        "conversion_attempts integer =0; last_conversion_attempt timestamp; nowpayments_payment_id varchar(50); "
        "nowpayments_pay_address varchar(255); nowpayments_outcome_amount numeric(30,18); "
        "nowpayments_network_fee numeric(30,18); payment_fee_usd numeric(20,8); batch_conversion_id uuid"),
    "payout_batches": (
        "batch_id varchar(50)!; client_id varchar(14)!; client_wallet_address varchar(200)!; "
        "client_payout_currency varchar(10)!; client_payout_network varchar(50)!; "
        "total_amount_usdt numeric(18,8)!; total_payments_count integer!; payout_amount_crypto numeric(18,8); "
        "usdt_to_crypto_rate numeric(18,8); conversion_fee numeric(18,8); cn_api_id varchar(100); "
        "cn_payin_address varchar(200); tx_hash varchar(100); tx_status varchar(20); "
        "status varchar(20) ='pending'; created_at timestamp =CURRENT_TIMESTAMP; "
        "processing_started_at timestamp; completed_at timestamp"),
    "batch_conversions": (
        "id serial; batch_conversion_id uuid!; total_eth_usd numeric(20,8)!; threshold_at_creation numeric(20,2)!; "
        "cn_api_id varchar(255); payin_address varchar(255); conversion_status varchar(20) ='pending'; "
        "actual_usdt_received numeric(20,8); conversion_tx_hash varchar(255); created_at timestamp =now(); "
        "processing_started_at timestamp; completed_at timestamp"),
    "split_payout_request": (
        "unique_id varchar(16)!; user_id bigint; closed_channel_id varchar(14); from_currency varchar(10); "
        "to_currency varchar(10); from_network varchar(50); to_network varchar(50); from_amount numeric(20,8); "
        "to_amount numeric(30,8); client_wallet_address varchar(200); refund_address varchar(200); "
        "flow varchar(20); type varchar(20); actual_eth_amount numeric(20,18) =0; "
        "created_at timestamp =CURRENT_TIMESTAMP"),
    "split_payout_que": (
        "id serial; unique_id varchar(16); cn_api_id varchar(100); user_id bigint; closed_channel_id varchar(14); "
        "from_currency varchar(10); to_currency varchar(10); from_network varchar(50); to_network varchar(50); "
        "from_amount numeric(20,8); to_amount numeric(30,8); payin_address varchar(200); "
        "payout_address varchar(200); refund_address varchar(200); flow varchar(20); type varchar(20); "
        "actual_eth_amount numeric(20,18) =0; created_at timestamp =CURRENT_TIMESTAMP"),
    "split_payout_hostpay": (
        "unique_id varchar(64)!; cn_api_id varchar(16)!; from_currency currency_type!; "
        "from_network currency_type!; from_amount numeric(20,8); payin_address varchar(95)!; "
        "is_complete boolean! =false; created_at timestamptz =now(); updated_at timestamptz =now(); "
        "tx_hash varchar(66); tx_status varchar(20) ='pending'; gas_used integer; block_number integer; "
        "actual_eth_amount numeric(20,18) =0"),
    "failed_transactions": (
        "id serial; unique_id varchar(16)!; cn_api_id varchar(16)!; from_currency varchar(10)!; "
        "from_network varchar(10)!; from_amount numeric(18,8)!; payin_address varchar(100)!; "
        "context varchar(20)! ='instant'; error_code varchar(50)!; error_message text; last_error_details jsonb; "
        "attempt_count integer! =3; last_attempt_timestamp timestamp!; "
        "status varchar(30)! ='failed_pending_review'; retry_count integer! =0; last_retry_attempt timestamp; "
        "recovery_tx_hash varchar(100); recovered_at timestamp; recovered_by varchar(50); admin_notes text; "
        "created_at timestamp! =now(); updated_at timestamp! =now()"),
}

# What 0002_idempotency.sql changes: (table, column) -> new spec; new columns go last.
IDEMPOTENCY_CHANGES = {
    ("failed_transactions", "unique_id"): "varchar(64)!",
    ("split_payout_request", "actual_eth_amount"): "numeric(38,18) =0",
    ("split_payout_que", "actual_eth_amount"): "numeric(38,18) =0",
    ("split_payout_hostpay", "actual_eth_amount"): "numeric(38,18) =0",
    ("split_payout_request", "idempotency_key"): "varchar(100)",
    ("split_payout_hostpay", "nonce"): "bigint",
    # 0003_hostpay_signed_tx.sql
    ("split_payout_hostpay", "signed_tx"): "text",
    ("split_payout_hostpay", "sender_address"): "varchar(42)",
}

# The documented value set of the uppercase currency_type enum (see 0001_legacy_schema.sql).
CURRENCY_TYPE = ["ETH", "BTC", "USDT", "USDC", "DAI", "LINK", "MATIC", "LTC", "TRX", "BNB", "SOL", "XRP",
                 "DOGE", "ADA", "DOT", "AVAX", "SHIB", "TON", "BCH", "XLM", "ATOM", "UNI", "BUSD", "POL",
                 "BSC", "ARBITRUM", "OP", "BASE", "AVAXC"]

# Every index of §6.1 as "table(columns)", "unique" for unique ones, "partial" when it has a WHERE.
LEGACY_INDEXES = {
    "registered_users(user_id) unique", "main_clients_database(open_channel_id) unique",
    "private_channel_users_database(id) unique", "private_channel_users_database(nowpayments_payment_id)",
    "private_channel_users_database(nowpayments_order_id)",
    "private_channel_users_database(nowpayments_order_id, payment_status)",
    "processed_payments(payment_id) unique", "processed_payments(user_id, channel_id)",
    "processed_payments(telegram_invite_sent)", "processed_payments(gcwebhook1_processed)",
    "processed_payments(created_at DESC)",
    "batch_conversions(id) unique", "batch_conversions(batch_conversion_id) unique",
    "batch_conversions(conversion_status)", "batch_conversions(cn_api_id)", "batch_conversions(created_at)",
    "payout_batches(batch_id) unique", "payout_batches(client_id)", "payout_batches(status)",
    "payout_batches(created_at)",
    "payout_accumulation(id) unique", "payout_accumulation(client_id, is_paid_out)",
    "payout_accumulation(payout_batch_id)", "payout_accumulation(user_id)", "payout_accumulation(payment_timestamp)",
    "payout_accumulation(conversion_status)", "payout_accumulation(nowpayments_payment_id)",
    "payout_accumulation(nowpayments_pay_address)", "payout_accumulation(batch_conversion_id)",
    "split_payout_request(unique_id) unique", "split_payout_request(actual_eth_amount) partial",
    "split_payout_que(id) unique",
    "failed_transactions(id) unique", "failed_transactions(unique_id)", "failed_transactions(cn_api_id)",
    "failed_transactions(status)", "failed_transactions(error_code)", "failed_transactions(created_at DESC)",
    "failed_transactions(status, error_code, created_at) partial",
    "schema_migrations(version) unique",
}
IDEMPOTENCY_INDEXES = {
    "payout_accumulation(nowpayments_payment_id) unique", "split_payout_request(idempotency_key) unique",
    "split_payout_que(cn_api_id) unique", "split_payout_que(unique_id) unique",
    "split_payout_hostpay(unique_id) unique", "batch_conversions(cn_api_id) unique",
    "split_payout_hostpay(sender_address, nonce) unique",  # 0003
    "private_channel_users_database(user_id, private_channel_id, id)",  # 0004
}

_CAST = re.compile(r"::[a-z ]+(\(\d+\))?")
_INDEX_DEF = re.compile(r"CREATE (UNIQUE )?INDEX \S+ ON public\.(\w+) USING btree \((.+?)\)( WHERE .+)?$")


def _parse_columns(table: str, spec: str) -> list[tuple[str, str]]:
    """(column, "type[!] [=default]") pairs of one table's spec string."""
    columns = []
    for column in spec.split("; "):
        name, rest = column.split(" ", 1)
        if rest == "serial":
            rest = f"integer! =nextval('{table}_{name}_seq')"
        columns.append((name, rest))
    return columns


def _expected_schema(*, with_idempotency: bool) -> dict[str, list[tuple[str, str]]]:
    """The schema §6.1 describes, optionally with 0002's changes applied."""
    schema = {table: _parse_columns(table, spec) for table, spec in LEGACY_SCHEMA.items()}
    if with_idempotency:
        for (table, column), spec in IDEMPOTENCY_CHANGES.items():
            names = [name for name, _ in schema[table]]
            if column in names:
                schema[table][names.index(column)] = (column, spec)
            else:
                schema[table].append((column, spec))
    schema["schema_migrations"] = [("version", "integer!"), ("name", "text!"), ("checksum", "character(64)!"),
                                   ("applied_at", "timestamptz! =now()")]
    return schema


def _render_type(row: dict) -> str:
    """A column's type the way LEGACY_SCHEMA spells it."""
    data_type = row["data_type"]
    if data_type == "character varying":
        return f"varchar({row['character_maximum_length']})"
    if data_type == "character":
        return f"character({row['character_maximum_length']})"
    if data_type == "numeric":
        return f"numeric({row['numeric_precision']},{row['numeric_scale']})"
    if data_type == "USER-DEFINED":
        return row["udt_name"]
    short = {"timestamp without time zone": "timestamp", "timestamp with time zone": "timestamptz",
             "time without time zone": "time"}
    return short.get(data_type, data_type)


def _render_column(row: dict) -> str:
    """A column as "type[!] [=default]"."""
    text = _render_type(row) + ("!" if row["is_nullable"] == "NO" else "")
    if row["column_default"] is not None:
        text += " =" + _CAST.sub("", row["column_default"])
    return text


def _actual_schema(db: Database) -> dict[str, list[tuple[str, str]]]:
    """Every public table's columns, in order, read from information_schema."""
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT table_name, column_name, data_type, character_maximum_length, numeric_precision, "
            "numeric_scale, udt_name, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")
    schema: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        schema.setdefault(row["table_name"], []).append((row["column_name"], _render_column(row)))
    return schema


def _actual_indexes(db: Database) -> set[str]:
    """Every public index as "table(columns)" plus " unique" / " partial"."""
    with db.transaction() as tx:
        definitions = [row["indexdef"] for row in tx.fetchall("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")]
    indexes = set()
    for definition in definitions:
        unique, table, columns, where = _INDEX_DEF.match(definition).groups()
        indexes.add(f"{table}({columns})" + (" unique" if unique else "") + (" partial" if where else ""))
    return indexes


@pytest.fixture
def empty_dsn():
    with postgres.fresh_database(migrated=False) as dsn:
        yield dsn


@pytest.fixture
def empty_db(empty_dsn):
    db = Database.from_dsn(empty_dsn)
    yield db
    db.close()


def _history(db: Database) -> list[dict]:
    with db.transaction() as tx:
        return tx.fetchall("SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")


def _copy_migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


def _sqlstate(exc: BaseException) -> str:
    return exc.args[0]["C"]


# --- applying ------------------------------------------------------------------------------------

def test_applies_cleanly_to_an_empty_database(empty_db):
    assert apply_migrations(empty_db) == [1, 2, 3, 4]
    history = _history(empty_db)
    assert [(row["version"], row["name"]) for row in history] == [
        (1, "legacy_schema"), (2, "idempotency"), (3, "hostpay_signed_tx"), (4, "subscription_lookup_index")]
    assert all(re.fullmatch(r"[0-9a-f]{64}", row["checksum"]) for row in history)


def test_second_run_is_a_no_op(empty_db):
    apply_migrations(empty_db)
    before = _history(empty_db)
    assert apply_migrations(empty_db) == []
    assert _history(empty_db) == before


def test_up_to_stops_at_a_version_and_a_later_run_continues(empty_db):
    assert apply_migrations(empty_db, up_to=1) == [1]
    assert apply_migrations(empty_db) == [2, 3, 4]


def test_concurrent_runs_apply_each_migration_exactly_once(empty_dsn):
    barrier = threading.Barrier(4)
    results, failures = [], []

    def run():
        barrier.wait()
        try:
            results.append(apply_migrations(empty_dsn))
        except Exception as exc:  # collected so the assertion below shows it
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert sorted(version for applied in results for version in applied) == [1, 2, 3, 4]
    with Database.from_dsn(empty_dsn) as db:
        assert [row["version"] for row in _history(db)] == [1, 2, 3, 4]


def test_a_failing_migration_leaves_nothing_behind(empty_db, tmp_path):
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (id INTEGER);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE second_table (id INTEGER);\nSELECT * FROM no_such_table;")
    with pytest.raises(pg8000.dbapi.DatabaseError) as caught:
        apply_migrations(empty_db, directory=tmp_path)
    assert _sqlstate(caught.value) == "42P01"
    with empty_db.transaction() as tx:
        tables = tx.fetchvalue("SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_tables "
                               "WHERE schemaname = 'public'")
    assert tables == ["first_table", "schema_migrations"]
    assert [row["version"] for row in _history(empty_db)] == [1]


def test_an_applied_migration_that_changed_is_refused(empty_db, tmp_path):
    directory = _copy_migrations(tmp_path)
    apply_migrations(empty_db, directory=directory, up_to=1)
    legacy = directory / "0001_legacy_schema.sql"
    legacy.write_text(legacy.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0001_legacy_schema.sql changed"):
        apply_migrations(empty_db, directory=directory)
    assert [row["version"] for row in _history(empty_db)] == [1]
    assert [state.status for state in migration_status(empty_db, directory=directory)] == [
        "changed", "pending", "pending", "pending"]


@pytest.mark.parametrize("names, reason", [
    (["1_short.sql"], "NNNN_lowercase_name"),
    (["0001_Upper.sql"], "NNNN_lowercase_name"),
    (["0001_a.sql", "0001_b.sql"], "used twice"),
])
def test_badly_named_migration_files_are_refused(tmp_path, names, reason):
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=reason):
        apply_migrations("postgresql://unused@/unused", directory=tmp_path)


# --- status and command line -------------------------------------------------------------------

def test_status_reports_pending_applied_and_unknown(empty_db):
    assert [(s.version, s.status, s.applied_at) for s in migration_status(empty_db)] == [
        (1, "pending", None), (2, "pending", None), (3, "pending", None), (4, "pending", None)]
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        tx.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'future', %s)", ("0" * 64,))
    states = migration_status(empty_db)
    assert [(s.version, s.name, s.status) for s in states] == [
        (1, "legacy_schema", "applied"), (2, "idempotency", "applied"), (3, "hostpay_signed_tx", "applied"),
        (4, "subscription_lookup_index", "applied"),
        (99, "future", "unknown")]
    assert all(s.applied_at is not None for s in states)


def test_cli_applies_and_reports(empty_dsn, capsys):
    assert main(["--dsn", empty_dsn, "--status"]) == 1
    assert "0001_legacy_schema\tpending" in capsys.readouterr().out
    assert main(["--dsn", empty_dsn]) == 0
    assert capsys.readouterr().out.strip() == "applied 0001, 0002, 0003, 0004"
    assert main(["--dsn", empty_dsn]) == 0
    assert capsys.readouterr().out.strip() == "schema up to date"
    assert main(["--dsn", empty_dsn, "--status"]) == 0
    assert "0002_idempotency\tapplied" in capsys.readouterr().out


def test_cli_reads_the_database_from_the_environment(empty_dsn, monkeypatch, capsys):
    monkeypatch.delenv("CLOUD_SQL_CONNECTION_NAME", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["--status"]) == 2
    assert "DATABASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", empty_dsn)
    assert main(["--up-to", "1"]) == 0
    assert capsys.readouterr().out.strip() == "applied 0001"


def test_cli_exit_code_two_when_history_disagrees(empty_dsn, tmp_path, capsys):
    directory = _copy_migrations(tmp_path)
    assert main(["--dsn", empty_dsn, "--dir", str(directory)]) == 0
    (directory / "0002_idempotency.sql").unlink()
    assert main(["--dsn", empty_dsn, "--dir", str(directory), "--status"]) == 2
    assert "0002_idempotency\tunknown" in capsys.readouterr().out


def test_module_runs_as_a_script(empty_dsn):
    # The child finds telepay_shared and pg8000 where this process found them (Bazel runfiles included).
    env = os.environ | {"PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}
    result = subprocess.run([sys.executable, "-m", "telepay_shared.migrate", "--dsn", empty_dsn],
                            env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "applied 0001, 0002, 0003, 0004")


# --- the schema itself -------------------------------------------------------------------------

def test_legacy_migration_matches_spec_section_6(empty_db):
    apply_migrations(empty_db, up_to=1)
    assert _actual_schema(empty_db) == _expected_schema(with_idempotency=False)
    assert _actual_indexes(empty_db) == LEGACY_INDEXES


def test_idempotency_migration_changes_exactly_what_it_declares(empty_db):
    apply_migrations(empty_db)
    assert _actual_schema(empty_db) == _expected_schema(with_idempotency=True)
    assert _actual_indexes(empty_db) == LEGACY_INDEXES | IDEMPOTENCY_INDEXES


def test_currency_type_enum_values(empty_db):
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        labels = tx.fetchall("SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                             "WHERE t.typname = 'currency_type' ORDER BY e.enumsortorder")
    assert [row["enumlabel"] for row in labels] == CURRENCY_TYPE


def _insert(tx, table: str, row: dict) -> None:
    """INSERT one row given as a column -> value dict."""
    columns = ", ".join(row)
    tx.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(row))})", tuple(row.values()))


def _hostpay(unique_id: str, **overrides) -> dict:
    row = {"unique_id": unique_id, "cn_api_id": "c0ffee0123abcd", "from_currency": "ETH", "from_network": "ETH",
           "from_amount": Decimal("0.01"), "payin_address": "0xpayin"}
    return row | overrides


def _accumulation(payment_id: str | None) -> dict:
    return {"client_id": "-1003268562225", "user_id": 6271402111, "payment_amount_usd": Decimal("15.00"),
            "payment_currency": "usd", "payment_timestamp": "2025-11-15 10:00:00",
            "accumulated_amount_usdt": Decimal("14.55"), "client_wallet_address": "0xclient",
            "client_payout_currency": "usdt", "client_payout_network": "eth", "nowpayments_payment_id": payment_id}


def _conversion(cn_api_id: str | None) -> dict:
    return {"batch_conversion_id": str(uuid.uuid4()), "total_eth_usd": Decimal("20.5"),
            "threshold_at_creation": Decimal("20.00"), "cn_api_id": cn_api_id}


# Each idempotency key: (table, first row, second row repeating only that key, constraint).
DUPLICATES = [
    ("payout_accumulation", _accumulation("4479119533"), _accumulation("4479119533"),
     "payout_accumulation_nowpayments_payment_id_key"),
    ("split_payout_request", {"unique_id": "AAAAAAAAAAAAAAA1", "idempotency_key": "np:4479119533"},
     {"unique_id": "AAAAAAAAAAAAAAA2", "idempotency_key": "np:4479119533"}, "split_payout_request_idempotency_key_key"),
    ("split_payout_que", {"unique_id": "AAAAAAAAAAAAAAA1", "cn_api_id": "c0ffee0123abcd"},
     {"unique_id": "AAAAAAAAAAAAAAA2", "cn_api_id": "c0ffee0123abcd"}, "split_payout_que_cn_api_id_key"),
    ("split_payout_que", {"unique_id": "AAAAAAAAAAAAAAA1", "cn_api_id": "c0ffee0123abcd"},
     {"unique_id": "AAAAAAAAAAAAAAA1", "cn_api_id": "feed0123abcdef"}, "split_payout_que_unique_id_key"),
    ("split_payout_hostpay", _hostpay("batch_" + "0" * 36), _hostpay("batch_" + "0" * 36, cn_api_id="feed0123abcdef"),
     "split_payout_hostpay_unique_id_key"),
    ("batch_conversions", _conversion("c0ffee0123abcd"), _conversion("c0ffee0123abcd"),
     "batch_conversions_cn_api_id_key"),
]


@pytest.mark.parametrize("table, first, second, constraint", DUPLICATES, ids=[case[3] for case in DUPLICATES])
def test_each_idempotency_constraint_rejects_a_duplicate(empty_db, table, first, second, constraint):
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        _insert(tx, table, first)
    with pytest.raises(errors.DuplicateRecord) as caught:
        with empty_db.transaction() as tx:
            _insert(tx, table, second)
    assert caught.value.constraint == constraint


# Rows as the legacy writers insert them, without the new keys: numbered so they differ elsewhere.
LEGACY_ROWS = {
    "payout_accumulation": lambda n: _accumulation(None),
    "split_payout_request": lambda n: {"unique_id": f"LEGACYLEGACY000{n}", "idempotency_key": None},
    "batch_conversions": lambda n: _conversion(None),
}


@pytest.mark.parametrize("table", sorted(LEGACY_ROWS))
def test_legacy_rows_without_a_key_still_insert(empty_db, table):
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        for number in (1, 2):
            _insert(tx, table, LEGACY_ROWS[table](number))
        assert tx.fetchvalue(f"SELECT count(*) FROM {table}") == 2


WIDENED = [
    ("INSERT INTO failed_transactions (unique_id, cn_api_id, from_currency, from_network, from_amount, "
     "payin_address, error_code, last_attempt_timestamp) VALUES (%s, 'c0ffee', 'eth', 'eth', 1, '0x', 'E', now())",
     ("batch_" + "0" * 36,), "22001"),
    ("INSERT INTO split_payout_request (unique_id, actual_eth_amount) VALUES ('AAAAAAAAAAAAAAA1', %s)",
     (Decimal("150.000000000000000001"),), "22003"),
    ("INSERT INTO split_payout_que (unique_id, actual_eth_amount) VALUES ('AAAAAAAAAAAAAAA1', %s)",
     (Decimal("150"),), "22003"),
    ("INSERT INTO split_payout_hostpay (unique_id, cn_api_id, from_currency, from_network, payin_address, "
     "actual_eth_amount) VALUES ('u', 'c', 'ETH', 'ETH', '0x', %s)", (Decimal("150"),), "22003"),
]


@pytest.mark.parametrize("sql, params, legacy_sqlstate", WIDENED)
def test_widened_columns_take_what_legacy_refused(empty_db, sql, params, legacy_sqlstate):
    apply_migrations(empty_db, up_to=1)
    with pytest.raises(pg8000.dbapi.DatabaseError) as caught:
        with empty_db.transaction() as tx:
            tx.execute(sql, params)
    assert _sqlstate(caught.value) == legacy_sqlstate
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        assert tx.execute(sql, params) == 1


CHECKS = [
    ("INSERT INTO split_payout_request (unique_id, actual_eth_amount) VALUES ('A', -1)", "actual_eth_positive"),
    ("INSERT INTO split_payout_que (actual_eth_amount) VALUES (-1)", "actual_eth_positive_que"),
    ("INSERT INTO split_payout_hostpay (unique_id, cn_api_id, from_currency, from_network, payin_address, "
     "actual_eth_amount) VALUES ('u', 'c', 'ETH', 'ETH', '0x', -1)", "actual_eth_positive_hostpay"),
    ("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (0, 1, 1)",
     "processed_payments_payment_id_check"),
    ("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (1, 0, 1)",
     "processed_payments_user_id_check"),
    ("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_id, payout_threshold_usd) "
     "VALUES ('-1', '-2', gen_random_uuid(), -0.01)", "main_clients_database_payout_threshold_usd_check"),
]


@pytest.mark.parametrize("sql, constraint", CHECKS, ids=[case[1] for case in CHECKS])
def test_check_constraints_reject_bad_values(empty_db, sql, constraint):
    apply_migrations(empty_db)
    with pytest.raises(pg8000.dbapi.DatabaseError) as caught:
        with empty_db.transaction() as tx:
            tx.execute(sql)
    assert (_sqlstate(caught.value), caught.value.args[0].get("n")) == ("23514", constraint)


def test_foreign_keys(empty_db):
    apply_migrations(empty_db)
    with empty_db.transaction() as tx:
        owner = tx.fetchvalue("INSERT INTO registered_users DEFAULT VALUES RETURNING user_id")
        tx.execute("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_id) "
                   "VALUES ('-1003268562225', '-1003111111111', %s)", (owner,))
        tx.execute("DELETE FROM registered_users WHERE user_id = %s", (owner,))
        assert tx.fetchvalue("SELECT count(*) FROM main_clients_database") == 0
    with pytest.raises(pg8000.dbapi.DatabaseError) as caught:
        with empty_db.transaction() as tx:
            _insert(tx, "payout_accumulation", _accumulation("1") | {"batch_conversion_id": str(uuid.uuid4())})
    assert _sqlstate(caught.value) == "23503"


def test_hostpay_currency_must_be_an_uppercase_enum_value(empty_db):
    apply_migrations(empty_db)
    with pytest.raises(pg8000.dbapi.DatabaseError) as caught:
        with empty_db.transaction() as tx:
            _insert(tx, "split_payout_hostpay", _hostpay("u1", from_currency="eth"))
    assert _sqlstate(caught.value) == "22P02"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
