"""layout.py and tarball.py: same contents give the same bytes, and the layouts are well formed."""
from __future__ import annotations

import json
import os
import tarfile

import pytest

import layout as oci
import tarball


def _tree(root, mtime, mode_bits, order):
    """The same three files with different mtimes, modes and listing order."""
    files = {"app/b.py": b"print('b')\n", "app/a/run": b"#!/x\n", "app/a/data.json": b"{}"}
    pairs = []
    for path, content in files.items():
        source = root / path.replace("/", "_")
        source.write_bytes(content)
        executable = path.endswith("run")
        os.chmod(source, (0o700 if executable else 0o600) | mode_bits)
        os.utime(source, (mtime, mtime))
        pairs.append([path, str(source)])
    manifest = root / "files.json"
    manifest.write_text(json.dumps(sorted(pairs, reverse=order)))
    return manifest


def _layer(tmp_path, name, mtime, mode_bits, order):
    root = tmp_path / name
    root.mkdir()
    out = root / "layer.tar.gz"
    oci.main(["layer", "--manifest", str(_tree(root, mtime, mode_bits, order)), "--out", str(out)])
    return out


def test_layer_bytes_depend_on_contents_only(tmp_path):
    old_umask = os.umask(0o077)
    try:
        first = _layer(tmp_path, "one", 1_000_000_000, 0o000, False)
    finally:
        os.umask(old_umask)
    second = _layer(tmp_path, "two", 1_700_000_000, 0o044, True)
    assert first.read_bytes() == second.read_bytes()


def test_layer_members_are_normalised(tmp_path):
    with tarfile.open(_layer(tmp_path, "one", 1_000_000_000, 0o000, False)) as tar:
        members = {m.name: m for m in tar}
    assert list(members) == ["app", "app/a", "app/a/data.json", "app/a/run", "app/b.py"]
    assert {(m.uid, m.gid, m.uname, m.mtime) for m in members.values()} == {(0, 0, "", tarball.MTIME)}
    assert members["app/a/run"].mode == 0o755 and members["app/b.py"].mode == 0o644


def test_two_different_entries_for_one_path_are_refused():
    with pytest.raises(ValueError, match="two different entries"):
        tarball.complete([tarball.Entry("a", data=b"1"), tarball.Entry("a", data=b"2")])


def _image(tmp_path, name, layers, options, base=None):
    (tmp_path / f"{name}.json").write_text(json.dumps(options))
    args = ["image", "--options", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name),
            "--digest", str(tmp_path / f"{name}.digest")]
    args += ["--base", str(tmp_path / base)] if base else []
    for layer in layers:
        args += ["--layer", str(layer)]
    oci.main(args)
    return oci.Layout(str(tmp_path / name))


def test_image_over_a_base(tmp_path):
    layer = _layer(tmp_path, "one", 1_000_000_000, 0o000, False)
    empty = tmp_path / "empty.tar"
    tarball.write([], str(empty), compress=False)
    _image(tmp_path, "base", [layer], {"env": {"PATH": "/bin"}, "cmd": ["sh"], "user": "1:1"})
    image = _image(tmp_path, "app", [empty, layer], {"env": {"PATH": "/app:$PATH"}, "entrypoint": ["/app/run"]}, "base")
    manifest, config = image.image()
    assert len(manifest["layers"]) == 2  # the empty tar adds no layer
    assert config["rootfs"]["diff_ids"][0] == oci.sha256_of(str(layer), oci.gzip.open)
    assert config["config"] == {"Env": ["PATH=/app:/bin"], "Entrypoint": ["/app/run"], "User": "1:1"}
    assert (tmp_path / "app.digest").read_text() == image.manifest_descriptor()["digest"]
    for descriptor in manifest["layers"] + [manifest["config"]]:
        assert oci.sha256_of(image.blob_path(descriptor["digest"])) == descriptor["digest"]


def test_load_tarball_is_a_docker_and_an_oci_archive(tmp_path):
    layer = _layer(tmp_path, "one", 1_000_000_000, 0o000, False)
    image = _image(tmp_path, "img", [layer], {"entrypoint": ["/app/run"]})
    out = tmp_path / "img.tar"
    oci.main(["load", "--image", image.root, "--repo-tag", "telepay/x:latest", "--out", str(out)])
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        docker = json.load(tar.extractfile("manifest.json"))
        index = json.load(tar.extractfile("index.json"))
    manifest, _ = image.image()
    assert docker == [{"Config": "blobs/" + manifest["config"]["digest"].replace(":", "/"),
                       "Layers": ["blobs/" + manifest["layers"][0]["digest"].replace(":", "/")],
                       "RepoTags": ["telepay/x:latest"]}]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "telepay/x:latest"
    assert {"oci-layout", docker[0]["Config"], *docker[0]["Layers"]} <= names
