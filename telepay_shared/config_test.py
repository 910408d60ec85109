"""Tests of telepay_shared.config: declaration, typed values, aggregation, secrets, redaction."""
from __future__ import annotations

import json
import logging
import pickle
from decimal import Decimal
from types import SimpleNamespace

import pytest
from google.api_core import exceptions as api_exceptions
from google.auth.exceptions import DefaultCredentialsError

from telepay_shared import config as config_module
from telepay_shared.config import Config, Redactor, Secret, load_config, parse_declaration, redact
from telepay_shared.errors import ConfigError

REFERENCE = "projects/telepay-test/secrets/SIGNING_KEY/versions/3"
OTHER_REFERENCE = "projects/telepay-test/secrets/THRESHOLD/versions/latest"


class StandInSecretManager:
    """Implements access_secret_version like SecretManagerServiceClient, from a dict of payloads."""

    def __init__(self, payloads: dict):
        self.payloads = payloads
        self.calls: list[str] = []

    def access_secret_version(self, request=None, *, timeout=None, **kwargs):
        self.calls.append(request["name"])
        result = self.payloads[request["name"]]
        if isinstance(result, Exception):
            raise result
        return SimpleNamespace(payload=SimpleNamespace(data=result))


def declare(tmp_path, **sections):
    """Writes a service_config.json for service "probe" and returns its path."""
    path = tmp_path / "service_config.json"
    path.write_text(json.dumps({"service": "probe", **sections}), encoding="utf-8")
    return path


def load_one(tmp_path, spec, value, section="env"):
    """Loads a declaration with one field NAME set to value and returns the typed value."""
    path = declare(tmp_path, **{section: {"NAME": spec}})
    return load_config(path, {} if value is None else {"NAME": value})["NAME"]


def config_error(tmp_path, sections: dict, environ: dict, **kwargs) -> ConfigError:
    """Loads a declaration expecting failure and returns the ConfigError."""
    with pytest.raises(ConfigError) as caught:
        load_config(declare(tmp_path, **sections), environ, **kwargs)
    return caught.value


@pytest.mark.parametrize(
    "spec, text, expected",
    [
        ({}, "gcsplit-queue", "gcsplit-queue"),
        ({"type": "int"}, "8080", 8080),
        ({"type": "int"}, "-15", -15),
        ({"type": "decimal"}, "0.50", Decimal("0.50")),
        ({"type": "decimal"}, "3", Decimal("3")),
        ({"type": "bool"}, "true", True),
        ({"type": "bool"}, "TRUE", True),
        ({"type": "bool"}, "1", True),
        ({"type": "bool"}, "False", False),
        ({"type": "bool"}, "0", False),
        ({"type": "url"}, "https://gcsplit2-abc.a.run.app/usdt-eth-estimate",
         "https://gcsplit2-abc.a.run.app/usdt-eth-estimate"),
        ({"type": "url"}, "http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        ({"type": "csv"}, "tasks@p.iam.gserviceaccount.com, cron@p.iam.gserviceaccount.com,",
         ("tasks@p.iam.gserviceaccount.com", "cron@p.iam.gserviceaccount.com")),
        ({"type": "queue"}, "gchostpay1-response-queue", "gchostpay1-response-queue"),
        ({"choices": ["oidc", "hmac"]}, "hmac", "hmac"),
        ({"type": "csv", "choices": ["usdt", "eth"]}, "eth,usdt", ("eth", "usdt")),
        ({"type": "decimal", "min": 0, "max": "100"}, "100", Decimal("100")),
    ],
)
def test_each_type_parses_to_its_python_value(tmp_path, spec, text, expected):
    value = load_one(tmp_path, spec, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "spec, text",
    [
        ({"type": "int"}, "8_080"),
        ({"type": "int"}, "12a"),
        ({"type": "int"}, "1.5"),
        ({"type": "decimal"}, "NaN"),
        ({"type": "decimal"}, "Infinity"),
        ({"type": "decimal"}, "1e3"),
        ({"type": "decimal"}, "3,5"),
        ({"type": "bool"}, "yes"),
        ({"type": "bool"}, "enabled"),
        ({"type": "url"}, "ftp://files.example.com"),
        ({"type": "url"}, "https://"),
        ({"type": "url"}, "gcsplit2.run.app"),
        ({"type": "url"}, "http://host:99999"),
        ({"type": "url"}, "https://host/a path"),
        ({"type": "csv"}, " , ,"),
        ({"type": "queue"}, "queue_with_underscore"),
        ({"choices": ["oidc", "hmac"]}, "OIDC"),
        ({"type": "csv", "choices": ["usdt", "eth"]}, "eth,btc"),
        ({"type": "int", "min": 1, "max": 65535}, "70000"),
        ({"type": "decimal", "max": "100"}, "100.01"),
    ],
)
def test_malformed_values_are_reported_with_the_expectation_and_without_the_value(tmp_path, spec, text):
    error = config_error(tmp_path, {"env": {"NAME": spec}}, {"NAME": text})
    assert "NAME: malformed (expected " in str(error)
    assert text.strip() not in str(error)


