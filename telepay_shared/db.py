"""PostgreSQL access for every service: one bounded connection pool and explicit transactions.

Legacy opened a new connection (GCHostPay1/3: a new Cloud SQL Connector) for every query and
swallowed errors into None/0/[] (spec §11 item 30). Here a process keeps one connector and a
small pool, every statement runs inside ``with db.transaction() as tx:``, and failures surface
as typed errors: a unique violation is ``DuplicateRecord`` (permanent, carries the constraint
name), an unreachable server or an exhausted pool is ``DatabaseUnavailable`` (transient, so Cloud
Tasks retries), a deadlock, serialization failure, lock wait or statement timeout is a plain
``TransientError``. Anything else (a bad SQL statement) propagates unchanged: it is a bug.

Production connects through the Cloud SQL Python Connector (PyPI: cloud-sql-python-connector,
imported only on that path) when CLOUD_SQL_CONNECTION_NAME is set; everything else uses a DSN
(``postgresql://user:pass@host:port/db`` or ``postgresql://user@/db?host=/socket/dir``).

SQL uses pg8000's ``%s`` placeholders with a sequence of parameters. NUMERIC columns come back
as ``Decimal``; ``float`` parameters are refused so money never passes through binary floating
point. Sessions run with TimeZone UTC and a server-side statement timeout.
"""
from __future__ import annotations

import hashlib
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

import pg8000.dbapi
from pg8000.converters import make_params
from pg8000.exceptions import InterfaceError

from telepay_shared import errors

DEFAULT_MAX_SIZE = 4
DEFAULT_ACQUIRE_TIMEOUT_S = 10.0
# Below Cloud Run's 60 s request timeout, so a stuck statement fails the request cleanly.
DEFAULT_STATEMENT_TIMEOUT_S = 25.0
DEFAULT_VALIDATE_AFTER_S = 30.0
DEFAULT_UNIX_SOCKET_DIR = "/var/run/postgresql"
# The client's socket timeout trails the server's statement timeout, so the server cancels first
# and the connection stays usable.
_SOCKET_TIMEOUT_MARGIN_S = 5.0

UNIQUE_VIOLATION = "23505"
# Connection exceptions (class 08), shutdowns and "too many connections": the session is gone.
_CONNECTION_LOST_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})
_DSN_OPTIONS = frozenset({"host", "port", "user", "password", "dbname", "sslmode", "application_name"})
_PLAIN_SSLMODES = frozenset({"disable"})
_OPPORTUNISTIC_SSLMODES = frozenset({"allow", "prefer"})

Row = dict[str, Any]
# Statements with parameters run as named prepared statements, kept per connection up to this many
# (the services' SQL is a fixed set of a few dozen); beyond, a statement runs unnamed, as before.
MAX_PREPARED_PER_CONNECTION = 256


def parse_dsn(dsn: str) -> dict[str, Any]:
    """Turn a postgresql:// DSN into pg8000.dbapi.connect keyword arguments."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise errors.ConfigError("database DSN must start with postgresql://")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - _DSN_OPTIONS)
    if unknown:
        raise errors.ConfigError(f"unsupported database DSN options: {', '.join(unknown)}")
    user = options.get("user") or unquote(parts.username or "")
    database = options.get("dbname") or unquote(parts.path.lstrip("/"))
    if not user or not database:
        raise errors.ConfigError("database DSN must name a user and a database")
    kwargs: dict[str, Any] = {"user": user, "database": database}
    password = options.get("password") or (unquote(parts.password) if parts.password is not None else None)
    if password is not None:
        kwargs["password"] = password
    if options.get("application_name"):
        kwargs["application_name"] = options["application_name"]
    host, port = _dsn_host_port(parts, options)
    if host.startswith("/"):
        kwargs["unix_sock"] = f"{host}/.s.PGSQL.{port}"
        kwargs["ssl_context"] = False
    else:
        kwargs.update(host=host, port=port, ssl_context=_ssl_context(options.get("sslmode")))
    return kwargs


def _dsn_host_port(parts, options: Mapping[str, str]) -> tuple[str, int]:
    """Host (or socket directory) and port of a DSN; a query parameter wins over the authority."""
    try:
        port = int(options.get("port") or parts.port or 5432)
    except ValueError:
        raise errors.ConfigError("database DSN has an invalid port") from None
    host = parts.netloc.rpartition("@")[2]
    if parts.port is not None:
        host = host[: host.rfind(":")]
    host = options.get("host") or unquote(host).strip("[]")
    return host or DEFAULT_UNIX_SOCKET_DIR, port


def _ssl_context(sslmode: str | None):
    """pg8000's ssl_context for a libpq sslmode (None means try TLS and fall back to plain)."""
    if sslmode is None or sslmode in _OPPORTUNISTIC_SSLMODES:
        return None
    if sslmode in _PLAIN_SSLMODES:
        return False
    if sslmode == "require":
        return True
    if sslmode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context()
        context.check_hostname = sslmode == "verify-full"
        return context
    raise errors.ConfigError(f"unsupported sslmode {sslmode!r}")


