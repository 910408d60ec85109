"""devstack_test: a test of the local stack's code, declared once for the four tests beside it."""

load("//services:service.bzl", "service_targets")
load("//shared/bazel:pytest.bzl", "py_pytest")

def devstack_test(name, size, stack = False, deps = []):
    """A py_pytest of <name>.py on :devstack_lib.

    Args:
      name: the target, also the test file's name without .py.
      size: the test size.
      stack: the test starts a whole stack: it needs every service's server, and it runs exclusive
        (twenty processes on two cores must not share them with other tests).
      deps: what the test imports besides :devstack_lib.
    """
    py_pytest(
        name = name,
        size = size,
        srcs = [name + ".py"],
        data = service_targets("server") if stack else [],
        tags = ["exclusive"] if stack else [],
        deps = [":devstack_lib"] + deps,
    )