def test_defaults_apply_when_absent_or_blank_and_optional_values_are_none(tmp_path):
    path = declare(
        tmp_path,
        env={
            "TP_FLAT_FEE": {"type": "decimal", "default": "3"},
            "ALERTING_ENABLED": {"type": "bool", "default": "true"},  # legacy §11.26: unset disabled alerting
            "PORT": {"type": "int", "default": "8080"},
            "SLACK_CHANNEL": {"optional": True},
        },
        queues={"GCSPLIT2_QUEUE": "gcsplit-usdt-eth-estimate-queue"},
    )
    config = load_config(path, {"PORT": "   "})
    assert config.TP_FLAT_FEE == Decimal("3") and config.ALERTING_ENABLED is True and config.PORT == 8080
    assert config.SLACK_CHANNEL is None and config.GCSPLIT2_QUEUE == "gcsplit-usdt-eth-estimate-queue"
    assert load_config(path, {"PORT": "9000", "ALERTING_ENABLED": "false"}).PORT == 9000


def test_values_and_secrets_are_stripped_and_blank_counts_as_missing(tmp_path):
    path = declare(tmp_path, secrets=["SIGNING_KEY"], env={"PROJECT": {}}, targets={"GCSPLIT2_URL": None})
    environ = {"SIGNING_KEY": "\n key-1 \t", "PROJECT": " telepay ", "GCSPLIT2_URL": " https://x.run.app\n"}
    config = load_config(path, environ)
    assert config.SIGNING_KEY.reveal() == "key-1" and config.PROJECT == "telepay"
    assert config.GCSPLIT2_URL == "https://x.run.app"
    error = config_error(tmp_path, {"secrets": ["SIGNING_KEY"]}, {"SIGNING_KEY": " \n "})
    assert "SIGNING_KEY: missing (expected a secret" in str(error)


def test_one_error_lists_every_missing_and_malformed_name_but_no_value(tmp_path):
    sections = {
        "secrets": ["SUCCESS_URL_SIGNING_KEY", "DATABASE_PASSWORD_SECRET"],
        "env": {"TP_FLAT_FEE": {"type": "decimal", "default": "3"}, "PORT": {"type": "int", "default": "8080"}},
        "queues": {"GCSPLIT2_QUEUE": None},
        "targets": {"GCSPLIT2_URL": {}},
    }
    environ = {"DATABASE_PASSWORD_SECRET": "hunter2-password", "TP_FLAT_FEE": "three%", "PORT": "80eighty",
               "GCSPLIT2_URL": "gcsplit2.internal"}
    error = config_error(tmp_path, sections, environ)
    lines = str(error).splitlines()
    assert lines[0] == "probe configuration is invalid (5 problems):"
    assert error.problems == [
        "SUCCESS_URL_SIGNING_KEY: missing (expected a secret: a non-empty string)",
        "TP_FLAT_FEE: malformed (expected a decimal number such as 3 or 0.50)",
        "PORT: malformed (expected an integer such as 8080)",
        "GCSPLIT2_QUEUE: missing (expected a Cloud Tasks queue id (letters, digits, hyphens))",
        "GCSPLIT2_URL: malformed (expected an http(s) URL with a host)",
    ]
    for value in environ.values():
        assert value not in str(error)


