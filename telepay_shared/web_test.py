"""Tests of telepay_shared.web: error mapping, bodies, health, HMAC/OIDC auth, JSON logs, gunicorn."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from decimal import Decimal
from types import SimpleNamespace

import pytest
import requests

from telepay_shared import web
from telepay_shared.config import Config, Secret
from telepay_shared.errors import (
    BadRequest, ConfigError, Conflict, NotFound, RateLimited, TokenRejected, TransientError, Unauthorized,
)
from telepay_shared.testing.oidc import CertsServer, CertsTransport, OidcIssuer

AUDIENCE = "https://gcsplit1-abc-uc.a.run.app"
TASKS_EMAIL = "cloud-tasks@telepay-test.iam.gserviceaccount.com"
HMAC_KEY = "webhook-signing-key-0123456789"
DB_PASSWORD = "db-password-hunter2"
TRACE_ID = "105445aa7843bc8bf206b12000100000"


@pytest.fixture(scope="module")
def google_key():
    """The local issuer standing in for Google's ID-token signing key."""
    return OidcIssuer()


def mint(issuer: OidcIssuer, **overrides) -> str:
    """Mints an RS256 ID token shaped like the ones Cloud Tasks sends to AUDIENCE."""
    return issuer.mint(AUDIENCE, TASKS_EMAIL, **overrides)


@pytest.fixture
def log_stream():
    """Installs the JSON logger on a buffer and removes it afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = web.configure_logging("probe", [Secret("DB", DB_PASSWORD), HMAC_KEY], project_id="telepay-test",
                                    stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def log_lines(stream) -> list[dict]:
    """Parses every line written by the JSON logger (each must be one JSON object)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def certs(google_key):
    return google_key.transport()


def build_app(certs_transport, **create_options):
    """A probe service with one route per behaviour under test."""
    app = web.create_app("probe", **create_options)
    oidc = web.AuthPolicy("oidc", (AUDIENCE,), (TASKS_EMAIL,), certs_transport=certs_transport)
    signed = web.AuthPolicy("hmac", hmac_secret=Secret("KEY", HMAC_KEY))
    either = web.AuthPolicy("oidc_or_hmac", (AUDIENCE,), (TASKS_EMAIL,), HMAC_KEY, certs_transport=certs_transport)
    failures = {
        "bad_request": BadRequest("amount must be positive", field="amount", status="ignored"),
        "token": TokenRejected("expired", "token is too old"),
        "rate": RateLimited("ChangeNOW asks us to wait", retry_after_s=2.2),
        "rate_unknown": RateLimited("slow down"),
        "transient": TransientError("database unavailable"),
        "not_found": NotFound("no such exchange", cn_api_id="abc123"),
        "conflict": Conflict("already processed", payout_id=SimpleNamespace(id=7)),
        "crash": RuntimeError(f"connect failed with password {DB_PASSWORD}"),
    }

    @app.get("/fail/<kind>")
    def fail(kind):
        raise failures[kind]

    @app.post("/echo")
    def echo():
        body = web.json_body()
        user_id, wallet = web.require_fields(body, "user_id", "wallet")
        return {"user_id": user_id, "wallet": wallet, "amount": body.get("amount")}

    @app.post("/log")
    def log_route():
        web.bind_log_context(payment_id="np-42")
        logging.getLogger("probe.route").info("processing payout", extra={"unique_id": "UNQ123"})
        return {"status": "ok"}

    for path, policy in (("/oidc", oidc), ("/hmac", signed), ("/either", either), ("/open", web.AuthPolicy("none"))):
        app.add_url_rule(path, path, policy.required(lambda: {"status": "ok", **flask_g_context()}), methods=["POST"])
    return app


def flask_g_context() -> dict:
    """Returns the authenticated caller recorded in the request's log context."""
    import flask

    return {k: v for k, v in flask.g.telepay_log_context.items() if k in ("auth", "caller")}


@pytest.fixture
def client(certs):
    return build_app(certs).test_client()


