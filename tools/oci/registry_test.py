"""oci_push and oci_load against a real registry: push, tag, pull back by digest, load tarball.

    registry_test.py --push PUSH_LAUNCHER --digest IMAGE.digest --load IMAGE.tar

A registry (Debian's docker-registry) runs on 127.0.0.1 in a temporary folder for the test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import image_testing


def crane(*args: str) -> str:
    return subprocess.run(["crane", *args], check=True, capture_output=True, text=True).stdout.strip()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--push", required=True)
    parser.add_argument("--digest", required=True)
    parser.add_argument("--load", required=True)
    args = parser.parse_args(argv)
    digest = Path(args.digest).read_text().strip()
    with tempfile.TemporaryDirectory() as tmp, image_testing.registry(Path(tmp)) as host:
        repository = f"{host}/telepay/service"
        pushed = subprocess.run([os.path.abspath(args.push), "--repository", repository, "--tag", "smoke"],
                                check=True, capture_output=True, text=True)
        assert pushed.stdout.splitlines()[-1] == f"{repository}@{digest}", pushed.stdout + pushed.stderr
        assert crane("digest", f"{repository}:smoke") == digest
        # Pull back by digest: the same manifest, and every blob checks out against its digest.
        pulled = Path(tmp) / "pulled"
        crane("pull", "--format=oci", f"{repository}@{digest}", str(pulled))
        index = json.loads((pulled / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [digest]
        crane("validate", "--remote", f"{repository}@{digest}")
        # The :load tarball: crane reads it as a docker archive and finds the same layers.
        crane("validate", "--tarball", args.load)
        assert crane("config", f"{repository}@{digest}") == _tarball_config(args.load)
        print(f"pushed, tagged, pulled and validated {repository}@{digest}; load tarball valid")


def _tarball_config(path: str) -> str:
    with tarfile.open(path) as tar:
        (entry,) = json.load(tar.extractfile("manifest.json"))
        return tar.extractfile(entry["Config"]).read().decode()


if __name__ == "__main__":
    main(sys.argv[1:])
