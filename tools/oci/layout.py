"""OCI image layouts from tar layers: the build actions behind tools/oci/defs.bzl.

    layout.py layer --manifest FILES.json [--pyc-cache-tag cpython-314] --out LAYER.tar.gz
    layout.py image [--base DIR] [--layer TAR]... --options OPTIONS.json [--env-file FILE]...
                    --out DIR --digest FILE
    layout.py load --image DIR [--repo-tag NAME:TAG]... --out IMAGE.tar

Everything written is a pure function of the inputs' contents: JSON is canonical (sorted keys,
no spaces), the config's timestamps are the epoch, tars come from tarball.py, so two builds on
two machines give the same image digest.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile

import pyc
import tarball

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = "1970-01-01T00:00:00Z"
CHUNK = 1 << 20


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_of(path: str, opener=open) -> str:
    digest = hashlib.sha256()
    with opener(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def blob_name(digest: str) -> str:
    """A blob's path inside a layout (or a load tarball): blobs/sha256/<hex>."""
    return "blobs/" + digest.replace(":", "/")


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class Layout:
    """An OCI image layout directory: oci-layout, index.json and content-addressed blobs."""

    def __init__(self, root: str):
        self.root = root

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, blob_name(digest))

    def read_json(self, digest: str):
        with open(self.blob_path(digest), "rb") as f:
            return json.load(f)

    def add_bytes(self, data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.dirname(self.blob_path(digest)), exist_ok=True)
        with open(self.blob_path(digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_file(self, path: str, media_type: str, digest: str | None = None, move: bool = False) -> dict:
        digest, size = digest or sha256_of(path), os.path.getsize(path)
        os.makedirs(os.path.dirname(self.blob_path(digest)), exist_ok=True)
        (os.replace if move else shutil.copyfile)(path, self.blob_path(digest))
        return {"mediaType": media_type, "digest": digest, "size": size}

    def manifest_descriptor(self) -> dict:
        with open(os.path.join(self.root, "index.json"), "rb") as f:
            manifests = json.load(f)["manifests"]
        if len(manifests) != 1 or manifests[0]["mediaType"] != MANIFEST:
            raise SystemExit(f"{self.root}: expected an index of exactly one image manifest")
        return manifests[0]

    def image(self) -> tuple[dict, dict]:
        """The (manifest, config) of the layout's one image."""
        manifest = self.read_json(self.manifest_descriptor()["digest"])
        return manifest, self.read_json(manifest["config"]["digest"])

    def write_index(self, manifest_descriptor: dict, annotations: dict | None = None) -> None:
        entry = dict(manifest_descriptor, **({"annotations": annotations} if annotations else {}))
        for name, content in (("oci-layout", {"imageLayoutVersion": "1.0.0"}),
                              ("index.json", {"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry]})):
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(canonical(content))


# ---------------------------------------------------------------- layer


def cmd_layer(args) -> None:
    """A gzip tar of [image path, source file] pairs (source None: an empty file), plus bytecode."""
    with open(args.manifest) as f:
        pairs = json.load(f)
    entries = [tarball.Entry(path, source=src) if src else tarball.Entry(path, data=b"") for path, src in pairs]
    if args.pyc_cache_tag:
        entries += pyc.compiled(entries, args.pyc_cache_tag)
    tarball.write(entries, args.out)


# ---------------------------------------------------------------- image


def _expand(value: str, env: dict) -> str:
    """$NAME and ${NAME} take the base image's value (rules_oci does the same), e.g. PATH."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], ""), value)


def _merge_env(base: list[str], updates: dict) -> list[str]:
    env = dict(item.split("=", 1) for item in base)
    for name, value in updates.items():
        env[name] = _expand(value, env)
    return [f"{k}={v}" for k, v in env.items()]


def _read_env_file(path: str) -> dict:
    with open(path) as f:
        return dict(line.split("=", 1) for line in f.read().splitlines() if line.strip())


def _new_config(options: dict) -> dict:
    return {"architecture": options.get("architecture") or "amd64", "os": options.get("os") or "linux",
            "config": {}, "rootfs": {"type": "layers", "diff_ids": []}, "history": []}


def _apply_options(config: dict, options: dict, env: dict) -> None:
    """Sets the runtime config the way a Dockerfile would over its FROM image."""
    runtime = config.setdefault("config", {})
    if options.get("entrypoint"):
        runtime["Entrypoint"] = options["entrypoint"]
        runtime.pop("Cmd", None)  # as Docker: a new ENTRYPOINT drops the base image's CMD
    if options.get("cmd"):
        runtime["Cmd"] = options["cmd"]
    if env:
        runtime["Env"] = _merge_env(runtime.get("Env") or [], env)
    for key, name in (("user", "User"), ("workdir", "WorkingDir")):
        if options.get(key):
            runtime[name] = options[key]
    if options.get("labels"):
        runtime["Labels"] = {**(runtime.get("Labels") or {}), **options["labels"]}
    for port in options.get("exposed_ports") or []:
        runtime.setdefault("ExposedPorts", {})[port if "/" in port else port + "/tcp"] = {}
    for key in ("os", "architecture"):
        if options.get(key):
            config[key] = options[key]
    config["created"] = EPOCH


def _add_layer(layout: Layout, path: str) -> tuple[dict, str] | None:
    """Copies one tar (gzip-compressing it if needed) as a blob; None for an empty tar."""
    with tarfile.open(path) as tar:
        if tar.next() is None:
            return None
    if not is_gzip(path):
        compressed = os.path.join(layout.root, "layer.tar.gz.tmp")
        with open(path, "rb") as src, open(compressed, "wb") as raw, tarball.gzip_writer(raw) as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return layout.add_file(compressed, LAYER_GZIP, move=True), sha256_of(path)
    return layout.add_file(path, LAYER_GZIP), sha256_of(path, gzip.open)


def cmd_image(args) -> None:
    with open(args.options) as f:
        options = json.load(f)
    env = {}
    for path in args.env_file:
        env.update(_read_env_file(path))
    env.update(options.get("env") or {})
    layout = Layout(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.base:
        base = Layout(args.base)
        manifest, config = base.image()
        for descriptor in manifest["layers"]:
            layout.add_file(base.blob_path(descriptor["digest"]), descriptor["mediaType"], descriptor["digest"])
        layers = list(manifest["layers"])
    else:
        config, layers = _new_config(options), []
    for path in args.layer:
        added = _add_layer(layout, path)
        if added:
            layers.append(added[0])
            config["rootfs"]["diff_ids"].append(added[1])
            # One history entry per layer keeps it consistent with a base that has history; the
            # text is fixed so that renaming a target does not change the digest.
            config.setdefault("history", []).append({"created": EPOCH, "created_by": "bazel build (tools/oci)"})
    _apply_options(config, options, env)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": layout.add_bytes(canonical(config), CONFIG), "layers": layers}
    if options.get("annotations"):
        manifest["annotations"] = options["annotations"]
    descriptor = layout.add_bytes(canonical(manifest), MANIFEST)
    descriptor["platform"] = {"architecture": config["architecture"], "os": config["os"]}
    layout.write_index(descriptor)
    with open(args.digest, "w") as f:
        f.write(descriptor["digest"])


# ---------------------------------------------------------------- load


def cmd_load(args) -> None:
    """One tarball that is both a `docker save` archive (manifest.json) and an OCI archive."""
    image = Layout(args.image)
    descriptor = image.manifest_descriptor()
    manifest, _ = image.image()
    blobs = [descriptor["digest"], manifest["config"]["digest"]] + [d["digest"] for d in manifest["layers"]]
    docker = [{"Config": blob_name(manifest["config"]["digest"]), "RepoTags": args.repo_tag,
               "Layers": [blob_name(d["digest"]) for d in manifest["layers"]]}]
    if args.repo_tag:  # the name podman and containerd give an OCI archive's image
        names = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
        descriptor = dict(descriptor, annotations=dict.fromkeys(names, args.repo_tag[0]))
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [descriptor]}
    entries = [tarball.Entry(blob_name(d), source=image.blob_path(d), mode=0o644) for d in dict.fromkeys(blobs)]
    entries += [tarball.Entry("manifest.json", data=canonical(docker)),
                tarball.Entry("index.json", data=canonical(index)),
                tarball.Entry("oci-layout", data=canonical({"imageLayoutVersion": "1.0.0"}))]
    tarball.write(entries, args.out, compress=False)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    layer = commands.add_parser("layer")
    layer.add_argument("--manifest", required=True)
    layer.add_argument("--pyc-cache-tag", help="also compile .py files for this interpreter (pyc.py)")
    layer.add_argument("--out", required=True)
    image = commands.add_parser("image")
    image.add_argument("--base")
    image.add_argument("--layer", action="append", default=[])
    image.add_argument("--options", required=True)
    image.add_argument("--env-file", action="append", default=[])
    image.add_argument("--out", required=True)
    image.add_argument("--digest", required=True)
    load = commands.add_parser("load")
    load.add_argument("--image", required=True)
    load.add_argument("--repo-tag", action="append", default=[])
    load.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"layer": cmd_layer, "image": cmd_image, "load": cmd_load}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
