"""The twelve payment services, in pipeline order: the one Python list every cross-service tool reads
(the local stack, the fault soak, the hostile-input and OIDC sweeps).

Bazel has the same list in services/service.bzl (Starlark cannot import Python): a new service is
added to both; catalog_test checks that they agree and that each names a service folder.
"""
from __future__ import annotations

SERVICES = (
    "npwebhook",
    "gcwebhook1",
    "gcwebhook2",
    "gcsplit1",
    "gcsplit2",
    "gcsplit3",
    "gcaccumulator",
    "gcmicrobatchprocessor",
    "gcbatchprocessor",
    "gchostpay1",
    "gchostpay2",
    "gchostpay3",
)
# NowPayments calls np-webhook with its IPN; Cloud Tasks (or Cloud Scheduler) calls every other service.
ENTRY = "npwebhook"
TASK_SERVICES = tuple(name for name in SERVICES if name != ENTRY)