def test_secret_never_prints_its_value(caplog):
    secret = Secret("SIGNING_KEY", "s3cr3t-value")
    logger = logging.getLogger("telepay.config_test")
    with caplog.at_level(logging.INFO, logger="telepay.config_test"):
        logger.info("key=%s", secret)
        logger.info("key=%r", secret)
        logger.info(f"key={secret} {secret:>20} {secret!s}")
    rendered = [str(secret), repr(secret), f"{secret}", "%s" % secret, str([secret]), caplog.text]
    rendered += [record.getMessage() for record in caplog.records]
    assert all("s3cr3t-value" not in text for text in rendered)
    assert str(secret) == "***" and repr(secret) == "Secret(SIGNING_KEY=***)" and "***" in caplog.text
    assert secret.reveal() == "s3cr3t-value"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_config_gives_attribute_and_item_access_and_refuses_undeclared_names(tmp_path):
    path = declare(tmp_path, secrets=["SIGNING_KEY"], env={"PORT": {"type": "int", "default": "8080"}},
                   tables=["split_payout_request", "split_payout_que"])
    config = load_config(path, {"SIGNING_KEY": "k"})
    assert config.PORT == config["PORT"] == 8080 and "PORT" in config and "NOPE" not in config
    assert config.service == "probe" and config.tables == ("split_payout_request", "split_payout_que")
    assert config.get("NOPE", "fallback") == "fallback" and config.get("PORT") == 8080
    with pytest.raises(AttributeError, match="NOPE is not declared in probe's service_config.json"):
        config.NOPE
    with pytest.raises(KeyError, match="NOPE is not declared"):
        config["NOPE"]
    assert "'k'" not in repr(config) and "Secret(SIGNING_KEY=***)" in repr(config)


def test_redact_replaces_every_known_secret_longest_first():
    secrets = [Secret("A", "abc"), "abcdef", Secret("B", "")]
    assert redact("x abcdef y abc z", secrets) == "x *** y *** z"
    assert Redactor()("nothing to hide") == "nothing to hide"
    assert Redactor(secrets)("") == ""
    config = Config("probe", {"KEY": Secret("KEY", "pa$$(word)"), "PORT": 8080})
    assert config.redact("login with pa$$(word) on 8080") == "login with *** on 8080"


def test_secret_version_references_are_fetched_stripped_and_typed(tmp_path):
    client = StandInSecretManager({REFERENCE: b" signing-key-from-sm\n", OTHER_REFERENCE: b"20.00"})
    path = declare(tmp_path, secrets=["SIGNING_KEY", "OTHER_KEY"],
                   env={"MICRO_BATCH_THRESHOLD_USD": {"type": "decimal"}})
    environ = {"SIGNING_KEY": f" {REFERENCE} ", "OTHER_KEY": REFERENCE, "MICRO_BATCH_THRESHOLD_USD": OTHER_REFERENCE}
    config = load_config(path, environ, secret_client=client)
    assert config.SIGNING_KEY.reveal() == config.OTHER_KEY.reveal() == "signing-key-from-sm"
    assert config.MICRO_BATCH_THRESHOLD_USD == Decimal("20.00")
    assert sorted(client.calls) == sorted([REFERENCE, OTHER_REFERENCE])  # each version read once


def test_secret_manager_failures_are_listed_with_the_other_problems(tmp_path):
    client = StandInSecretManager({
        REFERENCE: api_exceptions.NotFound("Secret [SIGNING_KEY] not found"),
        OTHER_REFERENCE: api_exceptions.PermissionDenied("caller lacks secretAccessor"),
        "projects/p/secrets/BINARY/versions/1": b"\xff\xfe\x00",
        "projects/p/secrets/EMPTY/versions/1": b"  \n",
    })
    sections = {"secrets": ["SIGNING_KEY", "HOSTPAY_KEY", "BINARY_KEY", "EMPTY_KEY"],
                "env": {"PORT": {"type": "int"}}}
    environ = {"SIGNING_KEY": REFERENCE, "HOSTPAY_KEY": OTHER_REFERENCE, "PORT": "x",
               "BINARY_KEY": "projects/p/secrets/BINARY/versions/1",
               "EMPTY_KEY": "projects/p/secrets/EMPTY/versions/1"}
    error = config_error(tmp_path, sections, environ, secret_client=client)
    assert error.problems == [
        "SIGNING_KEY: the Secret Manager reference could not be read (NotFound)",
        "HOSTPAY_KEY: the Secret Manager reference could not be read (PermissionDenied)",
        "BINARY_KEY: the Secret Manager payload is not UTF-8 text",
        "EMPTY_KEY: missing (expected a secret: a non-empty string)",
        "PORT: malformed (expected an integer such as 8080)",
    ]
    assert "projects/" not in str(error)


