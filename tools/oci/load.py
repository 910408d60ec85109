"""Loads an image tarball into docker or podman, whichever is installed; else says where it is.

    load.py IMAGE.tar
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main(argv: list[str]) -> int:
    (tarball,) = argv
    tarball = os.path.realpath(tarball)
    for tool in ("docker", "podman"):
        if shutil.which(tool):
            return subprocess.run([tool, "load", "--input", tarball]).returncode
    print(f"neither docker nor podman is installed; the image tarball is {tarball}\n"
          f"(docker load --input FILE, podman load --input FILE)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
