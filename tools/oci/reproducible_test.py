"""A second, clean build of an image gives the digest Bazel built: nothing but contents count.

    reproducible_test.py --image LAYOUT --options OPTIONS.json --env-file ENV --base LAYOUT
                         --base-options OPTIONS.json --rootfs ROOTFS.tar.gz

Everything the image is made of is built again here, in a fresh folder, from differently
prepared inputs, and must come out byte for byte the same:
* the base root filesystem, read again from the build environment's dpkg database (what the
  python_base_rootfs repository rule did at fetch time), with another umask;
* the base image from it;
* every other layer, from copies of its source files (found in this test's runfiles, where
  Bazel put the same files) given other mtimes, other permission bits and another order, its
  bytecode compiled again in another process;
* the image from all that, compared with the digest Bazel built.
What this cannot redo is fetching the wheels; tools/oci/check-reproducible builds everything
from nothing in a second output base for that (README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import debian_rootfs
import image_testing
import layout as oci


def rebuild_rootfs(work: Path, reference: str) -> str:
    """The base root filesystem again, from the same packages: its sha256."""
    names = [line.split("=", 1)[0] for line in Path(reference).with_name("packages.txt").read_text().splitlines()]
    with open("/var/lib/dpkg/status", encoding="utf-8") as f:
        installed = debian_rootfs.parse_status(f.read())
    # The closure of the chosen packages with everything else excluded is exactly those packages.
    args = [f"--package={n}" for n in names] + [f"--exclude={n}" for n in set(installed) - set(names)]
    out = work / "rootfs.tar.gz"
    old_umask = os.umask(0o027)
    try:
        debian_rootfs.main(args + ["--pyc-cache-tag", sys.implementation.cache_tag, "--out", str(out),
                                   "--versions-out", str(work / "packages.txt")])
    finally:
        os.umask(old_umask)
    return str(out)


def rebuild_layer(work: Path, blob: str, number: int) -> str:
    """A layer again, from scrambled copies of its files as they sit in this test's runfiles."""
    rng = random.Random(number)
    with tarfile.open(blob) as tar:  # the bytecode is compiled again, not copied
        members = [m for m in tar if m.isfile() and "/__pycache__/" not in m.name]
    pairs = []
    for member in members:
        path = member.name.split("/", 1)[1]  # app/<runfiles path>
        copy = work / f"layer{number}" / path
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_testing.runfile(path), copy)
        os.chmod(copy, rng.choice([0o700, 0o750, 0o775]) if member.mode & 0o111 else rng.choice([0o600, 0o640, 0o664]))
        os.utime(copy, (rng.randrange(1 << 31),) * 2)
        pairs.append([member.name, str(copy)])
    rng.shuffle(pairs)
    manifest = work / f"layer{number}.json"
    manifest.write_text(json.dumps(pairs))
    out = work / f"layer{number}.tar.gz"
    oci.main(["layer", "--manifest", str(manifest), "--pyc-cache-tag", sys.implementation.cache_tag, "--out", str(out)])
    return str(out)


def build_image(work: Path, name: str, options: str, layers: list[str], base: str | None = None,
                env_file: str | None = None) -> str:
    args = ["image", "--options", options, "--out", str(work / name), "--digest", str(work / f"{name}.digest")]
    args += ["--base", base] if base else []
    args += ["--env-file", env_file] if env_file else []
    for layer in layers:
        args += ["--layer", layer]
    oci.main(args)
    return (work / f"{name}.digest").read_text()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--image", "--options", "--env-file", "--base", "--base-options", "--rootfs"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    built = oci.Layout(args.image)
    base_manifest, _ = oci.Layout(args.base).image()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rootfs = rebuild_rootfs(work, args.rootfs)
        assert oci.sha256_of(rootfs) == oci.sha256_of(args.rootfs), "the base root filesystem differs"
        base = build_image(work, "base", args.base_options, [rootfs])
        assert base == oci.Layout(args.base).manifest_descriptor()["digest"], "the base image differs"
        own_layers = built.image()[0]["layers"][len(base_manifest["layers"]):]
        layers = [rebuild_layer(work, built.blob_path(d["digest"]), i) for i, d in enumerate(own_layers)]
        for layer, descriptor in zip(layers, own_layers):
            assert oci.sha256_of(layer) == descriptor["digest"], f"layer {descriptor['digest']} differs"
        digest = build_image(work, "image", args.options, layers, str(work / "base"), args.env_file)
        assert digest == built.manifest_descriptor()["digest"], "the image differs"
        print(f"rebuilt {len(layers)} layers, the base and the image: {digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
