"""Tests of telepay_shared.db against a real PostgreSQL server (telepay_shared.testing.postgres)."""
from __future__ import annotations

import contextlib
import ssl
import sys
import threading
import time
import types
from decimal import Decimal

import pg8000.dbapi
import pytest

from telepay_shared import db as db_module
from telepay_shared import errors
from telepay_shared.config import Secret
from telepay_shared.db import Database, advisory_lock_key, parse_dsn
from telepay_shared.testing import postgres


@pytest.fixture
def dsn():
    with postgres.fresh_database() as test_dsn:
        yield test_dsn


@pytest.fixture
def open_database(dsn):
    """Factory of Database objects on the test database, all closed at teardown."""
    opened = []

    def make(**options) -> Database:
        database = Database.from_dsn(dsn, **options)
        opened.append(database)
        return database

    yield make
    for database in opened:
        database.close()


def _backend_pid(db: Database) -> int:
    with db.transaction() as tx:
        return tx.fetchvalue("SELECT pg_backend_pid()")


def _terminate_backend(db: Database, pid: int) -> None:
    """Kill a server session the way a restart or an idle-connection reaper would, and wait until it is gone."""
    with db.transaction() as tx:
        assert tx.fetchvalue("SELECT pg_terminate_backend(%s)", (pid,)) is True
    for _ in range(200):
        with db.transaction() as tx:
            if not tx.fetchvalue("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)):
                return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} did not exit")


def _insert_payment(tx, payment_id: int) -> None:
    tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s)",
               (payment_id, 6271402111, -1003268562225))


def _payment_ids(db: Database) -> list[int]:
    with db.transaction() as tx:
        return [row["payment_id"] for row in tx.fetchall("SELECT payment_id FROM processed_payments ORDER BY 1")]


def _run_in_threads(count: int, work) -> None:
    """Start `count` threads on `work` at the same moment and wait for all of them."""
    barrier = threading.Barrier(count)

    def started():
        barrier.wait()
        work()

    threads = [threading.Thread(target=started) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


# --- DSN parsing -------------------------------------------------------------------------------

def test_parse_dsn_tcp_with_percent_encoded_password_and_options():
    kwargs = parse_dsn("postgresql://alice:p%40ss%2Fw@db.internal:6543/telepay?sslmode=disable&application_name=gcsplit1")
    assert kwargs == {"user": "alice", "password": "p@ss/w", "database": "telepay", "host": "db.internal",
                      "port": 6543, "ssl_context": False, "application_name": "gcsplit1"}


@pytest.mark.parametrize("dsn, socket_path", [
    ("postgresql://bob@/telepay?host=/run/pg&port=5433", "/run/pg/.s.PGSQL.5433"),
    ("postgres://bob@%2Frun%2Fpg/telepay", "/run/pg/.s.PGSQL.5432"),
    ("postgresql://bob@/telepay", "/var/run/postgresql/.s.PGSQL.5432"),
])
def test_parse_dsn_unix_socket_directory(dsn, socket_path):
    kwargs = parse_dsn(dsn)
    assert kwargs == {"user": "bob", "database": "telepay", "unix_sock": socket_path, "ssl_context": False}


def test_parse_dsn_ipv6_host_and_query_credentials():
    kwargs = parse_dsn("postgresql://[::1]:5433/db?user=carol&password=secret")
    assert (kwargs["host"], kwargs["port"], kwargs["user"], kwargs["password"]) == ("::1", 5433, "carol", "secret")


def test_parse_dsn_sslmodes():
    assert parse_dsn("postgresql://u@h/d")["ssl_context"] is None
    assert parse_dsn("postgresql://u@h/d?sslmode=prefer")["ssl_context"] is None
    assert parse_dsn("postgresql://u@h/d?sslmode=require")["ssl_context"] is True
    verify_full = parse_dsn("postgresql://u@h/d?sslmode=verify-full")["ssl_context"]
    verify_ca = parse_dsn("postgresql://u@h/d?sslmode=verify-ca")["ssl_context"]
    assert isinstance(verify_full, ssl.SSLContext) and verify_full.check_hostname
    assert isinstance(verify_ca, ssl.SSLContext) and not verify_ca.check_hostname
    assert verify_ca.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("dsn, reason", [
    ("mysql://u@h/d", "postgresql://"),
    ("postgresql://u@h/d?connect_timeout=3", "connect_timeout"),
    ("postgresql://u@h/", "user and a database"),
    ("postgresql://h/d", "user and a database"),
    ("postgresql://u@h:99999/d", "invalid port"),
    ("postgresql://u@h:abc/d", "invalid port"),
    ("postgresql://u@h/d?sslmode=sometimes", "sslmode"),
])
def test_parse_dsn_rejections(dsn, reason):
    with pytest.raises(errors.ConfigError, match=reason):
        parse_dsn(dsn)


def test_repr_never_shows_the_password():
    db = Database.from_dsn("postgresql://alice:hunter2@db.internal:6543/telepay")
    assert "hunter2" not in repr(db) and "db.internal:6543/telepay" in repr(db)


# --- configuration -----------------------------------------------------------------------------

def test_from_env_uses_database_url(dsn):
    db = Database.from_env({"DATABASE_URL": f"  {dsn}  "})
    try:
        with db.transaction() as tx:
            assert tx.fetchvalue("SELECT current_database()") == dsn.split("/")[3].split("?")[0]
    finally:
        db.close()


def test_from_env_without_any_database_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="CLOUD_SQL_CONNECTION_NAME or DATABASE_URL"):
        Database.from_env({"DATABASE_URL": "   "})


