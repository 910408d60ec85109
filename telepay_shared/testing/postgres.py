"""A throwaway real PostgreSQL server for tests, and a fresh migrated database per test.

    with postgres_server() as server:          # own server: initdb, start, stop, delete
        dsn = server.dsn()

    @pytest.fixture
    def dsn():
        with fresh_database() as dsn:          # one server per test process, a database per test
            yield dsn

The server binaries come from $TELEPAY_POSTGRES_BINDIR, PATH, ``pg_config --bindir`` or the
newest /usr/lib/postgresql/*/bin (Debian's layout); no version is assumed. The cluster lives in
a temporary directory, listens on a Unix socket there (plus 127.0.0.1 on a free port), runs with
fsync off, and is deleted on stop. PostgreSQL refuses to run as root, so under root it runs as
the ``postgres`` user when one exists, else ``nobody``. Fresh databases are copies of one
migrated template (CREATE DATABASE ... TEMPLATE), which takes milliseconds instead of re-running
the migrations for every test. Needs only pg8000 and the server package (Debian: postgresql).
"""
from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pg8000.dbapi

from telepay_shared.migrate import apply_migrations
from telepay_shared.testing.harness import Harness

BINDIR_ENV = "TELEPAY_POSTGRES_BINDIR"
SUPERUSER = "postgres"
TEMPLATE_DATABASE = "telepay_template"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_UNPRIVILEGED_USERS = ("postgres", "nobody")
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Speed over durability: a test cluster is deleted anyway.
_SERVER_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=100")


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb and postgres) were found on this machine."""


def _has_server(bindir: Path) -> bool:
    """True when the directory holds both initdb and postgres."""
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _pg_config_bindir() -> Path | None:
    """The bindir pg_config reports, if pg_config exists and answers."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    return Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None


def _debian_bindirs() -> list[Path]:
    """Debian's per-version bindirs, newest major version first."""
    versions = [p for p in _DEBIAN_ROOT.glob("*/bin") if p.parent.name.isdigit()]
    return sorted(versions, key=lambda p: int(p.parent.name), reverse=True)


def find_bindir() -> Path:
    """The directory of the PostgreSQL server binaries to use."""
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    initdb = shutil.which("initdb")
    if initdb:
        candidates += [Path(initdb).parent, Path(os.path.realpath(initdb)).parent]
    candidates += [p for p in [_pg_config_bindir()] if p is not None] + _debian_bindirs()
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    raise PostgresNotFound("PostgreSQL server binaries not found (install the Debian package "
                           f"'postgresql' or set {BINDIR_ENV})")


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in _UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresNotFound("running as root and no 'postgres' or 'nobody' account to run PostgreSQL as")


