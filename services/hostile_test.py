"""Hostile input and authentication over EVERY endpoint of the twelve services (issue #7, parts 2 and 3a).

Each service is built by its own create_app on real parts: PostgreSQL (a fresh migrated database per
test), the Cloud Tasks emulator (the service's queues get names of their own and are PAUSED, so every
task the service creates stays listed), the ChangeNOW, Telegram and CoinGecko stand-ins (they record
every request) and, for GCHostPay3, an in-process EVM whose host wallet really signs. `World.state()`
is everything a request could change: every table's full content and every sequence, the tasks on
the service's queues, the requests each stand-in received and the chain's height.

ROUTES declares, per (service, method, path) of the services' Flask url_maps, how to build a valid
request and which hostile variants apply; `test_every_route_of_every_service_is_swept` fails when a
route is missing from it, so a new endpoint cannot escape the sweep.

* Hostile input (`test_hostile_requests_are_refused_without_effect`): every variant must answer 4xx
  (never 2xx, never 5xx) with a JSON body naming the reason (error code and message) and leave
  `World.state()` unchanged: no row, no sequence value, no task, no ChangeNOW/Telegram/price request,
  no transaction. Variants are sent authenticated as their sender would (HMAC of their exact bytes
  where the service's mode takes one), so it is the input check, not the transport check, that is
  probed.
* Replay (`test_a_replayed_request_has_no_second_effect`): a valid request is delivered, then the
  same bytes again a second later. Cloud Tasks redelivers every answer that is not 2xx, so the
  services answer a redelivery with an idempotent 2xx BY DESIGN; what is asserted is that the first
  delivery had its effect and the second none (no row or sequence changed, no new task, no second
  Telegram message or transfer). A route may read a stand-in again (GCSplit2 quotes, GCHostPay1/2
  read an exchange's status, GCSplit3 creates an unfunded exchange, np-webhook looks up a price):
  its ROUTES entry says why. An idempotent INSERT ... ON CONFLICT DO NOTHING draws a sequence value
  without writing a row, so sequences are left out of the replay comparison (not of the hostile one).
* Authentication (`test_declared_auth_refuses_requests_without_credentials`): in the service's
  DECLARED default TP_AUTH_MODE, a request with no credentials, a wrong HMAC and a garbage Bearer
  token each get 401 and change nothing. Where the declared mode is "none" the credential is the
  token's own HMAC: "no credentials" is the token without its signature, "wrong HMAC" a token signed
  with another key. `test_oidc_mode_demands_the_callers_identity` switches every such route to
  TP_AUTH_MODE=oidc and checks that only a Google-signed ID token for the service, from an allowed
  caller, gets through. Routes that are public by nature are in PUBLIC with the reason.
"""
from __future__ import annotations

import base64
import hmac
import importlib
import itertools
import json
import secrets
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from telepay_shared import hops, tokens
from telepay_shared.testing.oidc import CertsServer, OidcIssuer
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.catalog import SERVICES

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]

BODY_LIMIT = 64 * 1024  # web.create_app's max_body_bytes default
SIGNATURE_HEADER = "X-Webhook-Signature"
OIDC_AUDIENCE_OF = "https://{}.telepay.example"
OIDC_CALLER = "cloud-tasks@telepay-test.iam.gserviceaccount.com"
BOT_TOKEN = "5550002:hostile-sweep"
CLOSED_CHANNEL = str(VECTORS["hops"]["gcwebhook1->gcwebhook2"]["fields"]["closed_channel_id"])
OPEN_CHANNEL = "-1003000000001"
HOST_USDT_WALLET = "0x" + "4b" * 20
TX_HASH = "0x" + "cd" * 32
_ids = itertools.count(int(time.time()) * 1000)  # payment ids never seen by the session's emulator
SENT = {"requests": 0, "variants": {}}  # printed at the end of the module (-s)


def fields_of(hop: tokens.Hop) -> dict:
    return dict(VECTORS["hops"][hop.name]["fields"])