def test_from_env_cloud_sql_requires_the_three_database_values():
    source = {"CLOUD_SQL_CONNECTION_NAME": "proj:us-central1:inst", "DATABASE_USER_SECRET": "telepay",
              "DATABASE_PASSWORD_SECRET": "hunter2"}
    with pytest.raises(errors.ConfigError) as caught:
        Database.from_env(source)
    assert "DATABASE_NAME_SECRET" in str(caught.value) and "hunter2" not in str(caught.value)


class _FakeCloudSqlConnector:
    """Stands in for google.cloud.sql.connector.Connector, connecting to the test server instead."""

    created: list[_FakeCloudSqlConnector] = []
    target_dsn = ""

    def __init__(self, **options):
        self.options = options
        self.calls = []
        self.closed = False
        self.created.append(self)

    def connect(self, instance, driver, **kwargs):
        self.calls.append((instance, driver, kwargs))
        return pg8000.dbapi.connect(**parse_dsn(self.target_dsn))

    def close(self):
        self.closed = True


def test_cloud_sql_path_uses_one_lazily_created_connector(dsn, monkeypatch):
    fake_module = types.ModuleType("google.cloud.sql.connector")
    fake_module.Connector = _FakeCloudSqlConnector
    monkeypatch.setitem(sys.modules, "google.cloud.sql.connector", fake_module)
    monkeypatch.setattr(_FakeCloudSqlConnector, "created", [])
    monkeypatch.setattr(_FakeCloudSqlConnector, "target_dsn", dsn)
    db = Database.from_env({"CLOUD_SQL_CONNECTION_NAME": "proj:us-central1:inst", "DATABASE_URL": "ignored",
                            "DATABASE_NAME_SECRET": "telepaydb", "DATABASE_USER_SECRET": "telepay",
                            "DATABASE_PASSWORD_SECRET": Secret("DATABASE_PASSWORD_SECRET", "hunter2"),
                            "CLOUD_SQL_IP_TYPE": "private"})
    assert _FakeCloudSqlConnector.created == []
    with db.transaction() as outer, db.transaction() as inner:
        assert outer.fetchvalue("SELECT 1") == inner.fetchvalue("SELECT 2") - 1
    (connector,) = _FakeCloudSqlConnector.created
    assert connector.options == {"ip_type": "private", "refresh_strategy": "lazy"}
    expected_call = ("proj:us-central1:inst", "pg8000",
                     {"user": "telepay", "password": "hunter2", "db": "telepaydb", "timeout": 30})
    assert connector.calls == [expected_call, expected_call]
    db.close()
    assert connector.closed