def _cluster_parent() -> str:
    """Where to put the cluster: /tmp when usable, because a test runner's TMPDIR (e.g. Bazel's) can be
    too deep for a Unix socket path (107 bytes) and sit under a root-only directory."""
    if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK):
        return "/tmp"
    return tempfile.gettempdir()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_env() -> dict[str, str]:
    """The environment for server processes: ours minus libpq's PG* variables, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer(Harness):
    """One PostgreSQL cluster in a temporary directory, owned by this process."""

    def __init__(self, bindir: Path | None = None):
        self.bindir = bindir or find_bindir()
        self._account = _server_account()
        self._root: Path | None = None
        self._process: subprocess.Popen | None = None
        self.port = 0

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's Unix socket."""
        if self._root is None:
            raise RuntimeError("server not started")
        return self._root

    def dsn(self, database: str = "postgres") -> str:
        """A DSN reaching `database` over the Unix socket."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def tcp_dsn(self, database: str = "postgres") -> str:
        """A DSN reaching `database` over TCP on 127.0.0.1."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def start(self) -> PostgresServer:
        """initdb into a new temporary directory and start the server; returns self once it accepts connections."""
        self._root = Path(tempfile.mkdtemp(prefix="telepay-pg-", dir=_cluster_parent()))
        with self.stopped_on_failure():
            if self._account is not None:
                os.chown(self._root, self._account.pw_uid, self._account.pw_gid)
            self._run_initdb()
            self._launch()
        return self

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Immediate shutdown skips the final checkpoint: the cluster is deleted next anyway.
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def execute_autocommit(self, sql: str, database: str = "postgres") -> None:
        """Run one statement as the superuser outside a transaction (CREATE/DROP DATABASE need that)."""
        connection = pg8000.dbapi.connect(SUPERUSER, database=database, unix_sock=self._socket_path())
        try:
            connection.autocommit = True
            connection.cursor().execute(sql)
        finally:
            connection.close()

    def create_database(self, name: str, template: str = "template0") -> str:
        """Create database `name` as a copy of `template`; returns its DSN."""
        self.execute_autocommit(f'CREATE DATABASE "{_checked_name(name)}" TEMPLATE "{_checked_name(template)}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting anyone still using it."""
        self.execute_autocommit(f'DROP DATABASE IF EXISTS "{_checked_name(name)}" WITH (FORCE)')

    def _socket_path(self) -> str:
        """Path of the server's Unix socket file."""
        return str(self.socket_dir / f".s.PGSQL.{self.port}")

    def _as_server_account(self) -> dict:
        """subprocess options that drop root privileges to the server account."""
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _run_initdb(self) -> None:
        """Create the cluster: trust authentication, UTF8, C locale, no fsync."""
        command = [str(self.bindir / "initdb"), "-D", str(self.socket_dir / "data"), "-U", SUPERUSER,
                   "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
        result = subprocess.run(command, cwd=self.socket_dir, env=_server_env(), capture_output=True,
                                text=True, check=False, **self._as_server_account())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def _launch(self) -> None:
        """Start postgres, retrying on another port if the chosen one was taken meanwhile."""
        for _attempt in range(3):
            self.port = _free_port()
            if self._start_postgres():
                return
        raise RuntimeError(f"PostgreSQL did not start: {self._log_tail()}")

    def _start_postgres(self) -> bool:
        """Start the server process and wait until it accepts connections; False if it exited."""
        command = [str(self.bindir / "postgres"), "-D", str(self.socket_dir / "data"),
                   "-k", str(self.socket_dir), "-h", "127.0.0.1", "-p", str(self.port)]
        for setting in _SERVER_SETTINGS:
            command += ["-c", setting]
        with open(self.socket_dir / "server.log", "ab") as log:
            self._process = subprocess.Popen(command, cwd=self.socket_dir, env=_server_env(), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             **self._as_server_account())
        return self._wait_until_ready()

    def _wait_until_ready(self) -> bool:
        """Poll until a connection succeeds; False when the server process exits first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                pg8000.dbapi.connect(SUPERUSER, database="postgres", unix_sock=self._socket_path(), timeout=2).close()
                return True
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL not ready after {START_TIMEOUT_S} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        """The end of the server log, for failure messages."""
        try:
            return (self.socket_dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no server log)"


def _checked_name(name: str) -> str:
    """A database name safe to quote into SQL."""
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}")
    return name


@contextmanager
def postgres_server(bindir: Path | None = None) -> Iterator[PostgresServer]:
    """A running server for the duration of the block, deleted afterwards."""
    with PostgresServer(bindir) as server:
        yield server


_shared_lock = threading.Lock()
_shared_server: PostgresServer | None = None
_template_ready = False
_database_numbers = itertools.count(1)


def shared_server() -> PostgresServer:
    """The test process's server, started on first use and stopped when the process exits."""
    global _shared_server
    with _shared_lock:
        if _shared_server is None:
            server = PostgresServer().start()
            atexit.register(server.stop)
            _shared_server = server
        return _shared_server


def _migrated_template(server: PostgresServer) -> str:
    """Name of the template database holding every migration, built once per process."""
    global _template_ready
    if not _template_ready:
        server.create_database(TEMPLATE_DATABASE)
        apply_migrations(server.dsn(TEMPLATE_DATABASE))
        _template_ready = True
    return TEMPLATE_DATABASE


@contextmanager
def fresh_database(*, migrated: bool = True) -> Iterator[str]:
    """DSN of a new database on the shared server (migrated, or empty), dropped after the block."""
    server = shared_server()
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    # CREATE DATABASE needs its template free of other sessions, so copies are made one at a time.
    with _shared_lock:
        server.create_database(name, _migrated_template(server) if migrated else "template0")
    try:
        yield server.dsn(name)
    finally:
        server.drop_database(name)
