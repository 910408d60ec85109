"""The service list is written twice (Python, Starlark): both must name the same services, each a folder."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from services.catalog import ENTRY, SERVICES, TASK_SERVICES

HERE = Path(__file__).parent


def starlark_list(name: str) -> list[str]:
    """The string list assigned to `name` in services/service.bzl."""
    source = (HERE / "service.bzl").read_text()
    match = re.search(rf"^{name} = (\[.*?\])\n", source, re.MULTILINE | re.DOTALL)
    assert match, f"service.bzl assigns no list to {name}"
    return ast.literal_eval(match[1])


def test_bazel_declares_the_same_services_in_the_same_order():
    assert starlark_list("SERVICES") == list(SERVICES)


def test_every_listed_service_is_a_service_folder():
    declared = {name for name in SERVICES if (HERE / name / "service_config.json").is_file()}
    assert declared == set(SERVICES)
    assert len(SERVICES) == len(set(SERVICES)) == 12


def test_task_services_are_all_but_the_entry():
    assert ENTRY in SERVICES and ENTRY not in TASK_SERVICES
    assert set(TASK_SERVICES) | {ENTRY} == set(SERVICES)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