# --- pool ----------------------------------------------------------------------------------------

def test_sequential_transactions_reuse_one_connection(open_database):
    db = open_database()
    assert _backend_pid(db) == _backend_pid(db)
    assert db.stats() == {"open": 1, "idle": 1, "in_use": 0, "max_size": 4}


def test_sessions_run_in_utc_with_the_statement_timeout(open_database):
    db = open_database(statement_timeout_s=1.5)
    with db.transaction() as tx:
        assert tx.fetchvalue("SHOW TimeZone") == "UTC"
        assert tx.fetchvalue("SHOW statement_timeout") == "1500ms"


def test_pool_never_holds_more_than_max_size_connections(open_database):
    db = open_database(max_size=2, acquire_timeout_s=10)
    seen = []

    def work():
        with db.transaction() as tx:
            sessions = tx.fetchvalue("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            seen.append((tx.fetchvalue("SELECT pg_backend_pid()"), sessions, db.stats()["open"]))
            time.sleep(0.05)

    _run_in_threads(8, work)
    assert len(seen) == 8
    assert len({pid for pid, _, _ in seen}) == 2
    assert max(sessions for _, sessions, _ in seen) <= 2
    assert max(pool_open for _, _, pool_open in seen) == 2


def test_exhausted_pool_times_out_with_database_unavailable(open_database):
    db = open_database(max_size=1, acquire_timeout_s=0.3)
    with db.transaction():
        started = time.monotonic()
        with pytest.raises(errors.DatabaseUnavailable, match="no free database connection"):
            with db.transaction():
                pass
        waited = time.monotonic() - started
    assert 0.3 <= waited < 3
    assert _backend_pid(db) > 0


def test_waiting_transaction_gets_the_connection_another_thread_releases(open_database):
    db = open_database(max_size=1, acquire_timeout_s=5)
    holding = threading.Event()
    holder_done = []

    def hold():
        with db.transaction():
            holding.set()
            time.sleep(0.2)
            holder_done.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    with db.transaction() as tx:
        acquired_at = time.monotonic()
        assert tx.fetchvalue("SELECT 1") == 1
    holder.join(5)
    assert acquired_at >= holder_done[0]
    assert db.stats()["open"] == 1


def test_broken_connection_is_discarded_and_replaced(open_database):
    db = open_database(validate_after_s=None)
    old_pid = _backend_pid(db)
    _terminate_backend(open_database(), old_pid)
    with pytest.raises(errors.DatabaseUnavailable):
        with db.transaction() as tx:
            tx.fetchvalue("SELECT 1")
    assert db.stats()["open"] == 0
    assert _backend_pid(db) != old_pid


def test_idle_connection_is_checked_and_silently_replaced_when_dead(open_database):
    db = open_database(validate_after_s=0)
    old_pid = _backend_pid(db)
    _terminate_backend(open_database(), old_pid)
    assert _backend_pid(db) != old_pid
    assert db.stats()["open"] == 1


def test_closed_database_refuses_transactions_and_closes_busy_connections(open_database):
    db = open_database()
    with db.transaction() as tx:
        db.close()
        assert tx.fetchvalue("SELECT 1") == 1
    assert db.stats()["open"] == 0
    with pytest.raises(errors.DatabaseUnavailable, match="closed"):
        with db.transaction():
            pass


def test_database_unavailable_when_the_server_is_down():
    with postgres.postgres_server() as server:
        databases = [Database.from_dsn(server.dsn(), validate_after_s=None),
                     Database.from_dsn(server.tcp_dsn(), validate_after_s=None)]
        for db in databases:
            assert _backend_pid(db) > 0
        server.stop()
        for db in databases:
            with pytest.raises(errors.DatabaseUnavailable, match="connection lost"):
                _backend_pid(db)
            with pytest.raises(errors.DatabaseUnavailable, match="cannot connect"):
                _backend_pid(db)
            assert db.stats()["open"] == 0
            db.close()


def test_connect_refusal_is_database_unavailable_with_the_server_reason():
    db = Database.from_dsn(postgres.shared_server().dsn("no_such_database"))
    with pytest.raises(errors.DatabaseUnavailable, match="cannot connect") as caught:
        _backend_pid(db)
    # pg8000 sometimes reports the server's FATAL error, sometimes only the closed socket after it.
    server_reported = isinstance(caught.value.__cause__, pg8000.dbapi.DatabaseError)
    assert caught.value.details["sqlstate"] == ("3D000" if server_reported else None)
    assert db.stats()["open"] == 0


def test_ping_says_whether_the_database_answers(open_database):
    db = open_database()
    assert db.ping() is True
    assert db.stats()["in_use"] == 0
    missing = Database.from_dsn(postgres.shared_server().dsn("no_such_database"))
    assert missing.ping() is False
    missing.close()
    db.close()
    assert db.ping() is False


# --- transactions --------------------------------------------------------------------------------

def test_transaction_commits_when_the_block_ends(open_database):
    db = open_database()
    with db.transaction() as tx:
        tx.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) VALUES (%s, %s, %s) "
                   "RETURNING payment_id, gcwebhook1_processed", (5, 6271402111, -1003268562225))
        assert tx.fetchone() == {"payment_id": 5, "gcwebhook1_processed": False}
        _insert_payment(tx, 6)
    assert _payment_ids(db) == [5, 6]


