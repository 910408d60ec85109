"""Every service in TP_AUTH_MODE=oidc, as deployed: each of its routes takes a task the real Cloud Tasks client
created with an OIDC service account (the emulator attaches the ID token, as Cloud Tasks does), and refuses
401, writing nothing and creating no task, one delivered without a token or with a wrong one.

Each service runs on a real HTTP port (the emulator delivers to URLs) on a fresh migrated database, its
next hops pointed at a delivery recorder. The emulator here gives up after one delivery, so each task is
answered exactly once. A route that receives a hop token (`app.token_task`) is sent a validly signed one,
so a refusal proves that the identity check alone kept a genuine order from running.
"""
from __future__ import annotations

import importlib
import json
import threading
import time

import pytest
from eth_account import Account
from werkzeug.serving import make_server

from telepay_shared import tokens, web
from telepay_shared.cloudtasks import TasksClient
from telepay_shared.testing.oidc import OidcIssuer
from telepay_shared.testing.pytest_plugin import KEYS, TASKS_SERVICE_ACCOUNT, TEST_LOCATION, TEST_PROJECT, VECTORS
from telepay_shared.testing.tasks_emulator import TasksEmulator

from services.catalog import TASK_SERVICES

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]

PROBE_QUEUE = "oidc-probe-queue"
INTRUDER = "intruder@elsewhere.iam.gserviceaccount.com"
# What web.verify_oidc_token answers; a route's own checks (a body signature, a token) answer otherwise.
OIDC_REFUSALS = ("missing Authorization: Bearer identity token", "identity token rejected", "caller is not allowed")
WALLET = Account.create()
EXTRA_VALUES = {  # the names some services need that the plugin's environment does not give
    "HOST_WALLET_PRIVATE_KEY": WALLET.key.to_0x_hex(), "ETHEREUM_RPC_URL": "http://127.0.0.1:9/oidc-test-rpc",
    "HOST_WALLET_ETH_ADDRESS": WALLET.address, "HOST_WALLET_USDT_ADDRESS": WALLET.address,
    "TELEGRAM_BOT_SECRET_NAME": "123456789:oidc-test-telegram-bot-token",
}


@pytest.fixture(scope="session")
def tasks_emulator():
    """The emulator, giving up after one delivery: every task here is answered exactly once."""
    with TasksEmulator(max_retries=0) as emulator:
        yield emulator


class Answers:
    """WSGI middleware recording each request's path, status and error message, to wait on."""

    def __init__(self, app):
        self.app, self.seen, self.changed = app.wsgi_app, [], threading.Condition()
        app.wsgi_app = self

    def __call__(self, environ, start_response):
        status = []
        body = b"".join(self.app(environ, lambda s, h, e=None: (status.append(int(s.split()[0])), start_response(s, h, e))[1]))
        answer = json.loads(body) if body.startswith(b"{") else {}
        with self.changed:
            self.seen.append((environ["PATH_INFO"], status[0], answer.get("message")))
            self.changed.notify_all()
        return [body]

    def next_answer(self, count_before: int, timeout_s: float = 20.0) -> tuple:
        """The first answer after count_before answers; AssertionError when none comes."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.seen) > count_before, timeout_s), "task not delivered"
            return self.seen[count_before]


class RunningService:
    """One service app served on 127.0.0.1 in TP_AUTH_MODE=oidc, with its routes and their hop tokens."""

    def __init__(self, name: str, env_for, load_service_config):
        module = importlib.import_module(f"services.{name}.app")
        self.hops: dict[str, object] = {}
        self.server = make_server("127.0.0.1", 0, None, threaded=True)
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        config = load_service_config(module.CONFIG_PATH, env_for(module.CONFIG_PATH, self.origin))
        self.app = self._created(module, config)
        self.answers = Answers(self.app)
        self.server.app = self.app
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _created(self, module, config):
        """The service's app, noting the hop each token route decodes."""
        register = web.ServiceApp.token_task

        def noting(app, rule, hop, **options):
            self.hops[rule] = hop
            return register(app, rule, hop, **options)

        web.ServiceApp.token_task = noting
        try:
            return module.create_app(config)
        finally:
            web.ServiceApp.token_task = register

    def routes(self) -> list[str]:
        """Every POST route but /health."""
        return sorted(rule.rule for rule in self.app.url_map.iter_rules() if "POST" in rule.methods)

    def body(self, route: str) -> dict:
        """A genuine order for a token route (a fresh token from the legacy vector's fields), else {}."""
        hop = self.hops.get(route)
        return {} if hop is None else {"token": tokens.encode(hop, VECTORS["hops"][hop.name]["fields"], KEYS)}


