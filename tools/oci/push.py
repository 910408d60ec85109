"""Pushes an OCI image layout with crane: by digest, then each tag; prints repository@digest.

    push.py --image DIR --repository R [--tag T]... [crane flags, e.g. --insecure]

oci_push bakes --image, --repository and its remote_tags in; `bazel run :push -- ...` may add
--repository (the last one wins), more --tag, and flags for crane. crane is $CRANE or the one on
PATH (the build environment has Debian's); credentials are crane's own (`crane auth login`, or
~/.docker/config.json and its credential helpers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def manifest_digest(layout: str) -> str:
    with open(os.path.join(layout, "index.json")) as f:
        (manifest,) = json.load(f)["manifests"]
    return manifest["digest"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True)
    parser.add_argument("--repository", required=True)
    parser.add_argument("--tag", action="append", default=[])
    args, crane_flags = parser.parse_known_args(argv)
    crane = os.environ.get("CRANE", "crane")
    reference = f"{args.repository}@{manifest_digest(args.image)}"
    # Progress goes to stderr; stdout carries only the pushed reference, for scripts.
    subprocess.run([crane, "push", args.image, reference, *crane_flags], check=True, stdout=sys.stderr)
    for tag in args.tag:
        subprocess.run([crane, "tag", reference, tag, *crane_flags], check=True, stdout=sys.stderr)
    print(reference)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as error:
        sys.exit(f"push: {' '.join(error.cmd[:2])} failed (exit {error.returncode})")
