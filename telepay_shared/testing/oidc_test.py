"""Tests of the local Google ID-token issuer, its certs endpoint, and the emulator attaching its tokens."""
from __future__ import annotations

import base64
import json
import stat
import time
import urllib.error
import urllib.request

import google.auth.exceptions
import google.auth.transport.requests
import pytest
from google.oauth2 import id_token

from telepay_shared.cloudtasks import TasksClient
from telepay_shared.testing.oidc import CERTS_PATH, GOOGLE_ISSUER, CertsServer, OidcIssuer, account_id
from telepay_shared.testing.tasks_emulator import DeliveryRecorder, TasksEmulator

AUDIENCE = "http://127.0.0.1:8080"
EMAIL = "telepay-tasks@telepay-test.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def issuer():
    return OidcIssuer()


def verify(token: str, issuer: OidcIssuer, audience=AUDIENCE) -> dict:
    """What a service checks: google-auth's verify_token against the issuer's certs."""
    return id_token.verify_token(token, issuer.transport(), audience=audience, certs_url="http://certs.invalid/")


def test_a_token_carries_the_claims_cloud_tasks_sends(issuer):
    before = int(time.time())
    token = issuer.mint(AUDIENCE, EMAIL)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}
    claims = verify(token, issuer)
    assert claims["iss"] == GOOGLE_ISSUER and claims["aud"] == AUDIENCE and claims["email"] == EMAIL
    assert claims["email_verified"] is True and claims["sub"] == claims["azp"] == account_id(EMAIL)
    assert before <= claims["iat"] <= time.time() and claims["exp"] == claims["iat"] + 3600


def test_certs_are_x509_certificates_by_kid_as_google_publishes_them(issuer):
    assert list(issuer.certs()) == [issuer.kid] and len(issuer.kid) == 40
    assert issuer.certs()[issuer.kid].startswith("-----BEGIN CERTIFICATE-----\n")


@pytest.mark.parametrize("change", ["audience", "key", "expiry"])
def test_verification_refuses_a_wrong_audience_a_foreign_key_or_an_expired_token(issuer, change):
    token = {"audience": lambda: issuer.mint("https://elsewhere.example", EMAIL),
             "key": lambda: OidcIssuer().mint(AUDIENCE, EMAIL),
             "expiry": lambda: issuer.mint(AUDIENCE, EMAIL, now=time.time() - 7200)}[change]()
    with pytest.raises((ValueError, google.auth.exceptions.GoogleAuthError)):
        verify(token, issuer)


def test_claims_can_be_overridden_for_refusal_tests(issuer):
    claims = verify(issuer.mint(AUDIENCE, EMAIL, email="other@example.com", email_verified=False), issuer)
    assert (claims["email"], claims["email_verified"]) == ("other@example.com", False)


def test_the_key_is_kept_in_a_private_file_and_read_back(tmp_path):
    path = tmp_path / "keys" / "oidc.pem"
    first = OidcIssuer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = OidcIssuer.load_or_create(path)
    assert again.kid == first.kid
    assert verify(again.mint(AUDIENCE, EMAIL), first)["email"] == EMAIL


def test_certs_server_answers_google_format_over_http(issuer):
    with CertsServer(issuer) as server:
        assert server.url.endswith(CERTS_PATH)
        with urllib.request.urlopen(server.url, timeout=5) as answer:
            assert json.loads(answer.read()) == issuer.certs()
            assert "max-age" in answer.headers["Cache-Control"]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.url.replace(CERTS_PATH, "/oauth2/v3/certs"), timeout=5)
        assert missing.value.code == 404
        token = issuer.mint(AUDIENCE, EMAIL)
        claims = id_token.verify_token(token, google.auth.transport.requests.Request(), audience=AUDIENCE,
                                       certs_url=server.url)
        assert claims["email"] == EMAIL


# ---------------------------------------------------------------- the emulator's side


@pytest.fixture(scope="module")
def emulator():
    with TasksEmulator() as running:
        yield running


def enqueue(emulator, recorder, account: str | None, **task_options) -> None:
    """Create one task through the real client, as a service does (OIDC account optional)."""
    client = TasksClient("telepay-test", "us-central1", emulator_host=emulator.host, oidc_service_account=account)
    client.ensure_queue("oidc-probe")
    client.enqueue("oidc-probe", recorder.url("/hop"), {"token": "t"}, idempotency_key=None, **task_options)


def test_a_task_with_an_oidc_token_is_delivered_with_a_bearer_token_for_its_account_and_origin(emulator):
    with DeliveryRecorder() as recorder:
        enqueue(emulator, recorder, EMAIL)
        [delivery] = recorder.expect_exactly(1, quiet_s=0.3)
        origin = recorder.url("/").split("/", 3)
    scheme, _, token = delivery.headers["authorization"].partition(" ")
    claims = verify(token, emulator.oidc_issuer, audience=f"{origin[0]}//{origin[2]}")
    assert scheme == "Bearer" and claims["email"] == EMAIL and claims["email_verified"] is True


def test_a_task_without_an_oidc_token_carries_no_authorization(emulator):
    with DeliveryRecorder() as recorder:
        enqueue(emulator, recorder, None)
        [delivery] = recorder.expect_exactly(1, quiet_s=0.3)
    assert "authorization" not in delivery.headers


def test_an_explicit_audience_is_honoured_and_a_redelivery_gets_a_fresh_token(emulator):
    with DeliveryRecorder(statuses=[503]) as recorder:
        client = TasksClient("telepay-test", "us-central1", emulator_host=emulator.host)
        client.ensure_queue("oidc-probe")
        task = {"http_request": {"url": recorder.url("/hop"), "body": b"{}", "oidc_token": {
            "service_account_email": EMAIL, "audience": "https://gcsplit1.example"}}}
        client.raw_client.create_task(parent=client.queue_path("oidc-probe"), task=task)
        first, second = recorder.wait_for(2)
    tokens = [d.headers["authorization"].split(" ", 1)[1] for d in (first, second)]
    assert all(verify(t, emulator.oidc_issuer, "https://gcsplit1.example")["aud"] == "https://gcsplit1.example"
               for t in tokens)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