@pytest.fixture
def env_for(service_env, database_url, changenow, deliveries, oidc_env):
    """A service's environment: the plugin's, its database, ChangeNOW, next hops at the recorder, OIDC as deployed."""

    def build(declaration, origin: str) -> dict:
        declared = json.loads(declaration.read_text())
        targets = {name: deliveries.url("/" + name.lower()) for name in declared.get("targets") or {}}
        values = {**EXTRA_VALUES, **targets, **oidc_env(origin), "DATABASE_URL": database_url,
                  "CHANGENOW_API_URL": changenow.url}
        declared_names = {n for section in ("secrets", "env", "targets") for n in declared.get(section) or ()}
        return service_env(declaration, **{k: v for k, v in values.items() if k in declared_names})

    return build


def table_rows(database) -> dict[str, int]:
    """Rows per table of the service's database: what 'nothing written' compares."""
    with database.transaction() as tx:
        names = [row["table_name"] for row in tx.fetchall(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return {name: tx.fetchone(f'SELECT count(*) AS n FROM "{name}"')["n"] for name in names}


def deliver(tasks_emulator, service: RunningService, route: str, body: dict, *, account=None, audience=None,
            authorization=None) -> tuple:
    """Create one task with the real client (OIDC account, explicit audience or header as given); its answer."""
    client = TasksClient(TEST_PROJECT, TEST_LOCATION, emulator_host=tasks_emulator.host, oidc_service_account=account)
    client.ensure_queue(PROBE_QUEUE)
    before, url, raw = len(service.answers.seen), service.origin + route, json.dumps(body).encode()
    # Signed as our senders sign (X-Webhook-Signature): only the identity token decides here.
    headers = {"Content-Type": "application/json", **web.sign_body(raw, KEYS["SUCCESS_URL_SIGNING_KEY"])}
    if audience is None:
        client.enqueue(PROBE_QUEUE, url, None, raw_body=raw, idempotency_key=None,
                       headers={**headers, "Authorization": authorization} if authorization else headers)
    else:  # the audience a task names itself (cloudtasks.TasksClient always names the URL's origin)
        task = {"http_request": {"url": url, "body": raw, "headers": headers,
                                 "oidc_token": {"service_account_email": account, "audience": audience}}}
        client.raw_client.create_task(parent=client.queue_path(PROBE_QUEUE), task=task)
    return service.answers.next_answer(before)


def settled(deliveries, quiet_s: float = 0.5) -> int:
    """The recorder's delivery count once no delivery has arrived for quiet_s (an accepted task's next hop)."""
    count = -1
    while count != len(deliveries.deliveries()):
        count = len(deliveries.deliveries())
        time.sleep(quiet_s)
    return count


def refusals(issuer: OidcIssuer, origin: str) -> dict[str, dict]:
    """Each wrong way a task may arrive: how to create it."""
    bearer = lambda **claims: "Bearer " + issuer.mint(origin, TASKS_SERVICE_ACCOUNT, **claims)  # noqa: E731
    return {
        "no token": {},
        "wrong audience": {"account": TASKS_SERVICE_ACCOUNT, "audience": "http://127.0.0.1:9"},
        "wrong email": {"account": INTRUDER},
        "email not verified": {"authorization": bearer(email_verified=False)},
        "expired": {"authorization": bearer(now=time.time() - 7200)},
        "signed by another key": {"authorization": "Bearer " + OidcIssuer().mint(origin, TASKS_SERVICE_ACCOUNT)},
    }


@pytest.mark.parametrize("name", TASK_SERVICES)
def test_every_route_takes_a_cloud_tasks_oidc_task_and_refuses_any_other(name, env_for, load_service_config, database,
                                                                          deliveries, tasks_emulator):
    service = RunningService(name, env_for, load_service_config)
    try:
        assert service.routes(), name
        for route in service.routes():
            body, rows, delivered = service.body(route), table_rows(database), settled(deliveries)
            for case, how in refusals(tasks_emulator.oidc_issuer, service.origin).items():
                path, status, message = deliver(tasks_emulator, service, route, body, **how)
                assert (path, status) == (route, 401) and message in OIDC_REFUSALS, (route, case, status, message)
            assert table_rows(database) == rows, route
            assert settled(deliveries, quiet_s=0.3) == delivered, route  # no task created
            path, status, message = deliver(tasks_emulator, service, route, body, account=TASKS_SERVICE_ACCOUNT)
            assert path == route and message not in OIDC_REFUSALS, (route, status, message)
    finally:
        service.server.shutdown()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
