"""py_module: one module of the shared core as a py_library, with its *_test.py beside it as a py_pytest."""

load("@rules_python//python:defs.bzl", "py_binary", "py_library")
load("//shared/bazel:pytest.bzl", "py_pytest")

def py_module(name, srcs, deps = [], test_deps = [], test_data = [], cli = False, **kwargs):
    """A py_library `name` and a py_pytest `<name>_test` over the test file of its last source.

    Args:
      name: the library's target name; its test is `<name>_test`.
      srcs: the library's files, the module under test last (`x.py`, tested by `x_test.py` beside it).
      deps: what the library imports.
      test_deps: what the test imports besides the library.
      test_data: files the test reads at run time.
      cli: also a py_binary `<name>_cli` that runs the module (its `__main__` block) as a program.
      **kwargs: passed to the py_library (data, testonly, ...).
    """
    module = srcs[-1]
    py_library(
        name = name,
        srcs = srcs,
        deps = deps,
        **kwargs
    )
    py_pytest(
        name = name + "_test",
        srcs = [module[:-len(".py")] + "_test.py"],
        data = test_data,
        deps = [":" + name] + test_deps,
    )
    if cli:
        py_binary(
            name = name + "_cli",
            srcs = [module],
            main = module,
            deps = [":" + name],
        )