def new_uid() -> str:
    return secrets.token_hex(8).upper()


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Req:
    """One HTTP request, built as bytes so that hostile variants can be exact."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    headers: dict = field(default_factory=dict)
    query: dict | None = None
    signed: bool = True  # give it the transport/body signature its sender would

    def with_body(self, body: bytes, **changes) -> Req:
        return replace(self, body=body, **changes)


def json_req(path: str, body, method: str = "POST") -> Req:
    return Req(method, path, json.dumps(body).encode())


def hmac_hex(key: str, raw: bytes, digest: str = "sha256") -> str:
    return hmac.new(key.encode(), raw, digest).hexdigest()


# ---------------------------------------------------------------- OIDC: Google's issuer, locally


@pytest.fixture(scope="module")
def oidc():
    """A local 'accounts.google.com' key and the certs endpoint the services are pointed at (TP_OIDC_CERTS_URL)."""
    issuer = OidcIssuer()
    with CertsServer(issuer) as server:
        yield SimpleNamespace(issuer=issuer, certs_url=server.url)


# ---------------------------------------------------------------- the world a service lives in


class World:
    """One service built on the real parts, plus everything it could change (`state`)."""

    def __init__(self, service: str, fixtures: dict, auth_mode: str | None):
        self.service = service
        self.f = SimpleNamespace(**fixtures)
        self.database = self.f.database
        self.module = importlib.import_module(f"services.{service}.app")
        self.declaration = json.loads(Path(self.module.CONFIG_PATH).read_text())
        self.chain = None
        run = uuid.uuid4().hex[:8]
        self.queues = {name: f"{(default or name.lower().replace('_', '-'))}-{run}"
                       for name, default in (self.declaration.get("queues") or {}).items()}
        values = {
            "DATABASE_URL": self.f.database_url, "CHANGENOW_API_URL": self.f.changenow.url,
            "COINGECKO_API_URL": self.f.coingecko.url, "TELEGRAM_API_URL": self.f.telegram.url,
            "TELEGRAM_BOT_SECRET_NAME": BOT_TOKEN, "HOST_WALLET_USDT_ADDRESS": HOST_USDT_WALLET,
            "TP_CALLBACK_RETRY_DELAY_S": "0", "HOSTPAY3_CONFIRMATION_WAIT_S": "0.3", "HOSTPAY3_RETRY_DELAY_S": "0",
            "TP_OIDC_AUDIENCES": self.audience, "TP_OIDC_ALLOWED_EMAILS": OIDC_CALLER,
            "TP_OIDC_CERTS_URL": self.f.oidc.certs_url,
            **{name: self.f.deliveries.url(f"/{name.lower()}") for name in self.declaration.get("targets") or {}},
            **self.queues,
        }
        kwargs = {}
        if service == "gchostpay3":
            from services.gchostpay3.wallet import Wallet
            from telepay_shared.testing.evm import LocalChain

            self.chain = LocalChain(with_tokens=False)
            values.update(HOST_WALLET_PRIVATE_KEY=self.chain.host_private_key,
                          HOST_WALLET_ETH_ADDRESS=self.chain.host_address, ETHEREUM_RPC_URL="http://127.0.0.1:9/")
            kwargs["wallet"] = Wallet(self.chain.w3, self.chain.host_private_key, self.chain.host_address)
        env = self.f.service_env(self.module.CONFIG_PATH, **values)
        if auth_mode is None:
            env.pop("TP_AUTH_MODE")  # the declared default
        else:
            env["TP_AUTH_MODE"] = auth_mode
        for queue in self.queues.values():
            self.f.tasks.raw_client.pause_queue(name=self.f.tasks.queue_path(queue))
        self.config = self.f.load_service_config(self.module.CONFIG_PATH, env)
        self.auth_mode = self.config.get("TP_AUTH_MODE", "none")
        self.app = self.module.create_app(self.config, **kwargs)
        self.client = self.app.test_client()

    def bearer(self) -> dict:
        """A valid caller identity where the mode asks for one (arrangements, not the request under test)."""
        if self.auth_mode != "oidc":
            return {}
        return {"Authorization": "Bearer " + self.f.oidc.issuer.mint(self.audience, OIDC_CALLER)}

    @property
    def audience(self) -> str:
        return OIDC_AUDIENCE_OF.format(self.service)

    # -------------------------------------------------------- sending

    def send(self, req: Req, route: Route | None = None, extra_headers: dict | None = None):
        """Send req; a signed req carries the signature its sender would add for its exact bytes."""
        headers = dict(req.headers)
        if req.signed and route is not None:
            headers.update(route.signature_headers(self, req.body or b""))
        headers.update(extra_headers or {})
        SENT["requests"] += 1
        return self.client.open(req.path, method=req.method, data=req.body, content_type=req.content_type,
                                headers=headers, query_string=req.query)

    def transport_headers(self, raw: bytes) -> dict:
        """What a legacy-style sender adds when the mode accepts an HMAC: X-Webhook-Signature."""
        if "hmac" in self.auth_mode:
            return {SIGNATURE_HEADER: hmac_hex(KEYS[hops.SUCCESS_KEY], raw)}
        return {}

    # -------------------------------------------------------- state

    def state(self) -> dict:
        """Everything a request could change."""
        with self.database.transaction() as tx:
            tables = [r["table_name"] for r in tx.fetchall(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                " AND table_type = 'BASE TABLE' ORDER BY table_name")]
            sequences = [r["sequence_name"] for r in tx.fetchall(
                "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = 'public'")]
            snapshot = {t: sorted(r["row"] for r in tx.fetchall(f'SELECT row_to_json(t)::text AS row FROM "{t}" t'))
                        for t in tables}
            snapshot.update({f"sequence {s}": tx.fetchone(f'SELECT last_value, is_called FROM "{s}"')
                             for s in sequences})
        for name, queue in self.queues.items():
            listed = self.f.tasks.raw_client.list_tasks(parent=self.f.tasks.queue_path(queue))
            snapshot[f"tasks {name}"] = sorted(task.name for task in listed)
        snapshot["deliveries"] = len(self.f.deliveries.deliveries())
        snapshot["changenow requests"] = len(self.f.changenow.requests_seen)
        snapshot["telegram requests"] = len(self.f.telegram.requests_seen)
        snapshot["price requests"] = len(self.f.coingecko.requests_seen)
        if self.chain is not None:
            snapshot["chain height"] = self.chain.w3.eth.block_number
        return snapshot

    def sql(self, statement: str, params=()):
        with self.database.transaction() as tx:
            return tx.fetchvalue(statement, params) if "RETURNING" in statement else tx.execute(statement, params)


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# ---------------------------------------------------------------- arrangements (valid state)


def register_channel(w: World, strategy: str = "instant", threshold: str = "0") -> None:
    owner = w.sql("INSERT INTO registered_users DEFAULT VALUES RETURNING user_id")
    w.sql("INSERT INTO main_clients_database (open_channel_id, closed_channel_id, client_wallet_address,"
          " client_payout_currency, client_payout_network, sub_1_price, sub_1_time, client_id, payout_strategy,"
          " payout_threshold_usd) VALUES (%s, %s, %s, 'LINK', 'ETH', 15.00, 30, %s, %s, %s)",
          (OPEN_CHANNEL, CLOSED_CHANNEL, fields_of(hops.INVITE)["wallet_address"], owner, strategy,
           Decimal(threshold)))


def add_credit(w: World, usd: str, eth: str | None, status: str = "pending") -> None:
    gross = Decimal(usd)
    w.sql("INSERT INTO payout_accumulation (client_id, user_id, payment_amount_usd, payment_currency,"
          " payment_timestamp, accumulated_amount_usdt, payment_fee_usd, client_wallet_address,"
          " client_payout_currency, client_payout_network, conversion_status, nowpayments_payment_id,"
          " nowpayments_outcome_amount) VALUES (%s, 6271402111, %s, 'usd', LOCALTIMESTAMP, %s, %s, %s, 'link', 'eth',"
          " %s, %s, %s)",
          (CLOSED_CHANNEL, gross, gross * Decimal("0.97"), gross * Decimal("0.03"),
           fields_of(hops.INVITE)["wallet_address"], status, str(next(_ids)), None if eth is None else Decimal(eth)))


def open_exchange(w: World, status: str = "waiting") -> str:
    return w.f.changenow.open_exchange("eth", "usdt", Decimal("0.02"), HOST_USDT_WALLET, status=status)["id"]


def ipn(w: World) -> Req:
    register_channel(w)
    fields = {**fields_of(hops.NOWPAYMENTS_IPN), "payment_id": next(_ids),
              "order_id": f"PGP-6271402111|{OPEN_CHANNEL}"}
    return Req("POST", "/", json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def validated_payment(w: World) -> Req:
    register_channel(w)
    invite = fields_of(hops.INVITE)
    return json_req("/process-validated-payment", {
        **{k: invite[k] for k in ("user_id", "wallet_address", "payout_currency", "payout_network",
                                  "subscription_time_days", "subscription_price")},
        "closed_channel_id": CLOSED_CHANNEL, "outcome_amount_usd": 13.800552, "nowpayments_payment_id": next(_ids),
        "nowpayments_pay_address": "0x9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
        "nowpayments_outcome_amount": 0.0046, "payment_status": "finished"})


def threshold_credit(w: World) -> Req:
    return json_req("/", {
        "user_id": 6271402111, "client_id": int(CLOSED_CHANNEL),
        "wallet_address": fields_of(hops.INVITE)["wallet_address"],
        "payout_currency": "link", "payout_network": "eth", "payment_amount_usd": 52.38, "subscription_id": 412,
        "payment_timestamp": "2026-11-28T10:51:01.250000", "nowpayments_payment_id": next(_ids),
        "nowpayments_pay_address": "0x9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
        "nowpayments_outcome_amount": "0.0161"})


def instant_split(w: World) -> Req:
    signed = tokens.encode(hops.INSTANT_SPLIT, {**fields_of(hops.INSTANT_SPLIT), "payment_id": str(next(_ids))}, KEYS)
    return Req("POST", "/", signed["body"].encode())


def paid_subscription(w: World) -> dict:
    """gcwebhook2: the subscription row np-webhook leaves for a payment; the extra body field."""
    payment_id = next(_ids)
    invite = fields_of(hops.INVITE)
    w.sql("INSERT INTO private_channel_users_database (user_id, private_channel_id, nowpayments_payment_id,"
          " nowpayments_payment_status, nowpayments_outcome_amount_usd, nowpayments_price_amount)"
          " VALUES (%s, %s, %s, 'finished', 13.800552, 15)", (invite["user_id"], CLOSED_CHANNEL, str(payment_id)))
    return {"payment_id": payment_id}


def swapping_batch(w: World) -> dict:
    """gcmicrobatchprocessor: credits claimed into a batch whose swap is under way; the T16 fields."""
    add_credit(w, "30", "0.01")
    trigger = ROUTES["gcmicrobatchprocessor", "POST", "/check-threshold"]
    answer = w.send(Req("POST", "/check-threshold", b"", None), trigger, extra_headers=w.bearer())
    assert answer.status_code == 200 and answer.json["batch_created"], answer.json
    with w.database.transaction() as tx:
        batch = tx.fetchone("SELECT batch_conversion_id, cn_api_id FROM batch_conversions")
    return {"batch_conversion_id": str(batch["batch_conversion_id"]), "cn_api_id": batch["cn_api_id"],
            "tx_hash": TX_HASH, "actual_usdt_received": 29.0}


def payout_batch(w: World) -> dict:
    """gchostpay1: a threshold payout batch at 'processing' whose transfer GCHostPay3 reports done."""
    unique_id, batch_id = new_uid(), str(uuid.uuid4())
    w.sql("INSERT INTO payout_batches (batch_id, client_id, client_wallet_address, client_payout_currency,"
          " client_payout_network, total_amount_usdt, total_payments_count, status, processing_started_at)"
          " VALUES (%s, %s, %s, 'LINK', 'ETH', 120.5, 3, 'processing', NOW())",
          (batch_id, CLOSED_CHANNEL, HOST_USDT_WALLET))
    w.sql("INSERT INTO split_payout_request (unique_id, user_id, idempotency_key) VALUES (%s, 0, %s)",
          (unique_id, f"batch:{batch_id}"))
    return {"unique_id": unique_id, "tx_hash": TX_HASH}


def due_threshold_balance(w: World) -> None:
    """gcbatchprocessor: a threshold channel whose converted balance reached its threshold."""
    register_channel(w, "threshold", "50.00")
    w.sql("UPDATE main_clients_database SET client_payout_currency = 'link', client_payout_network = 'eth'")
    add_credit(w, "60", "0.02", status="completed")


# ---------------------------------------------------------------- the route table


TOKEN, SIGNED_JSON, TRIGGER, QUERY_TOKEN, QUERY, PAGE = (
    "token", "signed json", "trigger", "query token", "query", "page")


@dataclass(frozen=True)
class Route:
    """How to build a valid request for one endpoint, and what it is."""

    kind: str
    hop: tokens.Hop | None = None
    accepts: tuple = ()  # further hops the endpoint takes by design (token kinds)
    fields: Callable[[World], dict] | None = None  # token fields beyond the legacy vector's (may arrange state)
    extra_body: Callable[[World], dict] | None = None  # JSON keys besides "token" (may arrange state)
    build: Callable[[World], Req] | None = None  # non-token kinds: the valid request (may arrange state)
    required: tuple = ()  # SIGNED_JSON: fields whose absence must be refused
    typed: tuple = ()  # SIGNED_JSON: fields whose value must have the right JSON type
    body_signature: tuple | None = None  # (header, key name, digest): the route's own body HMAC
    effect: tuple = ("db", "task")  # what a valid first delivery changes
    replay_reads: dict = field(default_factory=dict)  # stand-in a redelivery may ask again -> why
    shape_status: int = 400  # the answer to a body that is not the expected JSON object
    blank_is_default: tuple = ()  # SIGNED_JSON: fields whose blank value means the legacy default
    content_type_free: bool = False  # the signed bytes are read whatever the Content-Type
    public: str | None = None  # why the route has no transport authentication

    def valid(self, w: World, path: str) -> Req:
        """The valid request, arranging the state it needs once per World (its token fields are kept)."""
        if self.kind in (TOKEN, QUERY_TOKEN):
            w.token_fields = {**fields_of(self.hop), **(self.fields(w) if self.fields else {})}
            w.extra_body = self.extra_body(w) if self.extra_body else {}
            if self.kind == QUERY_TOKEN:
                return Req("GET", path, None, None, query={"token": self.mint(w)})
            return json_req(path, {"token": self.mint(w), **w.extra_body})
        return self.build(w)

    def mint(self, w: World, *, now: float | None = None, keys=KEYS, hop=None) -> str:
        """A token of this route's hop with the World's fields (or of another hop, with its vector's)."""
        hop = hop or self.hop
        return tokens.encode(hop, w.token_fields if hop is self.hop else fields_of(hop), keys, now=now)

    def signature_headers(self, w: World, raw: bytes) -> dict:
        if self.body_signature is None:
            return w.transport_headers(raw)
        header, key, digest = self.body_signature
        return {header: hmac_hex(KEYS[key], raw, digest)}


IPN_SIGNATURE = (hops.SIGNATURE_HEADERS[hops.NOWPAYMENTS_IPN.name], hops.IPN_KEY, "sha512")
T3_SIGNATURE = (hops.SIGNATURE_HEADERS[hops.INSTANT_SPLIT.name], hops.SUCCESS_KEY, "sha256")
STATELESS_QUOTE = "stateless: a redelivery asks ChangeNOW again (a read); the task name stops a second report"
UNFUNDED_EXCHANGE = ("stateless by design (services/gcsplit3/app.py): a redelivery creates a second, never funded"
                     " exchange; the task name stops its report, GCSplit1 records only the first")
HEALTH = "liveness probe: reads nothing from the request"

ROUTES: dict[tuple[str, str, str], Route] = {
    ("npwebhook", "POST", "/"): Route(
        SIGNED_JSON, build=ipn, body_signature=IPN_SIGNATURE,
        replay_reads={"price requests": "the USD price is looked up before the payment's row says it was forwarded"},
        required=("payment_id", "order_id", "payment_status"),
        typed=("payment_id", "order_id", "payment_status", "outcome_amount", "price_amount", "pay_amount"),
        public="NowPayments calls it: authenticated by its own x-nowpayments-sig HMAC-SHA512 of the body"),
    ("npwebhook", "GET", "/api/payment-status"): Route(
        QUERY, build=lambda w: (register_channel(w), Req("GET", "/api/payment-status", None, None,
                                                         query={"order_id": f"PGP-6271402111|{OPEN_CHANNEL}"}))[1],
        effect=(), public="the customer's browser polls it; it answers only pending/confirmed/failed"),
    ("npwebhook", "GET", "/payment-processing"): Route(
        PAGE, build=lambda w: Req("GET", "/payment-processing", None, None), effect=(),
        public="the static landing page NowPayments redirects the customer to"),
    ("gcwebhook1", "POST", "/process-validated-payment"): Route(
        SIGNED_JSON, build=validated_payment,
        required=("user_id", "closed_channel_id", "wallet_address", "payout_currency", "payout_network",
                  "subscription_time_days", "subscription_price", "outcome_amount_usd", "nowpayments_payment_id",
                  "nowpayments_outcome_amount"),
        typed=("user_id", "closed_channel_id", "wallet_address", "payout_currency", "payout_network",
               "subscription_time_days", "subscription_price", "outcome_amount_usd", "nowpayments_payment_id",
               "nowpayments_outcome_amount", "payment_status")),
    ("gcwebhook1", "GET", "/"): Route(
        QUERY_TOKEN, hops.SUCCESS_URL, effect=("db",),
        public="the legacy success URL a customer's browser opens: authenticated by the T1 token's HMAC"),
    ("gcwebhook2", "POST", "/"): Route(TOKEN, hops.INVITE, extra_body=paid_subscription, effect=("db", "telegram")),
    # The T3 body is itself the signed token: a signed body that is not the T3 object is a rejected
    # token (401), its Content-Type is not signed and not looked at, and a blank payout_mode is
    # read as legacy's default "instant" (services/gcsplit1/rules.py).
    ("gcsplit1", "POST", "/"): Route(SIGNED_JSON, build=instant_split, body_signature=T3_SIGNATURE, effect=("task",),
                                     required=("user_id", "closed_channel_id", "wallet_address", "payout_currency",
                                               "payout_network", "sub_price", "actual_eth_amount", "payout_mode"),
                                     typed=("user_id", "closed_channel_id", "wallet_address", "sub_price",
                                            "actual_eth_amount", "payout_mode", "payment_id"),
                                     shape_status=401, blank_is_default=("payout_mode",), content_type_free=True),
    ("gcsplit1", "POST", "/batch-payout"): Route(
        TOKEN, hops.BATCH_PAYOUT, fields=lambda w: {"batch_id": str(uuid.uuid4())}, effect=("task",)),
    ("gcsplit1", "POST", "/usdt-eth-estimate"): Route(
        TOKEN, hops.ESTIMATE_RESPONSE, fields=lambda w: {"payout_key": f"np:{next(_ids)}"}),
    ("gcsplit1", "POST", "/eth-client-swap"): Route(
        TOKEN, hops.SWAP_RESPONSE, fields=lambda w: {"unique_id": new_uid()}),
    ("gcsplit2", "POST", "/"): Route(
        TOKEN, hops.ESTIMATE_REQUEST, fields=lambda w: {"payout_key": f"np:{next(_ids)}"}, effect=("task",),
        replay_reads={"changenow requests": STATELESS_QUOTE}),
    ("gcsplit3", "POST", "/"): Route(
        TOKEN, hops.SWAP_REQUEST, fields=lambda w: {"unique_id": new_uid()}, effect=("task",),
        replay_reads={"changenow requests": UNFUNDED_EXCHANGE}),
    ("gcsplit3", "POST", "/eth-to-usdt"): Route(
        TOKEN, hops.ACCUMULATOR_SWAP_REQUEST, fields=lambda w: {"accumulation_id": next(_ids)}, effect=("task",),
        replay_reads={"changenow requests": UNFUNDED_EXCHANGE}),
    ("gcaccumulator", "POST", "/"): Route(
        SIGNED_JSON, build=threshold_credit, effect=("db",),
        required=("user_id", "client_id", "wallet_address", "payout_currency", "payout_network",
                  "payment_amount_usd", "nowpayments_payment_id"),
        typed=("user_id", "client_id", "wallet_address", "payout_currency", "payout_network", "payment_amount_usd",
               "nowpayments_payment_id", "subscription_id", "payment_timestamp", "nowpayments_outcome_amount")),
    ("gcmicrobatchprocessor", "POST", "/check-threshold"): Route(
        TRIGGER, build=lambda w: (add_credit(w, "30", "0.01"), Req("POST", "/check-threshold", b"", None))[1],
        effect=("db", "task")),
    ("gcmicrobatchprocessor", "POST", "/swap-executed"): Route(
        TOKEN, hops.MICROBATCH_SWAP_EXECUTED, fields=swapping_batch, effect=("db",)),
    ("gcbatchprocessor", "POST", "/process"): Route(
        TRIGGER, build=lambda w: (due_threshold_balance(w), Req("POST", "/process", b"", None))[1]),
    ("gchostpay1", "POST", "/"): Route(
        TOKEN, hops.HOSTPAY_ORDER, accepts=(hops.MICROBATCH_ORDER, hops.ACCUMULATOR_HOSTPAY_ORDER),
        fields=lambda w: {"unique_id": new_uid()}, effect=("task",)),
    ("gchostpay1", "POST", "/status-verified"): Route(
        TOKEN, hops.STATUS_VERIFIED, fields=lambda w: {"unique_id": new_uid(), "cn_api_id": open_exchange(w)},
        effect=("task",),
        replay_reads={"changenow requests": "a 'waiting' report is re-checked at ChangeNOW on every delivery"}),
    ("gchostpay1", "POST", "/payment-completed"): Route(TOKEN, hops.PAYMENT_COMPLETED, fields=payout_batch,
                                                        effect=("db",)),
    ("gchostpay1", "POST", "/retry-callback-check"): Route(
        TOKEN, hops.CALLBACK_RETRY, fields=lambda w: {"unique_id": f"batch_{uuid.uuid4()}",
                                                      "cn_api_id": open_exchange(w, "exchanging")},
        effect=("task",),
        replay_reads={"changenow requests": "each re-check reads the conversion's status at ChangeNOW"}),
    ("gchostpay2", "POST", "/"): Route(
        TOKEN, hops.STATUS_CHECK, fields=lambda w: {"unique_id": new_uid(), "cn_api_id": open_exchange(w)},
        effect=("task",), replay_reads={"changenow requests": STATELESS_QUOTE}),
    ("gchostpay3", "POST", "/"): Route(
        TOKEN, hops.EXECUTE_PAYMENT, accepts=(hops.EXECUTE_RETRY,),
        fields=lambda w: {"unique_id": new_uid(), "payin_address": "0x" + secrets.token_hex(20)},
        effect=("db", "task", "chain")),
    **{(service, "GET", "/health"): Route(PAGE, build=lambda w: Req("GET", "/health", None, None), effect=(),
                                          public=HEALTH) for service in SERVICES},
}
PUBLIC = {key: route.public for key, route in ROUTES.items() if route.public}
AUTHENTICATED = [key for key in ROUTES if key not in PUBLIC]


def route_id(key) -> str:
    return " ".join(key)


# ---------------------------------------------------------------- hostile variants


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


def same_key_hops(route: Route) -> list[tokens.Hop]:
    """Tokens of other hops under the same key and with another layout: they must never pass as this hop's."""
    own = (route.hop, *route.accepts)
    return [hop for hop in hops.HOPS.values()
            if hop.wire != tokens.JSON_HMAC_HEX and hop.key == route.hop.key and hop not in own
            and all(hop.fields != other.fields for other in own)]


def token_variants(w: World, route: Route) -> dict[str, object]:
    """Values put where the valid token goes: every way a token can be wrong."""
    hop, good = route.hop, route.mint(w)
    raw = unb64(good)
    variants = {
        "token null": None, "token number": 12345, "token empty": "", "token blank": "   ",
        "token list": [good], "token object": {"token": good}, "token bool": True,
        "token not base64": "!!not*base64!!", "token huge": "A" * 20000,
        "payload byte flipped": b64(flip(raw, 0)), "middle byte flipped": b64(flip(raw, len(raw) // 2)),
        "signature byte flipped": b64(flip(raw, len(raw) - 1)),
        "signature stripped": b64(raw[:-tokens.SIG_LEN]),
        "truncated by 1 byte": b64(raw[:-1]), "truncated to half": b64(raw[:len(raw) // 2]),
        "truncated to 5 bytes": b64(raw[:5]), "truncated text": good[:-1],
        "signed with the wrong key": route.mint(w, keys={hop.key: "not-the-signing-key"}),
    }
    if hop.style != tokens.SIG_AT_OFFSET:  # legacy style C reads the signature at its offset, ignores what follows
        variants["extended by 1 byte"] = b64(raw + b"\0")
    if hop.window is not None:
        variants["expired"] = route.mint(w, now=time.time() - hop.window[0] - 120)
        variants["future-dated beyond the skew"] = route.mint(w, now=time.time() + hop.window[1] + 180)
    for other in same_key_hops(route):
        variants[f"token of {other.name}"] = route.mint(w, hop=other)
    return variants


def hostile_requests(w: World, route: Route, valid: Req) -> dict[str, tuple[Req, int | None]]:
    """name -> (request, the one 4xx status it must get, or None for any 4xx)."""
    path, method = valid.path, valid.method
    out: dict[str, tuple[Req, int | None]] = {}
    if route.kind in (TOKEN, SIGNED_JSON):
        shape = route.shape_status
        out.update({
            "body not JSON": (valid.with_body(b'{"token": "abc"', ), shape),
            "body binary": (valid.with_body(b"\xff\xfe\x00garbage"), shape),
            "form-encoded body": (valid.with_body(b"token=abc", content_type="application/x-www-form-urlencoded"),
                                  shape),
            "no body": (valid.with_body(b""), shape),
            "JSON list": (valid.with_body(b"[]"), shape), "JSON string": (valid.with_body(b'"token"'), shape),
            "JSON null": (valid.with_body(b"null"), shape), "JSON number": (valid.with_body(b"42"), shape),
            "JSON NaN": (valid.with_body(b'{"token": NaN}'), shape),
            "JSON nested 20000 deep": (valid.with_body(b"[" * 20000 + b"]" * 20000), shape),
            "oversize body": (valid.with_body(valid.body[:-1] + b', "padding": "' + b"x" * BODY_LIMIT + b'"}'), 413),
        })
        if not route.content_type_free:
            out["text/plain JSON"] = (valid.with_body(valid.body, content_type="text/plain"), 400)
    if route.kind == TOKEN:
        body = json.loads(valid.body)
        out["missing token"] = (json_req(path, {k: v for k, v in body.items() if k != "token"}), 400)
        out["token under another key"] = (json_req(path, {**{k: v for k, v in body.items() if k != "token"},
                                                          "tok": body["token"]}), 400)
        for name, value in token_variants(w, route).items():
            expected = 400 if name in ("token null", "token empty", "token blank") else 401
            out[name] = (json_req(path, {**body, "token": value}), expected)
        for extra in w.extra_body:
            for name, value in (("missing", ...), ("null", None), ("list", []), ("text", "abc"), ("negative", -5),
                                ("zero", 0), ("bool", True), ("object", {})):
                changed_body = {k: v for k, v in body.items() if k != extra} if value is ... else {**body, extra: value}
                out[f"{extra} {name}"] = (json_req(path, changed_body), 400)
    if route.kind == SIGNED_JSON:
        body = json.loads(valid.body)

        def variant(new_body) -> Req:
            return valid.with_body(json.dumps(new_body, sort_keys=route.body_signature == IPN_SIGNATURE).encode())

        for name in route.required:
            out[f"missing {name}"] = (variant({k: v for k, v in body.items() if k != name}), shape)
            if name not in route.blank_is_default:
                out[f"blank {name}"] = (variant({**body, name: ""}), None)  # a type or a value error
        for name in route.typed:
            for kind, value in (("list", [1]), ("object", {"a": 1}), ("bool", True)):
                out[f"{name} {kind}"] = (variant({**body, name: value}), shape)
        unauthorized = 403 if route.body_signature == IPN_SIGNATURE else 401
        header = (route.body_signature or (SIGNATURE_HEADER,))[0]
        if route.body_signature is not None or "hmac" in w.auth_mode:
            key = KEYS[route.body_signature[1]] if route.body_signature else KEYS[hops.SUCCESS_KEY]
            digest = route.body_signature[2] if route.body_signature else "sha256"
            good = hmac_hex(key, valid.body, digest)
            out.update({
                "signature missing": (replace(valid, signed=False), unauthorized),
                "signature empty": (replace(valid, signed=False, headers={header: ""}), unauthorized),
                "signature byte flipped": (replace(valid, signed=False, headers={header: good[:-1] + (
                    "0" if good[-1] != "0" else "1")}), unauthorized),
                "signature truncated": (replace(valid, signed=False, headers={header: good[:-2]}), unauthorized),
                "signature with the wrong key": (replace(valid, signed=False, headers={
                    header: hmac_hex("not-the-signing-key", valid.body, digest)}), unauthorized),
                "signature of another body": (replace(valid, signed=False, headers={
                    header: hmac_hex(key, valid.body + b" ", digest)}), unauthorized),
                "signature not hex": (replace(valid, signed=False, headers={header: "zz" * len(good)}), unauthorized),
            })
    if route.kind == TRIGGER:
        out["oversize body"] = (valid.with_body(b"x" * (BODY_LIMIT + 1)), 413)
    if route.kind == QUERY_TOKEN:
        good = route.mint(w)
        out["missing token"] = (replace(valid, query={}), 400)
        out["empty token"] = (replace(valid, query={"token": ""}), 400)
        for name, value in token_variants(w, route).items():
            if isinstance(value, str) and value.strip():
                out[name] = (replace(valid, query={"token": value}), 401)
        repeated = urllib.parse.urlencode([("token", good[:-2] + "AA"), ("token", good)])
        out["token repeated, the first tampered"] = (replace(valid, query=repeated), 401)
    if route.kind == QUERY:
        for name, value in (("missing", None), ("empty", ""), ("blank", "   "), ("not an order id", "abc"),
                            ("SQL", "PGP-1|1' OR '1'='1"), ("no user", "PGP-0|-100123"), ("huge", "PGP-" + "9" * 5000),
                            ("NUL", "PGP-1\x00|-100"), ("unknown channel", "PGP-6271402111|-1009999999999")):
            out[f"order_id {name}"] = (replace(valid, query={} if value is None else {"order_id": value}), None)
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def coingecko():
    from services.npwebhook.coingecko_standin import CoinGeckoStandIn

    with CoinGeckoStandIn() as standin:
        yield standin


@pytest.fixture
def telegram():
    from telepay_shared.standins.telegram import TelegramStandIn

    with TelegramStandIn(tokens=(BOT_TOKEN,)) as standin:
        yield standin


@pytest.fixture
def world(service_env, load_service_config, tasks, database_url, database, changenow, deliveries, coingecko,
          telegram, oidc):
    """build(service, auth_mode=None): the service on the real parts, in its declared auth mode by default."""
    fixtures = dict(service_env=service_env, load_service_config=load_service_config, tasks=tasks,
                    database_url=database_url, database=database, changenow=changenow, deliveries=deliveries,
                    coingecko=coingecko, telegram=telegram, oidc=oidc)
    return lambda service, auth_mode=None: World(service, fixtures, auth_mode)


@pytest.fixture(scope="module", autouse=True)
def report_requests():
    yield
    variants = SENT["variants"]
    print(f"\nhostile sweep: {SENT['requests']} requests sent; hostile variants per route ({sum(variants.values())}):")
    for name, count in variants.items():
        print(f"  {count:3d}  {name}")


def route_world(world, key, auth_mode: str | None = None):
    """The route under key, a world for its service (declared auth mode by default), the route's valid request."""
    service, _, path = key
    route = ROUTES[key]
    w = world(service, auth_mode)
    return route, w, route.valid(w, path)


def assert_refused(w: World, route: Route, attempts: dict) -> dict:
    """Send each named (request, extra headers): each answers 401 and changes nothing; the answers by name."""
    answers = {}
    for name, (req, headers) in attempts.items():
        before = w.state()
        answer = w.send(req, route, extra_headers=headers)
        assert answer.status_code == 401, (name, answer.get_data()[:300])
        assert changed(before, w.state()) == [], name
        answers[name] = answer
    return answers


def refusal_problems(answer, expected: int | None) -> list[str]:
    """Why an answer is not a proper refusal: 4xx (the expected one), JSON naming the error and saying why."""
    problems = []
    if not 400 <= answer.status_code < 500:
        problems.append(f"status {answer.status_code}")
    elif expected is not None and answer.status_code != expected:
        problems.append(f"status {answer.status_code}, expected {expected}")
    body = answer.get_json(silent=True)
    if not isinstance(body, dict) or body.get("status") != "error" or not body.get("error") or not body.get("message"):
        problems.append(f"body does not name the reason: {answer.get_data()[:200]!r}")
    return problems


# ---------------------------------------------------------------- the tests


def test_every_route_of_every_service_is_swept(world):
    served = set()
    for service in SERVICES:
        w = world(service)
        served |= {(service, method, rule.rule) for rule in w.app.url_map.iter_rules()
                   for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert served - ROUTES.keys() == set(), "routes missing from ROUTES: add them to the sweep"
    assert ROUTES.keys() - served == set(), "ROUTES names routes no service serves"


@pytest.mark.parametrize("key", list(ROUTES), ids=route_id)
def test_hostile_requests_are_refused_without_effect(world, key):
    route, w, valid = route_world(world, key)
    variants = hostile_requests(w, route, valid)
    if route.kind == PAGE:
        # No input at all: junk must still change nothing (the answer is the page itself).
        before = w.state()
        answer = w.send(replace(valid, query={"x": "' OR 1=1 --", "token": "A" * 5000}), route)
        assert answer.status_code in (200, 503) and w.state() == before
        return
    assert variants, f"{route_id(key)}: no hostile variant applies"
    SENT["variants"][route_id(key)] = len(variants)
    failures = []
    for name, (req, expected) in variants.items():
        before = w.state()
        answer = w.send(req, route)
        problems = refusal_problems(answer, expected)
        effects = changed(before, w.state())
        if effects:
            problems.append(f"changed {effects}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)} -> {answer.get_data()[:160]!r}")
    assert not failures, f"{route_id(key)}: {len(failures)}/{len(variants)} hostile requests misanswered:\n" + \
        "\n".join(failures)
    # The variants were refused for what they are: the valid request they were derived from passes.
    answer = w.send(valid, route)
    assert 200 <= answer.status_code < 300, answer.get_data()[:300]


REPLAYED = [key for key, route in ROUTES.items() if route.effect]


@pytest.mark.parametrize("key", REPLAYED, ids=route_id)
def test_a_replayed_request_has_no_second_effect(world, key):
    """The second delivery of the same bytes answers 2xx (a Cloud Tasks redelivery) and changes nothing."""
    route, w, valid = route_world(world, key)
    before = w.state()
    first = w.send(valid, route)
    assert 200 <= first.status_code < 300, first.get_data()[:300]
    after_first = w.state()
    effects = changed(before, after_first)
    expected = {"db": lambda: any(not k.startswith(("tasks", "deliveries", "changenow", "telegram", "price", "chain"))
                                  for k in effects),
                "task": lambda: any(k.startswith("tasks") for k in effects),
                "telegram": lambda: "telegram requests" in effects, "chain": lambda: "chain height" in effects}
    assert all(expected[kind]() for kind in route.effect), f"first delivery changed only {effects}"
    time.sleep(1.1)  # a second later: a re-stamped NOW() would show
    second = w.send(valid, route)
    assert 200 <= second.status_code < 300, second.get_data()[:300]
    after_second = w.state()
    for read in route.replay_reads:
        after_second[read] = after_first[read]
    # An idempotent INSERT ... ON CONFLICT DO NOTHING draws a sequence value and writes no row.
    second_effects = [k for k in changed(after_first, after_second) if not k.startswith("sequence ")]
    assert second_effects == [], second.get_data()[:300]


@pytest.mark.parametrize("key", AUTHENTICATED, ids=route_id)
def test_declared_auth_refuses_requests_without_credentials(world, key):
    route, w, valid = route_world(world, key)
    path = key[2]
    unsigned = replace(valid, signed=False)
    if w.auth_mode == "none" and route.kind != SIGNED_JSON:
        # The token's HMAC is the only credential: strip it, or sign with another key.
        assert route.kind == TOKEN, f"{route_id(key)} has no credential at all in its declared mode"
        body = json.loads(valid.body)
        stripped = b64(unb64(body["token"])[:-tokens.SIG_LEN])
        forged = route.mint(w, keys={route.hop.key: "not-the-signing-key"})
        attempts = {
            "no credentials": (json_req(path, {**body, "token": stripped}), {}),
            "wrong HMAC": (json_req(path, {**body, "token": forged}),
                           {SIGNATURE_HEADER: hmac_hex("not-the-signing-key", valid.body)}),
            "garbage Bearer": (json_req(path, {**body, "token": forged}),
                               {"Authorization": "Bearer garbage.garbage.x"}),
        }
    else:
        attempts = {
            "no credentials": (unsigned, {}),
            "wrong HMAC": (unsigned, {SIGNATURE_HEADER: hmac_hex("not-the-signing-key", valid.body or b"")}),
            "garbage Bearer": (unsigned, {"Authorization": "Bearer garbage.garbage.x"}),
        }
    for name, answer in assert_refused(w, route, attempts).items():
        assert refusal_problems(answer, 401) == [], name
    assert 200 <= w.send(valid, route).status_code < 300  # the same request with its credential passes


@pytest.mark.parametrize("key", AUTHENTICATED, ids=route_id)
def test_oidc_mode_demands_the_callers_identity(world, oidc, key):
    route, w, valid = route_world(world, key, "oidc")
    hmac_only = {SIGNATURE_HEADER: hmac_hex(KEYS[hops.SUCCESS_KEY], valid.body or b"")}
    bearers = {
        "garbage bearer": "x.y.z",
        "bearer for another service": oidc.issuer.mint("https://other.example", OIDC_CALLER),
        "bearer of another caller": oidc.issuer.mint(w.audience, "intruder@telepay-test.iam.gserviceaccount.com"),
        "expired bearer": oidc.issuer.mint(w.audience, OIDC_CALLER, now=time.time() - 7200),
        "bearer with an unverified email": oidc.issuer.mint(w.audience, OIDC_CALLER, email_verified=False),
        "bearer signed by another key": OidcIssuer().mint(w.audience, OIDC_CALLER),
    }
    attempts = {"no bearer": {}, "HMAC instead of a bearer": hmac_only,
                **{name: {"Authorization": f"Bearer {token}"} for name, token in bearers.items()}}
    assert_refused(w, route, {name: (valid, headers) for name, headers in attempts.items()})
    answer = w.send(valid, route, extra_headers=w.bearer())
    assert 200 <= answer.status_code < 300, answer.get_data()[:300]


def test_every_public_route_says_why():
    assert all(isinstance(reason, str) and len(reason) > 20 for reason in PUBLIC.values())
    money_movers = {key for key, route in ROUTES.items() if route.effect and key in PUBLIC}
    # The two that write state without transport authentication each carry an HMAC of their own.
    assert money_movers == {("npwebhook", "POST", "/"), ("gcwebhook1", "GET", "/")}
