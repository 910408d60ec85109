"""pytest fixtures every service's tests share: real Cloud Tasks emulator, delivery recorder,
ChangeNOW stand-in, a fresh migrated PostgreSQL database, and a service environment wired to them;
a `client` built by the test module's `make_client` fixture; and `delivered_tokens`, the hop
tokens a recorder received, decoded.

A service test module opts in with ``pytest_plugins = ["telepay_shared.testing.pytest_plugin"]``.
The keys are the legacy golden-vector keys, so tokens minted by the legacy code verify here.

OIDC as deployed: the emulator attaches a Google-format ID token to every task created with an OIDC
service account (`tasks_emulator.oidc_issuer` signs it); `oidc_certs` publishes that issuer's
certificates, and `oidc_env(audience)` is the environment that makes a service verify them
(TP_AUTH_MODE=oidc, TP_OIDC_AUDIENCES, TP_OIDC_ALLOWED_EMAILS = TASKS_SERVICE_ACCOUNT,
TP_OIDC_CERTS_URL, CLOUD_TASKS_OIDC_SERVICE_ACCOUNT).

No secret in any log: every log record a test emits is formatted as the services format it (their
Cloud Logging JSON handler's formatter when one is installed, with its redaction) and scanned, as is
every test's captured stdout and stderr and the emulator's log; the session fails when a secret the
tests configured (KEYS, the ChangeNOW key, every secret a service environment or configuration
holds, the stand-ins' tokens, a database password) appears in any form (secretscan.py).
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from telepay_shared import tokens
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import load_config
from telepay_shared.db import Database
from telepay_shared.standins.changenow import ChangeNowStandIn
from telepay_shared.testing.oidc import CertsServer
from telepay_shared.testing.postgres import fresh_database
from telepay_shared.testing.secretscan import SecretScan
from telepay_shared.testing.tasks_emulator import DeliveryRecorder, TasksEmulator

TEST_PROJECT, TEST_LOCATION = "telepay-test", "us-central1"
VECTORS_PATH = Path(__file__).parent.parent.parent / "testdata" / "token-vectors.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
KEYS = dict(VECTORS["keys"])
CHANGENOW_TEST_KEY = "test-changenow-api-key"
TASKS_SERVICE_ACCOUNT = "telepay-tasks@telepay-test.iam.gserviceaccount.com"
SECRET_SCAN = pytest.StashKey[SecretScan]()
_HANDLER = pytest.StashKey[logging.Handler]()
# Secrets of modules a test may have loaded, looked up at the end of the session: (module, attribute).
MODULE_SECRETS = {"TELEGRAM_STANDIN_TOKEN": ("telepay_shared.standins.telegram", "DEFAULT_TOKEN")}
_SCANNED_SECTIONS = ("stdout", "stderr")  # pytest's own "log" sections hold raw records, not service output


# ---------------------------------------------------------------- the secret scan of every log


class ServiceFormatScanHandler(logging.Handler):
    """A root handler that formats each record as the services' JSON handler does and scans the line."""

    def __init__(self, scan: SecretScan):
        super().__init__()
        self.scan = scan
        self.plain = logging.Formatter("%(levelname)s %(name)s %(message)s")
        self.source = "session"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            service = next((h for h in logging.getLogger().handlers if getattr(h, "telepay_json", False)), None)
            line = (service.formatter if service is not None and service.formatter else self.plain).format(record)
        except Exception:  # noqa: BLE001 - a record a formatter cannot render is not a finding
            return
        self.scan.find(line, f"{self.source} (log record of {record.name})")


def scan_of(config: pytest.Config) -> SecretScan:
    """The session's secret scan: add every secret the tests configure to it."""
    return config.stash[SECRET_SCAN]


