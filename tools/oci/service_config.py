"""A service's service_config.json, as the image tests and tools/release read it.

telepay_shared.config is the loader the services run; this only lists what a declaration names,
with each name's spec, so that the smoke test can invent values and tools/release can map them
to Cloud Run. Standard library only: tools/release runs on the host's python3.
"""
from __future__ import annotations


def declared(declaration: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """(secrets, other values) of a declaration: name -> spec, with the section's implicit type
    (targets are urls, queues are queue ids with their default, if any)."""
    secrets = declaration.get("secrets", [])
    if isinstance(secrets, list):
        secrets = dict.fromkeys(secrets)
    plain = {name: spec or {} for name, spec in declaration.get("env", {}).items()}
    plain.update((name, {"type": "url", **(spec or {})}) for name, spec in declaration.get("targets", {}).items())
    plain.update((name, {"type": "queue", **({"default": default} if default else {})})
                 for name, default in declaration.get("queues", {}).items())
    return {name: spec or {} for name, spec in secrets.items()}, plain