def test_real_client_is_created_lazily_and_its_failures_are_listed(tmp_path, monkeypatch):
    from google.cloud import secretmanager

    created = []

    def no_credentials():
        created.append(True)
        raise DefaultCredentialsError("no ADC")

    monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", no_credentials)
    path = declare(tmp_path, secrets=["SIGNING_KEY"])
    assert load_config(path, {"SIGNING_KEY": "plain-value"}).SIGNING_KEY.reveal() == "plain-value"
    assert created == []
    error = config_error(tmp_path, {"secrets": ["SIGNING_KEY"]}, {"SIGNING_KEY": REFERENCE})
    assert error.problems == ["SIGNING_KEY: the Secret Manager reference could not be read (DefaultCredentialsError)"]
    assert created == [True]


def test_declaration_problems_are_aggregated():
    raw = {
        "service": "probe",
        "extras": {},
        "secrets": {"SIGNING_KEY": {"default": "k"}, "BOT_TOKEN": {"type": "int"}},
        "env": {
            "lower_name": {},
            "FEE": {"type": "money"},
            "PORT": {"type": "int", "default": "eighty"},
            "RATE": {"type": "decimal", "default": 3},
            "MODE": {"type": "int", "choices": ["1"]},
            "LABEL": {"min": 1},
            "LIMIT": {"type": "int", "max": "lots"},
            "FLAG": {"optional": "yes", "colour": "red"},
            "SIGNING_KEY": {},
        },
        "queues": {"Q": "bad queue"},
        "targets": {"URL": {"type": "str"}, "OTHER_URL": "https://x"},
        "tables": ["Split-Payout"],
    }
    with pytest.raises(ConfigError) as caught:
        parse_declaration(raw, "probe/service_config.json")
    message = str(caught.value)
    assert message.startswith("probe/service_config.json is invalid (17 problems):")
    for expected in [
        "extras: unknown section",
        "secrets.SIGNING_KEY: a secret has no default",
        "secrets.BOT_TOKEN: type must be one of str, url",
        "lower_name: name must be UPPER_SNAKE",
        "env.FEE: type must be one of str, int, decimal, bool, url, csv, queue",
        "env.PORT: default is not an integer such as 8080",
        "env.RATE: default must be a string",
        "env.MODE: choices apply to str and csv only",
        "env.LABEL: min and max apply to int and decimal only",
        "env.LIMIT: min and max must be plain numbers",
        "env.FLAG: unknown keys colour",
        "env.FLAG: optional must be true or false",
        "SIGNING_KEY: declared more than once",
        "queues.Q: default must be a Cloud Tasks queue id",
        "targets.URL: type must be one of url",
        "targets.OTHER_URL: spec must be an object",
        "tables: must be a list of lower-case table names",
    ]:
        assert expected in message


def test_declaration_shape_errors(tmp_path):
    for raw, expected in [
        ([], "the declaration must be a JSON object"),
        ({"service": ""}, "service: must be a non-empty string"),
        ({"service": "p", "secrets": [1]}, "secrets: must be a list of names or an object of specs"),
        ({"service": "p", "env": []}, "env: must be an object"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_declaration(raw)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read configuration declaration"):
        load_config(bad_json, {})
    with pytest.raises(ConfigError, match="cannot read configuration declaration"):
        load_config(tmp_path / "absent.json", {})


def test_fetch_timeout_is_passed_to_the_client(tmp_path):
    seen = {}

    class Recording(StandInSecretManager):
        def access_secret_version(self, request=None, *, timeout=None, **kwargs):
            seen["timeout"] = timeout
            return super().access_secret_version(request, timeout=timeout)

    path = declare(tmp_path, secrets=["SIGNING_KEY"])
    load_config(path, {"SIGNING_KEY": REFERENCE}, secret_client=Recording({REFERENCE: b"k"}))
    assert seen["timeout"] == config_module.SECRET_FETCH_TIMEOUT_S


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