def test_transaction_rolls_back_when_the_block_raises(open_database):
    db = open_database()
    with pytest.raises(ValueError, match="boom"):
        with db.transaction() as tx:
            _insert_payment(tx, 5)
            raise ValueError("boom")
    assert _payment_ids(db) == []
    assert db.stats()["open"] == 1


def test_unique_violation_is_duplicate_record_naming_the_constraint(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 7)
    with pytest.raises(errors.DuplicateRecord) as caught:
        with db.transaction() as tx:
            _insert_payment(tx, 7)
    assert caught.value.constraint == "processed_payments_pkey"
    assert caught.value.details["table"] == "processed_payments"
    assert isinstance(caught.value, errors.Conflict) and caught.value.http_status == 409


def test_commit_is_refused_after_a_swallowed_failure(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 7)
    with pytest.raises(RuntimeError, match="savepoint"):
        with db.transaction() as tx:
            _insert_payment(tx, 8)
            with contextlib.suppress(errors.DuplicateRecord):
                _insert_payment(tx, 7)
    assert _payment_ids(db) == [7]


def test_savepoint_undoes_only_the_failed_block(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 7)
    with db.transaction() as tx:
        _insert_payment(tx, 8)
        with pytest.raises(errors.DuplicateRecord):
            with tx.savepoint():
                _insert_payment(tx, 9)
                _insert_payment(tx, 7)
        with tx.savepoint():
            _insert_payment(tx, 10)
    assert _payment_ids(db) == [7, 8, 10]


# --- prepared statements -----------------------------------------------------------------------

def _prepared_on_server(tx) -> list[str]:
    """The statements the session holds prepared (protocol-level ones are named pg8000_statement_N)."""
    return [row["statement"] for row in tx.fetchall("SELECT statement FROM pg_prepared_statements ORDER BY 1")]


def test_a_statement_with_parameters_is_prepared_once_per_connection_and_reused(open_database):
    db = open_database()
    for payment_id in (11, 12, 13):
        with db.transaction() as tx:
            _insert_payment(tx, payment_id)
            assert tx.fetchvalue("SELECT count(*) FROM processed_payments WHERE payment_id <= %s", (payment_id,)) \
                == payment_id - 10
    with db.transaction() as tx:
        prepared = _prepared_on_server(tx)
    assert len(prepared) == 2  # the INSERT and the SELECT, once each for three runs
    assert any(text.startswith("INSERT INTO processed_payments") for text in prepared)
    assert _payment_ids(db) == [11, 12, 13]