def _socket_timeout(statement_timeout_s: float | None) -> float | None:
    """Client socket timeout that matches a server statement timeout (None: wait forever)."""
    return None if statement_timeout_s is None else statement_timeout_s + _SOCKET_TIMEOUT_MARGIN_S


class DsnConnector:
    """Opens pg8000 connections to the server a DSN names."""

    def __init__(self, dsn: str, socket_timeout_s: float | None = None):
        self._kwargs = parse_dsn(dsn)
        self._socket_timeout_s = socket_timeout_s

    def __call__(self):
        """Open one new connection."""
        return pg8000.dbapi.connect(**self._kwargs, timeout=self._socket_timeout_s)

    def close(self) -> None:
        """Nothing to release: each connection is closed by the pool."""

    def __repr__(self) -> str:
        where = self._kwargs.get("unix_sock") or f"{self._kwargs['host']}:{self._kwargs['port']}"
        return f"DsnConnector({where}/{self._kwargs['database']})"


class CloudSqlConnector:
    """Opens pg8000 connections through ONE Cloud SQL Python Connector per process (legacy made one per query)."""

    def __init__(self, instance_connection_name: str, *, user: str, password: str, database: str,
                 ip_type: str = "public", socket_timeout_s: float | None = None):
        self.instance_connection_name = instance_connection_name
        self._credentials = {"user": user, "password": password, "db": database}
        self._ip_type = ip_type
        self._socket_timeout_s = socket_timeout_s
        self._lock = threading.Lock()
        self._connector = None
        self._pid = os.getpid()

    def _cloud_connector(self):
        """The process's Connector, created on first use (its event-loop thread does not survive a fork)."""
        with self._lock:
            if self._connector is None or self._pid != os.getpid():
                # Imported here so that tests and DSN deployments never need the package.
                from google.cloud.sql.connector import Connector

                # "lazy" refreshes certificates on demand: Cloud Run throttles idle CPU, which
                # starves the default background refresh.
                self._connector = Connector(ip_type=self._ip_type, refresh_strategy="lazy")
                self._pid = os.getpid()
            return self._connector

    def __call__(self):
        """Open one new connection."""
        options = dict(self._credentials)
        if self._socket_timeout_s is not None:
            options["timeout"] = math.ceil(self._socket_timeout_s)
        return self._cloud_connector().connect(self.instance_connection_name, "pg8000", **options)

    def close(self) -> None:
        """Stop the Connector's background work."""
        with self._lock:
            connector, self._connector = self._connector, None
        if connector is not None:
            connector.close()

    def __repr__(self) -> str:
        return f"CloudSqlConnector({self.instance_connection_name}/{self._credentials['db']})"


def _setting(source: Any, name: str) -> str | None:
    """One stripped setting from os.environ, a mapping or a telepay_shared.config.Config; empty is missing."""
    value = source.get(name)
    if value is None:
        return None
    text = (value.reveal() if hasattr(value, "reveal") else str(value)).strip()
    return text or None


def connector_from_env(source: Any, socket_timeout_s: float | None) -> DsnConnector | CloudSqlConnector:
    """The connector the configuration asks for: Cloud SQL when CLOUD_SQL_CONNECTION_NAME is set, else DATABASE_URL."""
    instance = _setting(source, "CLOUD_SQL_CONNECTION_NAME")
    if instance:
        # Legacy names: these "_SECRET" variables hold the values themselves (spec §1).
        names = ("DATABASE_NAME_SECRET", "DATABASE_USER_SECRET", "DATABASE_PASSWORD_SECRET")
        values = {name: _setting(source, name) for name in names}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise errors.ConfigError(f"CLOUD_SQL_CONNECTION_NAME is set but {', '.join(missing)} missing")
        return CloudSqlConnector(
            instance, database=values[names[0]], user=values[names[1]], password=values[names[2]],
            ip_type=_setting(source, "CLOUD_SQL_IP_TYPE") or "public", socket_timeout_s=socket_timeout_s)
    dsn = _setting(source, "DATABASE_URL")
    if dsn is None:
        raise errors.ConfigError("no database configured: set CLOUD_SQL_CONNECTION_NAME or DATABASE_URL")
    return DsnConnector(dsn, socket_timeout_s=socket_timeout_s)


