"""Smoke test of a service image: unpacked and run like Cloud Run runs it, /health answers 200.

    image_smoke_test.py --image LAYOUT --config service_config.json [--env NAME=VALUE]...

The service gets a dummy value for every configuration value it requires (from its
service_config.json: secrets, required env, queues and targets), local stand-ins for Google's
APIs, a real migrated PostgreSQL when it declares DATABASE_URL (its /health asks the database),
PORT, and the --env overrides.
Checked as well: no shell or package manager in the image, the interpreter's native modules all
load, the server runs as the image's non-root user, and SIGTERM stops it within Cloud Run's 10 s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import image_testing
from service_config import declared
from telepay_shared.migrate import apply_migrations
from telepay_shared.testing.postgres import postgres_server

NOT_IN_IMAGE = ["bin/sh", "bin/bash", "bin/dash", "usr/bin/apt", "usr/bin/dpkg", "usr/bin/pip3"]
# Optional values that a default setting still needs: Google's clients want credentials at
# start-up (Cloud Run's metadata server has them), so they get an emulator address instead
# (nothing listens; /health does not call them); the default TP_AUTH_MODE=oidc wants its lists.
SMOKE_VALUES = {
    "CLOUD_TASKS_EMULATOR_HOST": "127.0.0.1:9",
    "TP_OIDC_AUDIENCES": "https://service.example",
    "TP_OIDC_ALLOWED_EMAILS": "tasks@example.iam.gserviceaccount.com",
}
NATIVE_MODULES = "import ssl, sqlite3, ctypes, zlib, bz2, lzma, hashlib, uuid, decimal, _json, readline"


def dummy_value(spec: dict | None) -> str:
    """A value the configuration loader accepts for a declared field (spec as in config.py)."""
    spec = spec or {}
    if spec.get("choices"):
        return spec["choices"][0]
    number = str(spec.get("min", spec.get("max", 1)))
    return {"int": number, "decimal": number, "bool": "false", "url": "http://127.0.0.1:9/",
            "queue": "dummy-queue"}.get(spec.get("type", "str"), "dummy")


def dummy_environment(declaration: dict) -> dict[str, str]:
    """Every required value of a service_config.json, with a dummy value, plus SMOKE_VALUES."""
    secrets, plain = declared(declaration)
    specs = {**plain, **secrets}
    env = {name: dummy_value(spec) for name, spec in specs.items()
           if "default" not in spec and not spec.get("optional")}
    env.update((name, value) for name, value in SMOKE_VALUES.items() if name in specs)
    return env


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _uids(pids: list[int]) -> set[int]:
    lines = [Path(f"/proc/{p}/status").read_text() for p in pids]
    return {int(line.split()[1]) for text in lines for line in text.splitlines() if line.startswith("Uid:")}


@contextlib.contextmanager
def database(declaration: dict):
    """DATABASE_URL of a fresh migrated PostgreSQL on 127.0.0.1 when the service uses one."""
    if "DATABASE_URL" not in {name for names in declared(declaration) for name in names}:
        yield {}
        return
    with postgres_server() as server:
        apply_migrations(server.dsn())
        yield {"DATABASE_URL": server.tcp_dsn()}


def check_image(image: str, env: dict[str, str], port: int) -> None:
    config = image_testing.image_config(image)
    with tempfile.TemporaryDirectory() as tmp:
        root = image_testing.unpack(image, Path(tmp) / "rootfs")
        present = [p for p in NOT_IN_IMAGE if (root / p).exists()]
        assert not present, f"the image should have no shell or package manager, found {present}"
        with image_testing.run_image(root, config, env, ["/usr/bin/python3", "-c", NATIVE_MODULES]) as check:
            output = check.communicate(timeout=60)[0]
            assert check.returncode == 0, f"native modules do not load in the image:\n{output}"
        started = time.monotonic()
        with image_testing.run_image(root, config, env) as server:
            status, body = image_testing.wait_for_http(f"http://127.0.0.1:{port}/health", server)
            print(f"/health answered {status} after {time.monotonic() - started:.1f} s: {body.decode()}")
            assert status == 200, f"/health answered {status}: {body!r}"
            service = _children(server.pid)  # pid 1 of the container: gunicorn's master
            assert _uids(service + _children(service[0])) == {int(config["config"]["User"].split(":")[0])}
            signal_sent = time.monotonic()
            os.kill(service[0], signal.SIGTERM)
            server.wait(timeout=10)
            print(f"stopped {time.monotonic() - signal_sent:.1f} s after SIGTERM")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args(argv)
    declaration = json.loads(Path(args.config).read_text())
    port = image_testing.free_port()
    with database(declaration) as database_env:
        env = {**dummy_environment(declaration), **database_env, "PORT": str(port)}
        env.update(item.split("=", 1) for item in args.env)
        check_image(args.image, env, port)

if __name__ == "__main__":
    main(sys.argv[1:])
