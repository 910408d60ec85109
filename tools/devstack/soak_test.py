"""The fault-injection soak, fast: its own stack, ~50 payments, every fault kind injected, zero violations.

tools/dev soak is the long run of the same code (soak.py); the checker's own tests, on synthetic
data, are in soak_check_test.py.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tools.devstack import faults, soak
from tools.devstack.stack import Settings, Stack

RUNFILES_MAIN = Path(__file__).parent.parent.parent  # <runfiles>/_main: the services, built and declared
PAYMENTS = 48


@pytest.fixture(scope="module")
def stack():
    """The whole pipeline in a temporary folder on free ports (a short path keeps PostgreSQL's socket legal)."""
    folder = Path(tempfile.mkdtemp(prefix="tp-soak-", dir="/tmp"))
    settings = Settings(port_base=soak.free_port_base(), durable=False, drain_s=5.0)
    local = Stack(folder, source_root=RUNFILES_MAIN, bin_root=RUNFILES_MAIN, settings=settings)
    try:
        local.up()
        yield local
    finally:
        local.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def result(stack):
    """One soak: every kind at least once, a database restart, duplicates and repeated IPNs."""
    options = soak.Options(payments=PAYMENTS, seed=11, threshold_share=0.3, rate=2.5, duplicate_share=0.15,
                           ipn_duplicate_share=0.1, faults_per_minute=6.0, minimum_each=1, db_restarts=1,
                           settle_timeout_s=120.0)
    report = soak.run_soak(stack, options, say=print)
    soak.print_report(report)
    return report


def test_every_payment_ends_paid_held_or_failed_with_zero_violations(result):
    """The verdict: every payment terminal, nothing paid twice, the ledger balanced."""
    assert result["violations"] == []
    assert result["verdict"] == "PASS"
    assert sum(result["states"].values()) == result["payments"]["total"] == PAYMENTS
    assert result["payments"]["instant"] > 0 and result["payments"]["threshold"] > 0
    assert result["states"].get("instant_paid", 0) > 0
    assert result["imbalance_usd"] == "0E-8"


def test_every_fault_kind_was_injected(result):
    """Each kind at least once, and the faults that can miss (armed, queued) actually hit something."""
    injected = result["faults"]
    assert all(injected.get(kind, 0) >= 1 for kind in faults.FAULT_KINDS), injected
    details = result["fault_details"]
    assert details["not_injected"] == []
    assert sum(details["rpc_fired"].values()) >= 1, details
    assert details["changenow_unfired"] < details["changenow_queued"]  # the pipeline's calls took queued faults
    assert details["duplicate_deliveries"].get("concurrent", 0) + details["duplicate_deliveries"].get(
        "after_success", 0) >= 1


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