def advisory_lock_key(key: int | str) -> int:
    """PostgreSQL's signed 64-bit advisory-lock key for a lock name (stable across processes and versions)."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError("advisory lock key must be an int or a str")
    if isinstance(key, int):
        if not -(2**63) <= key < 2**63:
            raise ValueError("advisory lock key must fit in a signed 64-bit integer")
        return key
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big", signed=True)


def _error_fields(exc: BaseException) -> dict[str, str]:
    """The server's error fields (C = SQLSTATE, M = message, n = constraint) of a pg8000 error."""
    if exc.args and isinstance(exc.args[0], dict):
        return exc.args[0]
    return {}


def translate_error(exc: BaseException) -> BaseException:
    """The pipeline's typed error for a pg8000 error, or the error itself when it is a bug."""
    # pg8000 lets some socket errors (a reset, a read timeout) escape unwrapped as OSError.
    if isinstance(exc, (InterfaceError, OSError)):
        return errors.DatabaseUnavailable("database connection lost", cause=str(exc))
    fields = _error_fields(exc)
    sqlstate = fields.get("C", "")
    message = fields.get("M", "database error")
    if sqlstate == UNIQUE_VIOLATION:
        return errors.DuplicateRecord(message, constraint=fields.get("n"), table=fields.get("t"))
    if sqlstate.startswith(_CONNECTION_LOST_SQLSTATES):
        return errors.DatabaseUnavailable(message, sqlstate=sqlstate)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return errors.TransientError(message, sqlstate=sqlstate)
    return exc


def _check_params(params: Sequence[Any]) -> None:
    """Refuse parameters that would silently lose money precision or use the wrong placeholder style."""
    if isinstance(params, (Mapping, str, bytes)):
        raise TypeError("SQL parameters must be a sequence matching %s placeholders")
    for value in params:
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(item, float) for item in items):
            raise TypeError("float SQL parameter refused: pass amounts and rates as decimal.Decimal")


class Transaction:
    """One open transaction on one pooled connection; statements run in order."""

    def __init__(self, connection):
        self._connection = connection
        self._cursor = connection.cursor()
        self._failure: BaseException | None = None
        self._savepoints = 0
        self.connection_lost = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement (or, without parameters, a script) and return the rows it touched."""
        _check_params(params)
        try:
            if params:
                _execute_prepared(self._connection, self._cursor, sql, params)
            else:
                self._cursor.execute(sql)
        except Exception as exc:
            self._fail(exc)
        return self._cursor.rowcount

    def fetchone(self, sql: str | None = None, params: Sequence[Any] = ()) -> Row | None:
        """The next row (of `sql`, when given, else of the last statement) as a dict, or None."""
        if sql is not None:
            self.execute(sql, params)
        row = self._cursor.fetchone()
        return None if row is None else self._as_dict(row)

    def fetchall(self, sql: str | None = None, params: Sequence[Any] = ()) -> list[Row]:
        """The remaining rows (of `sql`, when given, else of the last statement) as dicts."""
        if sql is not None:
            self.execute(sql, params)
        return [self._as_dict(row) for row in self._cursor.fetchall()]

    def fetchvalue(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None when there is no row."""
        self.execute(sql, params)
        row = self._cursor.fetchone()
        return None if row is None else row[0]

    def advisory_lock(self, key: int | str) -> None:
        """Wait for a transaction-scoped advisory lock; it is released at commit or rollback."""
        self.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (advisory_lock_key(key),))

    def try_advisory_lock(self, key: int | str) -> bool:
        """Take a transaction-scoped advisory lock if it is free; False when another session holds it."""
        return bool(self.fetchvalue("SELECT pg_try_advisory_xact_lock(%s::bigint)", (advisory_lock_key(key),)))

    @contextmanager
    def savepoint(self) -> Iterator[Transaction]:
        """Let a block fail (e.g. a duplicate INSERT) and undo only its own work, keeping the transaction usable."""
        self._savepoints += 1
        name = f"telepay_savepoint_{self._savepoints}"
        self.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            if not self.connection_lost:
                self._failure = None
                self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            raise
        self.execute(f"RELEASE SAVEPOINT {name}")

    def _as_dict(self, row: Sequence[Any]) -> Row:
        """A result row keyed by column name."""
        return {column[0]: value for column, value in zip(self._cursor.description, row)}

    def _commit(self) -> None:
        """Commit, refusing when a failed statement already doomed the transaction."""
        if self._failure is not None:
            # PostgreSQL answers COMMIT of an aborted transaction with a silent ROLLBACK.
            raise RuntimeError("transaction aborted by an earlier failed statement; "
                               "wrap statements that may fail in tx.savepoint()") from self._failure
        try:
            self._connection.commit()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> NoReturn:
        """Remember that the transaction failed (and whether the connection died) and raise the typed error."""
        typed = translate_error(exc)
        self._failure = typed
        self.connection_lost = isinstance(typed, errors.DatabaseUnavailable)
        if typed is exc:
            raise exc
        raise typed from exc


