"""pytest fixtures every service's tests share: real Cloud Tasks emulator, delivery recorder,
ChangeNOW stand-in, a fresh migrated PostgreSQL database, and a service environment wired to them;
a `client` built by the test module's `make_client` fixture; and `delivered_tokens`, the hop
tokens a recorder received, decoded.

A service test module opts in with ``pytest_plugins = ["telepay_shared.testing.pytest_plugin"]``.
The keys are the legacy golden-vector keys, so tokens minted by the legacy code verify here.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from telepay_shared import tokens
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.config import load_config
from telepay_shared.db import Database
from telepay_shared.standins.changenow import ChangeNowStandIn
from telepay_shared.testing.postgres import fresh_database
from telepay_shared.testing.tasks_emulator import DeliveryRecorder, TasksEmulator

TEST_PROJECT, TEST_LOCATION = "telepay-test", "us-central1"
VECTORS_PATH = Path(__file__).parent.parent.parent / "testdata" / "token-vectors.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
KEYS = dict(VECTORS["keys"])
CHANGENOW_TEST_KEY = "test-changenow-api-key"


def _entered(context: AbstractContextManager) -> Iterator:
    """A fixture's body: yield what `context` gives from inside it, so it ends with the fixture's scope."""
    with context as value:
        yield value


@pytest.fixture(scope="session")
def tasks_emulator():
    """One Cloud Tasks emulator for the whole test session."""
    yield from _entered(TasksEmulator())


@pytest.fixture
def deliveries():
    """An HTTP receiver standing in for the next hop; records every task delivered to it."""
    yield from _entered(DeliveryRecorder())


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
def service_env(tasks, tasks_emulator):
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
        return env

    return build


@pytest.fixture
def load_service_config():
    """load_config over an explicit environment (never the test process's own)."""

    def load(declaration: Path, env: dict[str, str]):
        return load_config(declaration, environ=env)

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
