"""services/catalog.py reads the service list from service.bzl: what it reads must be the services."""
from __future__ import annotations

from pathlib import Path

import pytest

from services import catalog
from services.catalog import ENTRY, SERVICES, TASK_SERVICES

HERE = Path(__file__).parent


def test_the_list_is_read_from_service_bzl_in_pipeline_order():
    assert SERVICES[0] == "npwebhook" and SERVICES[-1] == "gchostpay3"
    assert len(SERVICES) == len(set(SERVICES)) == 12


def test_every_listed_service_is_a_service_folder():
    assert {name for name in SERVICES if (HERE / name / "service_config.json").is_file()} == set(SERVICES)


def test_task_services_are_all_but_the_entry():
    assert ENTRY in SERVICES and ENTRY not in TASK_SERVICES
    assert set(TASK_SERVICES) | {ENTRY} == set(SERVICES)


def test_a_declaration_without_the_list_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "DECLARATION", tmp_path / "service.bzl")
    catalog.DECLARATION.write_text("OTHER = []\n")
    with pytest.raises(RuntimeError, match="assigns no list to SERVICES"):
        catalog._declared("SERVICES")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
