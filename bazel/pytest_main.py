"""Runs pytest on the test files named in argv, the way `bazel test` expects.

Bazel's runfiles tree is read-only and a test's output belongs in its own folders, so pytest's
cache is off and the JUnit report goes where Bazel asks (XML_OUTPUT_FILE). Exit 5 ("no tests
collected") is turned into a failure: a test target that runs nothing must not pass.
"""
import os
import sys

import pytest


def main(argv: list[str]) -> int:
    """Run pytest over argv and return a Bazel-friendly exit status."""
    args = ["-p", "no:cacheprovider", "-q", "-ra", *argv]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    status = pytest.main(args)
    return 1 if status == pytest.ExitCode.NO_TESTS_COLLECTED else int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
