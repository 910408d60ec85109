"""Versioned plain-SQL migrations: each applied once, in order, safely from concurrent deploys.

Migrations are the files ``NNNN_name.sql`` in shared/migrations. Each runs in its own
transaction together with its row in ``schema_migrations`` (version, name, sha256 of the file,
time), so a failed migration leaves nothing behind. Every transaction first takes one advisory
lock, so two runs started at once apply each migration exactly once: the second waits, then sees
the row. A file edited after it was applied is refused (its checksum no longer matches).

    python -m telepay_shared.migrate --dsn postgresql://user:pass@host/db
    python -m telepay_shared.migrate --status     # exit 0 up to date, 1 pending, 2 changed/unknown

Without --dsn the database comes from the environment (CLOUD_SQL_CONNECTION_NAME with the
DATABASE_*_SECRET values, or DATABASE_URL), like the services.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from telepay_shared import errors
from telepay_shared.db import Database, Transaction

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"
LOCK_NAME = "telepay_shared.migrate"
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_BOOTSTRAP = """
CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   CHAR(64) NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files or the recorded history are inconsistent; a person must look."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text, recorded when it is applied."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        """The file name without .sql, e.g. 0001_legacy_schema."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    status: str  # "applied", "pending", "changed" (file edited since) or "unknown" (no such file)
    applied_at: datetime | None


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file in version order; any other .sql name or a repeated version is an error."""
    migrations: dict[int, Migration] = {}
    for path in sorted(Path(directory).glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        migrations[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [migrations[version] for version in sorted(migrations)]


@contextmanager
def _opened(target: str | Database) -> Iterator[Database]:
    """The target database; a DSN gets its own one-connection pool, closed afterwards."""
    if isinstance(target, Database):
        yield target
        return
    # Schema changes may take long on a big table: no statement timeout.
    db = Database.from_dsn(target, max_size=1, statement_timeout_s=None)
    try:
        yield db
    finally:
        db.close()


def _history(tx: Transaction) -> dict[int, dict] | None:
    """Rows of schema_migrations by version, or None before the first run created the table."""
    if tx.fetchvalue("SELECT to_regclass('schema_migrations') IS NULL"):
        return None
    rows = tx.fetchall("SELECT version, name, checksum, applied_at FROM schema_migrations")
    return {row["version"]: row for row in rows}


def _locked_history(tx: Transaction) -> dict[int, dict]:
    """Take the migration lock, create schema_migrations if needed, and return its rows by version."""
    tx.advisory_lock(LOCK_NAME)
    history = _history(tx)
    if history is None:
        tx.execute(_BOOTSTRAP)
        return {}
    return history


def apply_migrations(target: str | Database, *, directory: Path = MIGRATIONS_DIR,
                     up_to: int | None = None) -> list[int]:
    """Apply every pending migration (up to version `up_to`), each in its own transaction; return the versions applied."""
    migrations = [m for m in load_migrations(directory) if up_to is None or m.version <= up_to]
    applied: list[int] = []
    with _opened(target) as db:
        for migration in migrations:
            with db.transaction() as tx:
                recorded = _locked_history(tx).get(migration.version)
                if recorded is not None:
                    _check_unchanged(migration, recorded)
                    continue
                tx.execute(migration.sql)
                tx.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                           (migration.version, migration.name, migration.checksum))
                applied.append(migration.version)
    return applied


def _check_unchanged(migration: Migration, recorded: dict) -> None:
    """Refuse to go on when an applied migration's file was edited afterwards."""
    if recorded["checksum"] != migration.checksum:
        raise MigrationError(f"{migration.label}.sql changed after it was applied; add a new migration instead")


def migration_status(target: str | Database, *, directory: Path = MIGRATIONS_DIR) -> list[MigrationState]:
    """The state of every migration file and of every recorded version that has no file."""
    migrations = load_migrations(directory)
    with _opened(target) as db, db.transaction() as tx:
        history = _history(tx) or {}
    states = []
    for migration in migrations:
        recorded = history.pop(migration.version, None)
        if recorded is None:
            states.append(MigrationState(migration.version, migration.name, "pending", None))
        else:
            status = "applied" if recorded["checksum"] == migration.checksum else "changed"
            states.append(MigrationState(migration.version, migration.name, status, recorded["applied_at"]))
    states += [MigrationState(v, row["name"], "unknown", row["applied_at"]) for v, row in sorted(history.items())]
    return sorted(states, key=lambda state: state.version)


def _status_exit_code(states: list[MigrationState]) -> int:
    """0 when everything is applied, 1 when some are pending, 2 when the history disagrees with the files."""
    found = {state.status for state in states}
    if found & {"changed", "unknown"}:
        return 2
    return 1 if "pending" in found else 0


def _database(dsn: str | None) -> str | Database:
    """The --dsn value, else the database the environment configures."""
    if dsn:
        return dsn
    return Database.from_env(os.environ, max_size=1, statement_timeout_s=None)


def _run(args: argparse.Namespace, target: str | Database) -> int:
    """Apply or report, printing one line per migration for --status."""
    if args.status:
        states = migration_status(target, directory=args.dir)
        for state in states:
            print(f"{state.version:04d}_{state.name}\t{state.status}\t{state.applied_at or ''}")
        return _status_exit_code(states)
    applied = apply_migrations(target, directory=args.dir, up_to=args.up_to)
    print("applied " + ", ".join(f"{v:04d}" for v in applied) if applied else "schema up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: apply pending migrations, or report their state with --status."""
    parser = argparse.ArgumentParser(prog="python -m telepay_shared.migrate", description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="postgresql:// DSN (default: the environment's database)")
    parser.add_argument("--status", action="store_true", help="report instead of applying")
    parser.add_argument("--up-to", type=int, help="apply migrations up to this version only")
    parser.add_argument("--dir", type=Path, default=MIGRATIONS_DIR, help="migrations directory")
    args = parser.parse_args(argv)
    try:
        target = _database(args.dsn)
    except errors.ConfigError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, target)
    except (MigrationError, errors.ConfigError, errors.TelePayError) as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    finally:
        if isinstance(target, Database):
            target.close()


if __name__ == "__main__":
    raise SystemExit(main())