# ---------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    "kind, status, code, message, details",
    [
        ("bad_request", 400, "bad_request", "amount must be positive", {"field": "amount"}),
        ("token", 401, "token_rejected", "token is too old", {"reason": "expired"}),
        ("rate", 429, "rate_limited", "ChangeNOW asks us to wait", {}),
        ("transient", 503, "unavailable", "database unavailable", {}),
        ("not_found", 404, "not_found", "no such exchange", {"cn_api_id": "abc123"}),
        ("conflict", 409, "conflict", "already processed", {"payout_id": "namespace(id=7)"}),
    ],
)
def test_typed_errors_map_to_their_status_and_json(client, kind, status, code, message, details):
    response = client.get(f"/fail/{kind}")
    assert response.status_code == status
    assert response.get_json() == {"status": "error", "error": code, "message": message, **details}
    assert list(response.get_json())[:3] == ["status", "error", "message"]


def test_rate_limited_answers_retry_after_rounded_up_or_the_queue_backoff(client):
    assert client.get("/fail/rate").headers["Retry-After"] == "3"
    assert client.get("/fail/rate_unknown").headers["Retry-After"] == str(web.DEFAULT_RETRY_AFTER_S)
    assert "Retry-After" not in client.get("/fail/transient").headers


def test_unexpected_exception_is_a_bare_500_and_its_traceback_is_logged_redacted(client, log_stream):
    response = client.get("/fail/crash")
    assert response.status_code == 500
    assert response.get_json() == {"status": "error", "error": "internal_error", "message": "internal error"}
    assert DB_PASSWORD not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    [line] = [entry for entry in log_lines(log_stream) if entry["severity"] == "ERROR"]
    assert "RuntimeError: connect failed with password ***" in line["stack_trace"]
    assert DB_PASSWORD not in log_stream.getvalue()


@pytest.mark.parametrize(
    "method, path, status, code, allowed",
    [("get", "/no-such-route", 404, "not_found", None), ("get", "/echo", 405, "method_not_allowed", "POST"),
     ("delete", "/health", 405, "method_not_allowed", "GET")],
)
def test_werkzeug_errors_use_the_same_json_shape(client, method, path, status, code, allowed):
    response = getattr(client, method)(path)
    assert response.status_code == status and response.is_json
    assert response.get_json()["status"] == "error" and response.get_json()["error"] == code
    assert (allowed is None) == ("Allow" not in response.headers)
    assert allowed is None or allowed in response.headers["Allow"]


def test_oversize_body_is_refused_with_413_json(certs):
    client = build_app(certs, max_body_bytes=1024).test_client()
    response = client.post("/echo", json={"user_id": 1, "wallet": "0xabc", "pad": "x" * 2000})
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert client.post("/echo", json={"user_id": 1, "wallet": "0xabc", "pad": "x" * 100}).status_code == 200
    # Refused before any view runs, even one that never reads its body.
    assert client.post("/log", data="x" * 2000, content_type="text/plain").status_code == 413


# ---------------------------------------------------------------- request bodies


@pytest.mark.parametrize(
    "data, content_type, reason",
    [
        ('{"user_id": 1}', "text/plain", "expected Content-Type: application/json"),
        ("", None, "expected Content-Type: application/json"),
        ('{"user_id": 1,', "application/json", "request body is not valid JSON"),
        ("", "application/json", "request body is not valid JSON"),
        ('{"amount": NaN}', "application/json", "request body is not valid JSON"),
        ("[1, 2]", "application/json", "JSON body must be an object, not an array"),
        ("null", "application/json", "JSON body must be an object, not null"),
        ('"text"', "application/json", "JSON body must be an object, not a string"),
        ("12.5", "application/json", "JSON body must be an object, not a number"),
        ('{"user_id": 7}', "application/json", "missing required fields: wallet"),
        ('{"wallet": "  ", "user_id": null}', "application/json", "missing required fields: user_id, wallet"),
    ],
)
def test_bad_bodies_answer_400_with_the_reason(client, data, content_type, reason):
    response = client.post("/echo", data=data, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request" and response.get_json()["message"] == reason


def test_missing_fields_are_listed_in_the_body(client):
    response = client.post("/echo", json={"amount": 1})
    assert response.get_json()["missing"] == ["user_id", "wallet"]


def test_good_body_keeps_amounts_exact(client):
    response = client.post("/echo", data='{"user_id": 0, "wallet": "0xabc", "amount": 0.1000000000000000055511}',
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 200
    assert response.get_json() == {"user_id": 0, "wallet": "0xabc", "amount": "0.1000000000000000055511"}


# ---------------------------------------------------------------- health


def test_health_reports_each_check_and_degrades_to_503(certs):
    def database_down():
        raise ConnectionError(f"password {DB_PASSWORD} refused")

    healthy = build_app(certs, health_checks={"database": lambda: True, "tasks": lambda: None}).test_client()
    response = healthy.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "healthy", "service": "probe",
                                   "checks": {"database": "ok", "tasks": "ok"}}
    degraded = build_app(certs, health_checks={"database": database_down, "tasks": lambda: False, "ok": lambda: 1})
    response = degraded.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "degraded", "service": "probe",
                                   "checks": {"database": "fail", "tasks": "fail", "ok": "ok"}}
    assert DB_PASSWORD not in response.get_data(as_text=True)
    assert build_app(certs).test_client().get("/health").get_json()["checks"] == {}


