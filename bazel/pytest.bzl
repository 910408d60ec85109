"""py_pytest: a py_test target that runs pytest over test files that sit beside the code."""

load("@rules_python//python:defs.bzl", "py_test")

def py_pytest(name, srcs, deps = [], data = [], **kwargs):
    """A py_test running pytest on `srcs` (files named *_test.py) with the shared runner.

    Args:
      name: target name.
      srcs: the test files.
      deps: libraries under test and their test-only helpers.
      data: files the tests read at run time.
      **kwargs: passed to py_test (size, tags, env, ...).
    """
    runner = "//shared/bazel:pytest_main.py"
    py_test(
        name = name,
        srcs = srcs + [runner],
        main = runner,
        args = ["$(rootpath %s)" % s for s in srcs] + kwargs.pop("args", []),
        deps = deps + ["@pypi//pytest"],
        data = data,
        **kwargs
    )
