"""How the local stack configures each service: the environment production gives it, pointed at local parts.

Every service declares what it reads in its service_config.json (telepay_shared.config). Here each
declared name gets its local value, under the same name production uses:

* targets: the declared URL of another service, on that service's loopback port (TARGETS);
* queues: the declared default queue id (or, when it has none, the name in kebab case, as the
  shared test plugin does), on the Cloud Tasks emulator;
* secrets and other values: from the stack (keys generated once per stack folder, the database,
  the emulator, the stand-ins, the chain's host wallet and token contracts);
* TP_AUTH_MODE as deployed: the declared mode, except "none", which production only runs behind
  Cloud Run IAM (the front end checks the Cloud Tasks OIDC token); locally nothing stands in front,
  so the service checks that token itself: "oidc" (AUTH_MODES_AS_DEPLOYED). The stack's Cloud Tasks
  and Cloud Scheduler attach Google-format ID tokens signed by the stack's own issuer (world.py
  `oidc`), so TP_OIDC_AUDIENCES is the service's own origin (what cloudtasks.audience_for gives
  its senders), TP_OIDC_ALLOWED_EMAILS and CLOUD_TASKS_OIDC_SERVICE_ACCOUNT the stack's tasks
  service account, and TP_OIDC_CERTS_URL the issuer's certs endpoint (stack.local_values);
* DEV_DEFAULTS: delays shortened so that flows finish in seconds (production waits minutes).
An operator overrides any name with TELEPAY_DEV_SET_<NAME>=value (applies to every service
declaring it). A required name with no local value stops `up` with the list of what is missing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

LOOPBACK = "127.0.0.1"
OVERRIDE_PREFIX = "TELEPAY_DEV_SET_"
# The account the stack's Cloud Tasks and Cloud Scheduler mint ID tokens for, and the one services allow.
TASKS_SERVICE_ACCOUNT = "telepay-tasks@telepay-dev.iam.gserviceaccount.com"
OIDC_KEY_NAME = "OIDC_SIGNING_KEY"  # in secrets.json: the PEM of the stack's stand-in for Google's signing key

# Declared target URL -> (service, path). A legacy name is either a service's base URL (the
# caller appends its path) or the full URL of one endpoint; a base URL also serves as the full
# URL of POST /, so only endpoints with a path of their own need one here.
TARGETS = {
    "GCWEBHOOK1_URL": ("gcwebhook1", ""),
    "GCWEBHOOK2_URL": ("gcwebhook2", ""),
    "GCSPLIT1_URL": ("gcsplit1", ""),
    "GCSPLIT1_ESTIMATE_RESPONSE_URL": ("gcsplit1", "/usdt-eth-estimate"),
    "GCSPLIT1_SWAP_RESPONSE_URL": ("gcsplit1", "/eth-client-swap"),
    "GCSPLIT2_URL": ("gcsplit2", ""),
    "GCSPLIT3_URL": ("gcsplit3", ""),
    "GCACCUMULATOR_URL": ("gcaccumulator", ""),
    "GCACCUMULATOR_SWAP_CREATED_URL": ("gcaccumulator", "/swap-created"),
    "MICROBATCH_URL": ("gcmicrobatchprocessor", ""),
    "HOSTPAY_WEBHOOK_URL": ("gchostpay1", ""),
    "GCHOSTPAY1_URL": ("gchostpay1", ""),
    "GCHOSTPAY2_URL": ("gchostpay2", ""),
    "GCHOSTPAY3_URL": ("gchostpay3", ""),
}

# Production waits minutes between re-checks; locally a flow should settle in seconds.
DEV_DEFAULTS = {
    "TP_CALLBACK_RETRY_DELAY_S": "1",
    "HOSTPAY3_RETRY_DELAY_S": "2",
}

AUTH_MODES_AS_DEPLOYED = {"none": "oidc"}


def load_declaration(path: Path) -> dict:
    """A service's service_config.json."""
    return json.loads(path.read_text())


def _specs(declaration: dict, section: str) -> dict:
    """A section's name -> spec mapping (a list of names means specs are all empty)."""
    entries = declaration.get(section) or {}
    if isinstance(entries, list):
        return {name: {} for name in entries}
    return {name: spec or {} for name, spec in entries.items()}


def queue_id(name: str, default: str | None, overrides: Mapping[str, str]) -> str:
    """The queue a declared queue variable names locally."""
    return overrides.get(name) or default or name.lower().replace("_", "-")


def declared_queues(declaration: dict, overrides: Mapping[str, str]) -> dict[str, str]:
    """Queue variable -> local queue id, for every queue the service declares."""
    return {name: queue_id(name, default, overrides) for name, default in (declaration.get("queues") or {}).items()}


def target_url(name: str, service_ports: Mapping[str, int]) -> str | None:
    """The local URL a declared target names, or None when the stack does not know it."""
    if name not in TARGETS:
        return None
    service, path = TARGETS[name]
    return f"http://{LOOPBACK}:{service_ports[service]}{path}"


def _local_value(name: str, spec: dict, section: str, values: Mapping[str, str], service_ports: Mapping[str, int],
                 overrides: Mapping[str, str]) -> str | None:
    """The local value of one declared name, or None when the stack has none."""
    if name in overrides:
        return overrides[name]
    if section == "targets":
        return target_url(name, service_ports)
    if name == "TP_AUTH_MODE":
        return AUTH_MODES_AS_DEPLOYED.get(spec.get("default"), spec.get("default"))
    return values.get(name) or DEV_DEFAULTS.get(name)


def service_environment(declaration: dict, port: int, values: Mapping[str, str], service_ports: Mapping[str, int],
                        overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment one service runs with locally; ValueError lists required names without a value."""
    env: dict[str, str] = {"PORT": str(port)}
    values = {**values, "TP_OIDC_AUDIENCES": f"http://{LOOPBACK}:{port}"}  # the origin its senders' tokens name
    missing = []
    for section in ("secrets", "env", "targets"):
        for name, spec in _specs(declaration, section).items():
            value = None if name == "PORT" else _local_value(name, spec, section, values, service_ports, overrides)
            if value is not None:
                env[name] = value
            elif not spec.get("optional") and "default" not in spec:
                missing.append(name)
    if missing:
        raise ValueError(f"{declaration['service']} needs {', '.join(missing)}, which the dev stack does not set: "
                         f"set {OVERRIDE_PREFIX}<NAME>=value")
    env.update(declared_queues(declaration, overrides))
    return env


def overrides_from(environ: Mapping[str, str]) -> dict[str, str]:
    """The TELEPAY_DEV_SET_<NAME> values, by NAME."""
    return {key[len(OVERRIDE_PREFIX):]: value for key, value in environ.items() if key.startswith(OVERRIDE_PREFIX)}