# ---------------------------------------------------------------- HMAC


def signed_post(client, path, body: bytes, key=HMAC_KEY, algorithm="sha256", header="X-Webhook-Signature", **headers):
    """POSTs body with an HMAC header computed with key."""
    signature = hmac.new(key.encode(), body, algorithm).hexdigest()
    return client.post(path, data=body, content_type="application/json", headers={header: signature, **headers})


def test_hmac_accepts_a_correct_signature_in_any_hex_case(client):
    body = b'{"user_id": 1}'
    assert signed_post(client, "/hmac", body).get_json() == {"status": "ok", "auth": "hmac"}
    upper = hmac.new(HMAC_KEY.encode(), body, "sha256").hexdigest().upper()
    response = client.post("/hmac", data=body, content_type="application/json",
                           headers={"X-Webhook-Signature": upper})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "missing X-Webhook-Signature header"),
        ({"X-Webhook-Signature": "   "}, "missing X-Webhook-Signature header"),
        ({"X-Webhook-Signature": "00" * 32}, "X-Webhook-Signature does not match the request body"),
        ({"X-Webhook-Signature": "zz-not-hex-ü"}, "X-Webhook-Signature does not match the request body"),
        ({"X-Webhook-Signature": hmac.new(b"other-key", b'{"user_id": 1}', "sha256").hexdigest()},
         "X-Webhook-Signature does not match the request body"),
        ({"X-Webhook-Signature": hmac.new(HMAC_KEY.encode(), b'{"user_id": 2}', "sha256").hexdigest()},
         "X-Webhook-Signature does not match the request body"),
    ],
)
def test_hmac_rejects_missing_or_wrong_signatures(client, headers, message):
    response = client.post("/hmac", data=b'{"user_id": 1}', content_type="application/json", headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"status": "error", "error": "unauthorized", "message": message}


def test_verify_hmac_header_supports_other_algorithms_and_refuses_an_empty_key(certs):
    app = build_app(certs)
    body = b'{"payment_id": 1}'
    signature = hmac.new(b"ipn-secret", body, hashlib.sha512).hexdigest()
    with app.test_request_context("/", method="POST", data=body, headers={"x-nowpayments-sig": signature}):
        web.verify_hmac_header(b"ipn-secret", "x-nowpayments-sig", "sha512")
        with pytest.raises(Unauthorized):
            web.verify_hmac_header(b"ipn-secret", "x-nowpayments-sig", "sha256")
        with pytest.raises(ValueError, match="HMAC key is empty"):
            web.verify_hmac_header("", "x-nowpayments-sig", "sha512")


def test_sign_body_makes_the_header_verify_hmac_header_accepts(client):
    body = b'{"user_id": 1}'
    headers = web.sign_body(body, Secret("KEY", HMAC_KEY))
    assert headers == {"X-Webhook-Signature": hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()}
    response = client.post("/hmac", data=body, content_type="application/json", headers=headers)
    assert response.get_json() == {"status": "ok", "auth": "hmac"}


def test_sign_body_names_its_header_and_algorithm_and_refuses_an_empty_key():
    assert web.sign_body(b"{}", b"ipn-secret", "x-nowpayments-sig", "sha512") == {
        "x-nowpayments-sig": hmac.new(b"ipn-secret", b"{}", hashlib.sha512).hexdigest()}
    with pytest.raises(ValueError, match="HMAC key is empty"):
        web.sign_body(b"{}", "")


# ---------------------------------------------------------------- OIDC


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_oidc_accepts_a_cloud_tasks_token(client, google_key):
    response = client.post("/oidc", headers=bearer(mint(google_key)))
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "auth": "oidc", "caller": TASKS_EMAIL}


