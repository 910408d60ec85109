"""telepay_service: the targets every payment service has, declared once.

A service's BUILD.bazel names its sources and the shared-core modules it uses; this macro makes
:lib (py_library), :server (py_binary: app.py under gunicorn), one py_pytest per *_test.py beside
the code, and the image targets (:image, :push, :load; tools/oci). Depending only on the shared
modules a service uses is what lets a pin bump re-image exactly the affected services.
"""

load("@rules_python//python:defs.bzl", "py_binary", "py_library")
load("//shared/bazel:pytest.bzl", "py_pytest")
load("//tools/oci:service_image.bzl", "service_image")

# The twelve payment services, in pipeline order: one package each under services/<name>/.
# services/catalog.py reads this list for Python (keep it a plain list of strings).
SERVICES = [
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
]

# The services Cloud Tasks calls: all but np-webhook, which NowPayments calls with its IPN.
TASK_SERVICES = [name for name in SERVICES if name != "npwebhook"]

def service_targets(target, services = SERVICES):
    """The labels of one target (e.g. "lib", "server") of each of the services."""
    return ["//services/%s:%s" % (name, target) for name in services]

def telepay_service(srcs, shared, pypi = [], data = [], test_deps = {}, test_data = {}, smoke_env = {}):
    """Declare one service.

    Args:
      srcs: the service's Python files (app.py, rules.py, ...).
      shared: names of the //shared modules it depends on, e.g. ["tokens_lib", "web"].
      pypi: third-party packages it imports directly, by @pypi name.
      data: files it reads at run time besides service_config.json.
      test_deps: extra deps per test target name (e.g. {"app_test": ["//shared:testing_evm"]}).
      test_data: extra data per test target name.
      smoke_env: extra environment for the image smoke test only.
    """
    py_library(
        name = "lib",
        srcs = srcs,
        data = ["service_config.json"] + data,
        deps = ["//shared:" + module for module in shared] + ["@pypi//" + name for name in pypi],
        visibility = ["//visibility:public"],
    )
    py_binary(
        name = "server",
        srcs = ["app.py"],
        main = "app.py",
        deps = [":lib"],
        visibility = ["//visibility:public"],
    )
    for test in native.glob(["*_test.py"]):
        name = test[:-len(".py")]
        py_pytest(
            name = name,
            srcs = [test],
            data = test_data.get(name, []),
            deps = [":lib", "//shared:testing_plugin"] + test_deps.get(name, []),
        )
    service_image(smoke_env = smoke_env)
