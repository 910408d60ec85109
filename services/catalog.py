"""The twelve payment services, in pipeline order, for Python: the local stack, the fault soak and the
hostile-input and OIDC sweeps read them here.

The list itself is written once, as SERVICES in services/service.bzl, because Bazel declares every
service's targets from it and Starlark cannot import Python; it is read from there.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

DECLARATION = Path(__file__).with_name("service.bzl")


def _declared(name: str) -> tuple[str, ...]:
    """The string list assigned to `name` at the top level of service.bzl."""
    match = re.search(rf"^{name} = (\[.*?\])\n", DECLARATION.read_text(), re.MULTILINE | re.DOTALL)
    if match is None:
        raise RuntimeError(f"{DECLARATION} assigns no list to {name}")
    return tuple(ast.literal_eval(match[1]))


SERVICES = _declared("SERVICES")
# NowPayments calls np-webhook with its IPN; Cloud Tasks (or Cloud Scheduler) calls every other service.
ENTRY = "npwebhook"
TASK_SERVICES = tuple(name for name in SERVICES if name != ENTRY)