@pytest.mark.parametrize(
    "claims, logged",
    [
        ({"exp": int(time.time()) - 120, "iat": int(time.time()) - 3720}, "expired"),
        ({"iat": int(time.time()) + 600, "exp": int(time.time()) + 4200}, "too early"),
        ({"aud": "https://attacker.example.com"}, "audience"),
        ({"iss": "https://issuer.example.com"}, "issuer"),
    ],
)
def test_oidc_rejects_invalid_claims(client, google_key, log_stream, claims, logged):
    response = client.post("/oidc", headers=bearer(mint(google_key, **claims)))
    assert response.status_code == 401
    assert response.get_json() == {"status": "error", "error": "unauthorized", "message": "identity token rejected"}
    assert any(logged in line["message"].lower() for line in log_lines(log_stream))


@pytest.mark.parametrize(
    "claims", [{"email": "intruder@evil.iam.gserviceaccount.com"}, {"email_verified": False}, {"email": None}]
)
def test_oidc_rejects_callers_not_allowed(client, google_key, claims):
    response = client.post("/oidc", headers=bearer(mint(google_key, **claims)))
    assert response.status_code == 401 and response.get_json()["message"] == "caller is not allowed"


def test_oidc_rejects_a_token_signed_by_another_key(client):
    forged = mint(OidcIssuer())
    assert client.post("/oidc", headers=bearer(forged)).status_code == 401


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}])
def test_oidc_requires_a_bearer_header(client, headers):
    response = client.post("/oidc", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["message"] == "missing Authorization: Bearer identity token"


def test_malformed_token_is_rejected_without_being_logged(client, log_stream):
    token = "eyJhbGciOiJSUzI1NiJ9.only-two-segments-secretish"
    assert client.post("/oidc", headers=bearer(token)).status_code == 401
    assert token not in log_stream.getvalue() and "identity token rejected" in log_stream.getvalue()


def test_unreachable_google_certs_are_transient(google_key):
    client = build_app(CertsTransport([], status=503)).test_client()
    response = client.post("/oidc", headers=bearer(mint(google_key)))
    assert response.status_code == 503 and response.get_json()["error"] == "unavailable"


def test_certs_are_cached_until_their_ttl(certs, google_key):
    now = [1000.0]
    cached = web.CachedCertsTransport(certs, ttl_s=60, clock=lambda: now[0])
    client = build_app(cached).test_client()
    for _ in range(3):
        assert client.post("/oidc", headers=bearer(mint(google_key))).status_code == 200
    assert len(certs.calls) == 1
    now[0] += 61
    assert client.post("/oidc", headers=bearer(mint(google_key))).status_code == 200
    assert len(certs.calls) == 2


def test_oidc_or_hmac_accepts_either_and_lists_both_reasons(client, google_key):
    body = b'{"user_id": 1}'
    assert client.post("/either", headers=bearer(mint(google_key))).get_json()["auth"] == "oidc"
    assert signed_post(client, "/either", body).get_json()["auth"] == "hmac"
    response = signed_post(client, "/either", body, key="wrong", **bearer(mint(google_key, aud="https://x")))
    assert response.status_code == 401
    assert response.get_json()["message"] == (
        "identity token rejected; X-Webhook-Signature does not match the request body")
    assert client.post("/open").get_json() == {"status": "ok", "auth": "none"}


def test_oidc_certs_come_from_google_unless_tp_oidc_certs_url_names_another_place(google_key, log_stream):
    local = "http://127.0.0.1:9/oauth2/v1/certs"
    for certs_url, expected in ((None, "https://www.googleapis.com/oauth2/v1/certs"), (local, local)):
        transport = google_key.transport()
        config = Config("probe", {"TP_AUTH_MODE": "oidc", "TP_OIDC_AUDIENCES": (AUDIENCE,),
                                  "TP_OIDC_ALLOWED_EMAILS": (TASKS_EMAIL,), "TP_OIDC_CERTS_URL": certs_url})
        policy = web.AuthPolicy.from_config(config, certs_transport=transport)
        app = web.create_app("probe")
        app.add_url_rule("/oidc", "oidc", policy.required(lambda: "ok"), methods=["POST"])
        assert app.test_client().post("/oidc", headers=bearer(mint(google_key))).status_code == 200
        assert transport.calls == [expected]
    warnings = [line["message"] for line in log_lines(log_stream) if line["severity"] == "WARNING"]
    assert warnings == [f"identity tokens are verified with the certificates of {local}, not Google's: "
                        "for the local stack and tests only"]


def test_oidc_verifies_against_a_local_issuer_over_http(google_key):
    """The real certificate fetch (google-auth over requests) from a CertsServer, as the local stack does it."""
    with CertsServer(google_key) as server:
        policy = web.AuthPolicy("oidc", (AUDIENCE,), (TASKS_EMAIL,), certs_url=server.url)
        app = web.create_app("probe")
        app.add_url_rule("/oidc", "oidc", policy.required(lambda: "ok"), methods=["POST"])
        client = app.test_client()
        assert client.post("/oidc", headers=bearer(mint(google_key))).status_code == 200
        assert client.post("/oidc", headers=bearer(mint(OidcIssuer()))).status_code == 401
        assert client.post("/oidc", headers=bearer(mint(google_key, email_verified=False))).status_code == 401
        assert server.requests == 1  # the certificates are cached (CERTS_CACHE_TTL_S)


def test_auth_policy_is_validated_at_start_up():
    with pytest.raises(ConfigError, match="TP_AUTH_MODE must be one of oidc, hmac, oidc_or_hmac, none"):
        web.AuthPolicy("iam")
    with pytest.raises(ConfigError, match="oidc needs TP_OIDC_AUDIENCES; oidc needs TP_OIDC_ALLOWED_EMAILS"):
        web.AuthPolicy("oidc")
    with pytest.raises(ConfigError, match="hmac needs a signing key"):
        web.AuthPolicy("oidc_or_hmac", (AUDIENCE,), (TASKS_EMAIL,), hmac_secret=Secret("K", ""))
    with pytest.raises(ConfigError, match="unknown HMAC algorithm"):
        web.AuthPolicy("hmac", hmac_secret=b"k", hmac_algorithm="md4x")


def test_auth_policy_from_config_reads_the_documented_switch():
    config = Config("probe", {"TP_AUTH_MODE": "oidc_or_hmac", "TP_OIDC_AUDIENCES": (AUDIENCE,),
                              "TP_OIDC_ALLOWED_EMAILS": (TASKS_EMAIL,), "KEY": Secret("KEY", HMAC_KEY)})
    policy = web.AuthPolicy.from_config(config, hmac_secret=config.KEY, hmac_header="X-Signature")
    assert (policy.mode, policy.audiences, policy.allowed_emails, policy.hmac_header) == (
        "oidc_or_hmac", (AUDIENCE,), (TASKS_EMAIL,), "X-Signature")
    assert HMAC_KEY not in repr(policy)
    with pytest.raises(ConfigError, match="oidc needs TP_OIDC_AUDIENCES"):
        web.AuthPolicy.from_config(Config("probe", {}))  # undeclared switch defaults to oidc


# ---------------------------------------------------------------- logging


def test_log_lines_are_cloud_logging_json_with_request_ids(client, log_stream):
    headers = {"X-Cloud-Trace-Context": f"{TRACE_ID}/12345;o=1", "X-CloudTasks-TaskName": "task-7",
               "X-CloudTasks-QueueName": "gcsplit-webhook-queue", "X-CloudTasks-TaskRetryCount": "2"}
    assert client.post("/log", headers=headers).status_code == 200
    [line] = [entry for entry in log_lines(log_stream) if entry["message"] == "processing payout"]
    assert line["severity"] == "INFO" and line["service"] == "probe" and line["logger"] == "probe.route"
    assert line["time"].endswith("Z") and line["unique_id"] == "UNQ123" and line["payment_id"] == "np-42"
    assert line["logging.googleapis.com/trace"] == f"projects/telepay-test/traces/{TRACE_ID}"
    assert line["logging.googleapis.com/spanId"] == "12345" and line["logging.googleapis.com/trace_sampled"] is True
    ids = (line["task_name"], line["queue_name"], line["task_retry_count"])
    assert ids == ("task-7", "gcsplit-webhook-queue", "2")
    assert line["logging.googleapis.com/sourceLocation"]["function"] == "log_route"


def test_log_lines_without_trace_header_or_project(certs):
    stream = io.StringIO()
    handler = web.configure_logging("probe", stream=stream)
    try:
        client = build_app(certs).test_client()
        client.post("/log")
        client.post("/log", headers={"X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=0"})
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = [entry for entry in log_lines(stream) if entry["message"] == "processing payout"]
    assert "logging.googleapis.com/trace" not in first and "task_name" not in first
    assert second["logging.googleapis.com/trace"] == TRACE_ID
    assert second["logging.googleapis.com/trace_sampled"] is False


def test_secrets_are_redacted_from_message_extras_and_args(log_stream):
    logger = logging.getLogger("probe.redaction")
    logger.warning("dsn=postgres://app:%s@10.0.0.1/db", DB_PASSWORD,
                   extra={"headers": {"X-Key": HMAC_KEY}, "attempts": [HMAC_KEY, 3], "amount": Decimal("0.1")})
    logger.critical("nan check", extra={"ratio": float("nan")})
    logger.debug("not shown at INFO")
    warning, critical = log_lines(log_stream)
    assert warning["severity"] == "WARNING" and warning["message"] == "dsn=postgres://app:***@10.0.0.1/db"
    assert warning["headers"] == {"X-Key": "***"} and warning["attempts"] == ["***", 3] and warning["amount"] == "0.1"
    assert critical["severity"] == "CRITICAL" and critical["ratio"] == "nan"
    assert DB_PASSWORD not in log_stream.getvalue() and HMAC_KEY not in log_stream.getvalue()


def test_configure_logging_replaces_its_previous_handler(log_stream):
    root = logging.getLogger()
    second = web.configure_logging("probe", stream=io.StringIO())
    try:
        assert [h for h in root.handlers if getattr(h, "telepay_json", False)] == [second]
    finally:
        root.removeHandler(second)


# ---------------------------------------------------------------- serving


def test_gunicorn_options_follow_cloud_run():
    options = web.gunicorn_options({"PORT": "9090"}, threads=4)
    assert options["bind"] == "0.0.0.0:9090" and options["workers"] == 1 and options["threads"] == 4
    assert options["timeout"] == 0 and options["worker_class"] == "gthread"
    assert web.gunicorn_options({})["bind"] == "0.0.0.0:8080"
    assert web.gunicorn_options({"PORT": "9000", "TP_BIND_HOST": "127.0.0.1"})["bind"] == "127.0.0.1:9000"
    for port in ("http", "0", "70000", "-1"):
        with pytest.raises(ConfigError, match="PORT: malformed"):
            web.gunicorn_options({"PORT": port})


SERVER_SCRIPT = """
import sys
from telepay_shared import web
from telepay_shared.errors import ConfigError

def factory():
    if sys.argv[1] == "broken":
        raise ConfigError("probe configuration is invalid (1 problem)")
    return web.create_app("probe")

web.serve(factory, service_name="probe", dev_server=sys.argv[1] == "dev")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(tmp_path, mode: str, port: int) -> subprocess.Popen:
    """Starts the serve() entry point in a subprocess with this test's sys.path."""
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("TP_DEV_SERVER", "XDG_RUNTIME_DIR")}
    env.update(PORT=str(port), PYTHONPATH=os.pathsep.join(p for p in sys.path if p), HOME=str(tmp_path))
    return subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_health(server: subprocess.Popen, port: int, deadline_s: float = 20) -> requests.Response:
    """Polls /health until it answers, the server dies or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"server did not answer /health (exit code {server.poll()})")


def stop(server: subprocess.Popen) -> tuple[str, str]:
    """Stops the server (SIGTERM, then SIGKILL) and returns its output."""
    server.terminate()
    try:
        return server.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.communicate(timeout=5)


@pytest.mark.parametrize("mode, server_header", [("gunicorn", "gunicorn"), ("dev", "Werkzeug")])
def test_serve_answers_health_on_port(tmp_path, mode, server_header):
    port = free_port()
    server = start_server(tmp_path, mode, port)
    try:
        response = wait_for_health(server, port)
    finally:
        stdout, stderr = stop(server)
    assert response.status_code == 200 and response.json()["status"] == "healthy"
    assert response.headers["Server"].startswith(server_header), (stdout, stderr)
    if mode == "gunicorn":
        entries = [json.loads(line) for line in stdout.splitlines()]
        assert any("Listening at: http://0.0.0.0:%d" % port in e["message"] for e in entries), stdout
        assert all(e["service"] == "probe" and e["severity"] for e in entries)
        assert not (tmp_path / ".gunicorn").exists()  # no control socket on Cloud Run


def test_serve_exits_when_the_factory_fails(tmp_path):
    server = start_server(tmp_path, "broken", free_port())
    try:
        stdout, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            stop(server)
    assert server.returncode != 0
    assert "probe configuration is invalid (1 problem)" in stdout + stderr


# ---------------------------------------------------------------- token bodies

TOKEN_KEYS = {"SUCCESS_URL_SIGNING_KEY": "token-key"}
STATUS_CHECK_FIELDS = {"unique_id": "UNQ0123456789ABC", "cn_api_id": "cn-42", "from_currency": "eth",
                       "from_network": "eth", "from_amount": 0.5, "payin_address": "0xpayin"}


def token_app(**read_options):
    """A probe service whose one route answers what web.read_token returned and bound to the log."""
    import flask

    from telepay_shared import hops

    app = web.create_app("probe")

    @app.post("/token")
    def token_route():
        fields, token = web.read_token(hops.STATUS_CHECK, TOKEN_KEYS, **read_options)
        return {"unique_id": fields["unique_id"], "token": token,
                "logged": {k: v for k, v in flask.g.telepay_log_context.items() if k in web.LOG_IDS}}

    return app.test_client()


def test_read_token_decodes_the_body_token_and_binds_its_ids():
    from telepay_shared import hops, tokens

    token = tokens.encode(hops.STATUS_CHECK, STATUS_CHECK_FIELDS, TOKEN_KEYS, now=1_700_000_000)
    response = token_app(now=1_700_000_010).post("/token", json={"token": token})
    assert response.status_code == 200
    assert response.get_json() == {"unique_id": "UNQ0123456789ABC", "token": token,
                                   "logged": {"unique_id": "UNQ0123456789ABC", "cn_api_id": "cn-42"}}


def test_read_token_reads_another_field_and_refuses_a_missing_or_bad_token():
    from telepay_shared import hops, tokens

    token = tokens.encode(hops.STATUS_CHECK, STATUS_CHECK_FIELDS, TOKEN_KEYS)
    assert token_app(field="t").post("/token", json={"t": token}).status_code == 200
    missing = token_app().post("/token", json={"t": token})
    assert missing.status_code == 400 and missing.get_json()["missing"] == ["token"]
    assert token_app().post("/token", json={"token": token[:-2] + "AA"}).status_code == 401


def token_task_app(seen: list, clock=None):
    """A probe service with one token_task route (TP_AUTH_MODE hmac) that records what its view got."""
    config = Config("probe", {"TP_AUTH_MODE": "hmac", **TOKEN_KEYS})
    app = web.create_app("probe", config, hmac_secret=HMAC_KEY)

    from telepay_shared import hops

    @app.token_task("/task", hops.STATUS_CHECK, clock=clock)
    def status_check(order: dict, token: str):
        seen.append((order["unique_id"], token))
        return {"status": "success"}

    return app.test_client()


def signed_task_post(client, body: dict):
    """POST body as JSON with the X-Webhook-Signature the hmac policy checks."""
    raw = json.dumps(body).encode()
    return client.post("/task", data=raw, content_type="application/json", headers=web.sign_body(raw, HMAC_KEY))


def test_token_task_hands_the_verified_token_to_its_view_only_after_authentication():
    from telepay_shared import hops, tokens

    seen: list = []
    client = token_task_app(seen)
    token = tokens.encode(hops.STATUS_CHECK, STATUS_CHECK_FIELDS, TOKEN_KEYS)
    unsigned = client.post("/task", json={"token": token})
    assert unsigned.status_code == 401 and "X-Webhook-Signature" in unsigned.get_json()["message"]
    assert client.get("/task").status_code == 405
    assert signed_task_post(client, {"token": token[:-2] + "AA"}).status_code == 401
    assert signed_task_post(client, {"tok": token}).get_json()["missing"] == ["token"]
    assert seen == []
    assert signed_task_post(client, {"token": token}).status_code == 200
    assert seen == [("UNQ0123456789ABC", token)]


def test_token_task_judges_the_token_window_by_its_clock():
    from telepay_shared import hops, tokens

    seen: list = []
    minted = 1_700_000_000
    token = tokens.encode(hops.STATUS_CHECK, STATUS_CHECK_FIELDS, TOKEN_KEYS, now=minted)
    late = signed_task_post(token_task_app(seen, clock=lambda: minted + 86_400), {"token": token})
    assert late.status_code == 401 and late.get_json()["reason"] == "expired"
    assert signed_task_post(token_task_app(seen, clock=lambda: minted + 5), {"token": token}).status_code == 200
    assert seen == [("UNQ0123456789ABC", token)]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