def test_prepared_and_unnamed_runs_give_the_same_rows_counts_and_columns(open_database):
    db = open_database()
    with db.transaction() as tx:
        for payment_id in (21, 22, 23):
            _insert_payment(tx, payment_id)
    statements = [
        ("UPDATE processed_payments SET gcwebhook1_processed = %s WHERE payment_id >= %s", (True, 22)),
        ("SELECT payment_id, gcwebhook1_processed, %s::numeric AS amount, %s::text AS nothing "
         "FROM processed_payments WHERE payment_id > %s ORDER BY 1", (Decimal("12.34567890"), None, 20)),
        ("SELECT payment_id FROM processed_payments WHERE payment_id = %s", (999,)),
        ("DELETE FROM processed_payments WHERE payment_id = %s", (21,)),
    ]
    seen = []
    for sql, params in statements:
        with db.transaction() as tx:
            touched = tx.execute(sql, params)
            seen.append((touched, tx._cursor.description and [c[0] for c in tx._cursor.description],
                         tx.fetchall() if tx._cursor.description else None))
    with db.transaction() as tx:  # the reference: pg8000's own unnamed execution, on a fresh state
        tx.execute("TRUNCATE processed_payments")
        for payment_id in (21, 22, 23):
            tx._cursor.execute("INSERT INTO processed_payments (payment_id, user_id, channel_id) "
                               "VALUES (%s, %s, %s)", (payment_id, 6271402111, -1003268562225))
    for (sql, params), prepared in zip(statements, seen):
        with db.transaction() as tx:
            tx._cursor.execute(sql, params)
            unnamed = (tx._cursor.rowcount, tx._cursor.description and [c[0] for c in tx._cursor.description],
                       tx.fetchall() if tx._cursor.description else None)
        assert prepared == unnamed
    assert seen[0][0] == 2 and seen[3][0] == 1
    assert seen[1][2][0] == {"payment_id": 21, "gcwebhook1_processed": False, "amount": Decimal("12.34567890"),
                             "nothing": None}
    assert seen[2][2] == []


def test_a_prepared_statement_runs_inside_the_transaction_and_rolls_back_with_it(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 31)  # prepared now
    with pytest.raises(ValueError, match="undo"):
        with db.transaction() as tx:
            _insert_payment(tx, 32)  # the prepared statement, first in its transaction
            assert tx.fetchvalue("SELECT count(*) FROM processed_payments WHERE payment_id > %s", (0,)) == 2
            raise ValueError("undo")
    assert _payment_ids(db) == [31]


def test_a_prepared_statement_that_failed_runs_again_after_the_rollback(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 41)
    with db.transaction() as tx:
        with pytest.raises(errors.DuplicateRecord):
            with tx.savepoint():
                _insert_payment(tx, 41)
        _insert_payment(tx, 42)
    assert _payment_ids(db) == [41, 42]


def test_beyond_the_cap_statements_run_unnamed(open_database, monkeypatch):
    monkeypatch.setattr(db_module, "MAX_PREPARED_PER_CONNECTION", 1)
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 51)
        assert tx.fetchvalue("SELECT payment_id FROM processed_payments WHERE payment_id = %s", (51,)) == 51
        assert tx.fetchvalue("SELECT count(*) FROM processed_payments WHERE payment_id > %s", (50,)) == 1
        assert len(_prepared_on_server(tx)) == 1


def test_fetchall_returns_rows_as_dicts_in_order(open_database):
    db = open_database()
    with db.transaction() as tx:
        rows = tx.fetchall("SELECT n, n * 2 AS twice FROM generate_series(1, 3) AS n")
        assert tx.fetchvalue("SELECT NULL::int WHERE false") is None
    assert rows == [{"n": 1, "twice": 2}, {"n": 2, "twice": 4}, {"n": 3, "twice": 6}]


# --- locks and timeouts --------------------------------------------------------------------------

def test_advisory_lock_excludes_a_second_holder_until_commit(open_database):
    db = open_database()
    with db.transaction() as holder:
        holder.advisory_lock("microbatch")
        with db.transaction() as other:
            assert other.try_advisory_lock("microbatch") is False
            assert other.try_advisory_lock("batch-processor") is True
    with db.transaction() as later:
        assert later.try_advisory_lock("microbatch") is True