def add_environment_secrets(scan: SecretScan, declared: dict, env: Mapping[str, str]) -> None:
    """Adds the declared secrets' values and any password inside a DSN of a service environment."""
    for name in declared.get("secrets") or ():
        scan.add(name, env.get(name))
    for name, value in env.items():
        if isinstance(value, str) and "://" in value:
            scan.add(f"{name} password", urlsplit(value).password)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Starts the scan with the plugin's keys and hooks a scanning handler onto the root logger."""
    scan = SecretScan({**KEYS, "CHANGENOW_API_KEY": CHANGENOW_TEST_KEY})
    config.stash[SECRET_SCAN] = scan
    handler = ServiceFormatScanHandler(scan)
    logging.getLogger().addHandler(handler)
    config.stash[_HANDLER] = handler


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Names the test in the findings of the records it emits."""
    handler = item.config.stash.get(_HANDLER, None)
    if handler is not None:
        handler.source = item.nodeid
    try:
        return (yield)
    finally:
        if handler is not None:
            handler.source = "session"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Scans the stdout and stderr captured during each phase of each test (the services' JSON lines)."""
    report = yield
    scan = item.config.stash.get(SECRET_SCAN, None)
    for title, text in report.sections if scan is not None else ():
        if set(title.split()) & set(_SCANNED_SECTIONS):  # "Captured stdout call", ...
            scan.find(text, f"{item.nodeid} ({title})")
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """Fails the session when any log held a secret; says which, where and in which form, never the value."""
    scan = session.config.stash.get(SECRET_SCAN, None)
    if scan is None:
        return
    for name, (module, attribute) in MODULE_SECRETS.items():
        if module in sys.modules:
            scan.add(name, getattr(sys.modules[module], attribute, None))
    if scan.findings:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = sorted({str(finding) for finding in scan.findings})
        if reporter is not None:
            reporter.write_sep("=", "secrets found in the logs of this test session", red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    """Removes the scanning handler."""
    handler = config.stash.get(_HANDLER, None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)


def _entered(context: AbstractContextManager) -> Iterator:
    """A fixture's body: yield what `context` gives from inside it, so it ends with the fixture's scope."""
    with context as value:
        yield value


@pytest.fixture(scope="session")
def tasks_emulator(pytestconfig):
    """One Cloud Tasks emulator for the whole test session; its log is scanned for secrets at the end."""
    with TasksEmulator() as emulator:
        yield emulator
        scan_of(pytestconfig).find(emulator.log_text(), "Cloud Tasks emulator log")


@pytest.fixture(scope="session")
def oidc_issuer(tasks_emulator):
    """The issuer that signs the OIDC tokens the emulator attaches (Google's, locally)."""
    return tasks_emulator.oidc_issuer


@pytest.fixture(scope="session")
def oidc_certs(oidc_issuer):
    """The issuer's certificates served over HTTP, as Google serves its own."""
    yield from _entered(CertsServer(oidc_issuer))


@pytest.fixture
def oidc_env(oidc_certs):
    """The environment of a service that verifies the emulator's OIDC tokens, for its origin (audience)."""

    def build(audience: str) -> dict[str, str]:
        return {"TP_AUTH_MODE": "oidc", "TP_OIDC_AUDIENCES": audience, "TP_OIDC_ALLOWED_EMAILS": TASKS_SERVICE_ACCOUNT,
                "TP_OIDC_CERTS_URL": oidc_certs.url, "CLOUD_TASKS_OIDC_SERVICE_ACCOUNT": TASKS_SERVICE_ACCOUNT}

    return build


@pytest.fixture
def deliveries():
    """An HTTP receiver standing in for the next hop; records every task delivered to it."""
    yield from _entered(DeliveryRecorder())


@pytest.fixture
def slack():
    """A Slack incoming-webhook stand-in (SLACK_ALERT_WEBHOOK=slack.url("/hook")): every alert lands here."""
    with DeliveryRecorder() as recorder:
        yield recorder


@pytest.fixture
def changenow():
    """A ChangeNOW v2 stand-in on 127.0.0.1."""
    yield from _entered(ChangeNowStandIn(api_key=CHANGENOW_TEST_KEY))


@pytest.fixture
def database_url():
    """DSN of a new database with every migration applied, on a real PostgreSQL server."""
    yield from _entered(fresh_database())


@pytest.fixture
def database(database_url):
    """A pool on that database, for arranging and asserting rows."""
    yield from _entered(Database.from_dsn(database_url))


@pytest.fixture
def tasks(tasks_emulator):
    """The real Cloud Tasks client, talking to the emulator."""
    return TasksClient(TEST_PROJECT, TEST_LOCATION, emulator_host=tasks_emulator.host)


@pytest.fixture
def service_env(tasks, tasks_emulator, pytestconfig):
    """Build a service's environment: test keys, the emulator, and every declared queue created.

    Call it with the service_config.json path and the values the test wants to set; queues the
    declaration names are created on the emulator with their default ids.
    """

    def build(declaration: Path, **values: str) -> dict[str, str]:
        declared = json.loads(Path(declaration).read_text())
        env = {
            "CLOUD_TASKS_PROJECT_ID": TEST_PROJECT,
            "CLOUD_TASKS_LOCATION": TEST_LOCATION,
            "CLOUD_TASKS_EMULATOR_HOST": tasks_emulator.host,
            "CHANGENOW_API_KEY": CHANGENOW_TEST_KEY,
            "TP_AUTH_MODE": "none",
            **KEYS,
        }
        for name, default_queue in (declared.get("queues") or {}).items():
            env.setdefault(name, default_queue or name.lower().replace("_", "-"))
        env.update(values)
        for name in declared.get("queues") or {}:
            tasks.ensure_queue(env[name])
        add_environment_secrets(scan_of(pytestconfig), declared, env)
        return env

    return build


@pytest.fixture
def load_service_config(pytestconfig):
    """load_config over an explicit environment (never the test process's own); its secrets are scanned for."""

    def load(declaration: Path, env: dict[str, str]):
        config = load_config(declaration, environ=env)
        for secret in config.secrets():
            scan_of(pytestconfig).add(secret.name, secret.reveal())
        return config

    return load


@pytest.fixture
def client(make_client):
    """The service's test client with its defaults, from the module's own `make_client` fixture."""
    return make_client()


def slow_inserts(database: Database, table: str) -> None:
    """Makes every insert into `table` sleep 1.5 s (a trigger), so a concurrent run meets a held claim."""
    with database.transaction() as tx:
        tx.execute("CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                   " PERFORM pg_sleep(1.5); RETURN NEW; END $$;"
                   f"CREATE TRIGGER slow_claim AFTER INSERT ON {table}"
                   " FOR EACH ROW EXECUTE FUNCTION slow_claim()")


def delivered_tokens(recorder: DeliveryRecorder, hop: tokens.Hop | str, path: str, *, count: int = 1,
                     keys: Mapping[str, str] = KEYS, now: float | None = None) -> list[dict]:
    """The fields of the `hop` tokens in the JSON bodies of exactly `count` deliveries, all to `path`."""
    delivered = recorder.expect_exactly(count)
    assert {delivery.path for delivery in delivered} <= {path}, [delivery.path for delivery in delivered]
    return [tokens.decode(hop, json.loads(delivery.body)["token"], keys, now=now) for delivery in delivered]
