"""tools/release's pure parts: which services changed, and the Cloud Run manifests it writes."""
from __future__ import annotations

import yaml

import release

DECLARATION = {
    "service": "gcsplit2",
    "secrets": {"SUCCESS_URL_SIGNING_KEY": {}, "DATABASE_URL": {"optional": True}, "SLACK_HOOK": {"optional": True}},
    "env": {
        "PORT": {"type": "int", "default": "8080"},
        "CLOUD_TASKS_PROJECT_ID": {},
        "DATABASE_NAME_SECRET": {"optional": True},
        "TP_AUTH_MODE": {"default": "oidc"},
    },
    "queues": {"RESPONSE_QUEUE": "gcsplit-response-queue", "OTHER_QUEUE": None},
    "targets": {"GCSPLIT1_URL": {}},
}
ENVIRONMENT = {
    "region": "us-central1",
    "env": {"CLOUD_TASKS_PROJECT_ID": "telepay-459221", "SUCCESS_URL_SIGNING_KEY": "never a literal"},
    "secrets": {"DATABASE_NAME_SECRET": "db-name:3"},
    "services": {"gcsplit2": {"env": {"GCSPLIT1_URL": "https://gcsplit1.example/", "TP_AUTH_MODE": "hmac"},
                              "secrets": {"SLACK_HOOK": "slack-webhook"}}},
}
IMAGE = "registry.example/telepay/gcsplit2@sha256:" + "0" * 64


def _env(manifest: str) -> dict:
    (container,) = yaml.safe_load(manifest)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE and container["ports"] == [{"name": "http1", "containerPort": 8080}]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_secrets_are_references_and_values_come_from_the_environment():
    manifest, missing = release.cloud_run_service("gcsplit2", IMAGE, DECLARATION, ENVIRONMENT)
    assert missing == ["OTHER_QUEUE"]
    assert _env(manifest) == {
        "CLOUD_TASKS_PROJECT_ID": "telepay-459221",
        "DATABASE_NAME_SECRET": {"secretKeyRef": {"name": "db-name", "key": "3"}},  # mapped: by reference
        "TP_AUTH_MODE": "hmac",
        "GCSPLIT1_URL": "https://gcsplit1.example/",
        "SUCCESS_URL_SIGNING_KEY": {"secretKeyRef": {"name": "SUCCESS_URL_SIGNING_KEY", "key": "latest"}},
        "SLACK_HOOK": {"secretKeyRef": {"name": "slack-webhook", "key": "latest"}},
    }  # no PORT (Cloud Run's), no unmapped optional secret, defaults left to the service


def test_manifest_is_a_cloud_run_service():
    manifest = yaml.safe_load(release.cloud_run_service("gcsplit2", IMAGE, DECLARATION, ENVIRONMENT)[0])
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.knative.dev/v1", "Service")
    assert manifest["metadata"] == {"name": "gcsplit2", "labels": {"cloud.googleapis.com/location": "us-central1"}}
    assert manifest["spec"]["template"]["spec"]["containerConcurrency"] == 8


def test_only_changed_or_new_services_are_pushed():
    record = {"services": {"a": {"digest": "sha256:1"}, "b": {"digest": "sha256:2"}}}
    assert release.changed_services({"a": "sha256:1", "b": "sha256:3", "c": "sha256:4"}, record) == ["b", "c"]


def test_yaml_of_nested_lists():
    value = {"a": [{"b": 1, "c": [2, "x"]}, []], "d": {}}
    assert yaml.safe_load(release._yaml(value)) == value