def test_advisory_lock_waits_until_the_holder_finishes(open_database):
    db = open_database()
    acquired_at = []

    def second_holder():
        with db.transaction() as tx:
            tx.advisory_lock(4479119533)
            acquired_at.append(time.monotonic())

    with db.transaction() as tx:
        tx.advisory_lock(4479119533)
        waiter = threading.Thread(target=second_holder)
        waiter.start()
        time.sleep(0.3)
        assert acquired_at == []
        released_at = time.monotonic()
    waiter.join(5)
    assert len(acquired_at) == 1 and acquired_at[0] >= released_at


def test_lock_wait_beyond_the_statement_timeout_is_transient(open_database):
    db = open_database(statement_timeout_s=0.2)
    with db.transaction() as holder:
        holder.advisory_lock("payout")
        with pytest.raises(errors.TransientError) as caught:
            with db.transaction() as other:
                other.advisory_lock("payout")
    assert caught.value.details["sqlstate"] == "57014"
    assert not isinstance(caught.value, errors.DatabaseUnavailable)
    assert db.stats()["open"] == 2


def test_row_locked_for_update_makes_a_nowait_reader_transient(open_database):
    db = open_database()
    with db.transaction() as tx:
        _insert_payment(tx, 7)
    select = "SELECT payment_id FROM processed_payments WHERE payment_id = %s FOR UPDATE"
    with db.transaction() as holder:
        assert holder.fetchone(select, (7,)) == {"payment_id": 7}
        with pytest.raises(errors.TransientError) as caught:
            with db.transaction() as other:
                other.fetchone(select + " NOWAIT", (7,))
    assert caught.value.details["sqlstate"] == "55P03"


def test_advisory_lock_key():
    assert advisory_lock_key(42) == 42 and advisory_lock_key(-(2**63)) == -(2**63)
    named = advisory_lock_key("microbatch")
    assert named == advisory_lock_key("microbatch") and -(2**63) <= named < 2**63
    assert named != advisory_lock_key("microbatch ")
    with pytest.raises(ValueError):
        advisory_lock_key(2**63)
    with pytest.raises(TypeError):
        advisory_lock_key(True)
    with pytest.raises(TypeError):
        advisory_lock_key(1.5)


# --- money ---------------------------------------------------------------------------------------

def test_numeric_columns_round_trip_decimals_exactly(open_database):
    db = open_database()
    actual_eth = Decimal("123.123456789012345678")
    with db.transaction() as tx:
        tx.execute("INSERT INTO split_payout_hostpay (unique_id, cn_api_id, from_currency, from_network, "
                   "from_amount, payin_address, actual_eth_amount) VALUES (%s, %s, 'ETH', 'ETH', %s, %s, %s)",
                   ("ABCDEF0123456789", "c0ffee0123abcd", Decimal("0.12345678"), "0xpayin", actual_eth))
    with db.transaction() as tx:
        row = tx.fetchone("SELECT from_amount, actual_eth_amount FROM split_payout_hostpay")
        tiny = tx.fetchvalue("SELECT %s::numeric(30,18)", (Decimal("1E-18"),))
        cents = tx.fetchvalue("SELECT %s::numeric(10,2)", (Decimal("12.345"),))
    assert row == {"from_amount": Decimal("0.12345678"), "actual_eth_amount": actual_eth}
    assert all(type(value) is Decimal for value in (*row.values(), tiny, cents))
    assert tiny == Decimal("0.000000000000000001") and cents == Decimal("12.35")


@pytest.mark.parametrize("params", [(0.1,), ([Decimal("1"), 0.5],)])
def test_float_parameters_are_refused(open_database, params):
    db = open_database()
    with pytest.raises(TypeError, match="Decimal"):
        with db.transaction() as tx:
            tx.execute("SELECT %s", params)


def test_mapping_parameters_are_refused(open_database):
    db = open_database()
    with pytest.raises(TypeError, match="sequence"):
        with db.transaction() as tx:
            tx.execute("SELECT %(amount)s", {"amount": Decimal("1")})


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