def _execute_prepared(connection, cursor, sql: str, params: Sequence[Any]) -> None:
    """cursor.execute(sql, params), through a named prepared statement the connection keeps.

    pg8000 runs a statement with parameters unnamed: parse, describe, then bind and execute, three
    round trips to the server and a parse and plan every time. Prepared once per connection, each
    later run is one round trip (bind, execute, sync), and the server reuses the parsed statement.
    The parameters are sent exactly as unnamed execution sends them (pg8000's make_params, types
    inferred by the server), and the results land where the cursor's own execute puts them, so
    rowcount, description and fetch* read them unchanged. This uses pg8000's lower layer
    (prepare_statement, execute_named: what its own PreparedStatement is built on); db_test pins the
    behaviour to the unnamed path's.
    """
    statement, values = pg8000.dbapi.convert_paramstyle("format", sql, params)  # the module docstring's %s
    prepared = connection.__dict__.setdefault("_telepay_prepared", {})
    known = prepared.get(statement)
    if known is None and len(prepared) >= MAX_PREPARED_PER_CONNECTION:
        cursor.execute(sql, params)
        return
    if not connection._in_transaction and not connection.autocommit:
        connection.execute_simple("begin transaction")  # as the cursor's execute begins one
    if known is None:
        known = prepared[statement] = connection.prepare_statement(statement, ())
    name, columns, input_funcs = known
    context = connection.execute_named(name, make_params(connection.py_types, values), columns, input_funcs,
                                       statement)
    cursor._context = context
    cursor._row_iter = None if context.rows is None else iter(context.rows)


@dataclass
class _IdleConnection:
    connection: Any
    returned_at: float


class _Pool:
    """A bounded, thread-safe set of open connections, reused most-recent first."""

    def __init__(self, connector: Callable[[], Any], *, max_size: int, acquire_timeout_s: float,
                 validate_after_s: float | None, prepare: Callable[[Any], None]):
        if max_size < 1:
            raise ValueError("pool max_size must be at least 1")
        self._connector = connector
        self._max_size = max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._validate_after_s = validate_after_s
        self._prepare = prepare
        self._available = threading.Condition()
        self._idle: list[_IdleConnection] = []
        self._open = 0
        self._closed = False
        self._pid = os.getpid()

    def acquire(self):
        """A healthy connection: an idle one, a new one while under the bound, else wait until the deadline."""
        deadline = time.monotonic() + self._acquire_timeout_s
        while True:
            idle = self._reserve(deadline)
            if idle is None:
                return self._open_new()
            if self._still_alive(idle):
                return idle.connection
            self.release(idle.connection, broken=True)

    def release(self, connection, *, broken: bool) -> None:
        """Return a connection to the pool, or close it when it is broken or the pool is closed."""
        with self._available:
            keep = not broken and not self._closed and self._pid == os.getpid()
            if keep:
                self._idle.append(_IdleConnection(connection, time.monotonic()))
            else:
                self._open -= 1
            self._available.notify()
        if not keep:
            _close_quietly(connection)

    def close(self) -> None:
        """Close idle connections now and busy ones when they come back."""
        with self._available:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._available.notify_all()
        for entry in idle:
            _close_quietly(entry.connection)

    def stats(self) -> dict[str, int]:
        """Open, idle and busy connection counts and the bound."""
        with self._available:
            return {"open": self._open, "idle": len(self._idle), "in_use": self._open - len(self._idle),
                    "max_size": self._max_size}

    def _reserve(self, deadline: float) -> _IdleConnection | None:
        """Take an idle connection, or a slot for a new one (None), waiting while the pool is full."""
        with self._available:
            self._forget_parent_connections()
            while True:
                if self._closed:
                    raise errors.DatabaseUnavailable("database pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max_size:
                    self._open += 1
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.DatabaseUnavailable(
                        f"no free database connection within {self._acquire_timeout_s} s",
                        max_size=self._max_size)
                self._available.wait(remaining)

    def _forget_parent_connections(self) -> None:
        """After a fork the parent's sockets are not ours to use or close."""
        if self._pid != os.getpid():
            self._pid, self._idle, self._open = os.getpid(), [], 0

    def _open_new(self):
        """Open and prepare a connection for a reserved slot, giving the slot back on failure."""
        connection = None
        try:
            connection = self._connector()
            self._prepare(connection)
            return connection
        except Exception as exc:
            with self._available:
                self._open -= 1
                self._available.notify()
            if connection is not None:
                _close_quietly(connection)
            if isinstance(exc, errors.TelePayError):
                raise
            raise errors.DatabaseUnavailable("cannot connect to the database", cause=type(exc).__name__,
                                             sqlstate=_error_fields(exc).get("C")) from exc

    def _still_alive(self, idle: _IdleConnection) -> bool:
        """Ping a connection that sat idle long enough for the server or a proxy to have dropped it."""
        if self._validate_after_s is None or time.monotonic() - idle.returned_at < self._validate_after_s:
            return True
        try:
            _run_outside_transaction(idle.connection, "SELECT 1")
            return True
        except Exception:
            return False


def _run_outside_transaction(connection, sql: str) -> None:
    """Run a session-level statement in autocommit mode."""
    connection.autocommit = True
    try:
        connection.cursor().execute(sql)
    finally:
        connection.autocommit = False


def _close_quietly(connection) -> None:
    """Close a connection that may already be dead."""
    try:
        connection.close()
    except Exception:
        pass


def _rollback_quietly(connection) -> bool:
    """Roll back; False when the connection cannot even do that (so it must be discarded)."""
    try:
        connection.rollback()
        return True
    except Exception:
        return False


class Database:
    """A pooled PostgreSQL database; use ``with db.transaction() as tx:`` for every access."""

    def __init__(self, connector: Callable[[], Any], *, max_size: int = DEFAULT_MAX_SIZE,
                 acquire_timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S,
                 statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S,
                 validate_after_s: float | None = DEFAULT_VALIDATE_AFTER_S):
        self._connector = connector
        self._statement_timeout_s = statement_timeout_s
        self._pool = _Pool(connector, max_size=max_size, acquire_timeout_s=acquire_timeout_s,
                           validate_after_s=validate_after_s, prepare=self._prepare_session)

    @classmethod
    def from_dsn(cls, dsn: str, **options) -> Database:
        """A database reached through a postgresql:// DSN."""
        timeout = options.get("statement_timeout_s", DEFAULT_STATEMENT_TIMEOUT_S)
        return cls(DsnConnector(dsn, socket_timeout_s=_socket_timeout(timeout)), **options)

    @classmethod
    def from_cloud_sql(cls, instance_connection_name: str, *, user: str, password: str, database: str,
                       ip_type: str = "public", **options) -> Database:
        """A database reached through the Cloud SQL Python Connector."""
        timeout = _socket_timeout(options.get("statement_timeout_s", DEFAULT_STATEMENT_TIMEOUT_S))
        connector = CloudSqlConnector(instance_connection_name, user=user, password=password,
                                      database=database, ip_type=ip_type, socket_timeout_s=timeout)
        return cls(connector, **options)

    @classmethod
    def from_env(cls, source: Any = None, **options) -> Database:
        """The database the environment (or a Config / mapping) names; see connector_from_env."""
        timeout = _socket_timeout(options.get("statement_timeout_s", DEFAULT_STATEMENT_TIMEOUT_S))
        return cls(connector_from_env(os.environ if source is None else source, timeout), **options)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction that commits when the block ends normally and rolls back when it raises."""
        connection = self._pool.acquire()
        tx = Transaction(connection)
        broken = True
        try:
            yield tx
            tx._commit()
            broken = False
        except BaseException:
            broken = tx.connection_lost or not _rollback_quietly(connection)
            raise
        finally:
            self._pool.release(connection, broken=broken)

    def ping(self) -> bool:
        """Whether the database answers a trivial query now (for health checks); False when it is unavailable."""
        try:
            with self.transaction() as tx:
                return tx.fetchvalue("SELECT 1") == 1
        except errors.DatabaseUnavailable:
            return False

    def stats(self) -> dict[str, int]:
        """Pool counters for health endpoints and tests."""
        return self._pool.stats()

    def close(self) -> None:
        """Close every connection and the connector."""
        self._pool.close()
        close = getattr(self._connector, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Database({self._connector!r})"

    def _prepare_session(self, connection) -> None:
        """Session settings every connection gets once: UTC clock and the statement timeout."""
        timeout_ms = 0 if self._statement_timeout_s is None else max(1, int(self._statement_timeout_s * 1000))
        _run_outside_transaction(connection, f"SET TIME ZONE 'UTC'; SET statement_timeout = {timeout_ms}")
