"""Test helpers for images: unpack one into a root filesystem and run it there, run a registry.

Tests run as root inside the build environment (tools/bazel), which is what chroot, mount and
setuid need. The image runs the way a container runtime would run it: its layers unpacked in
order, its Entrypoint/Cmd, Env, WorkingDir and User, in private mount and PID namespaces with
/proc and /dev, on the host's network; nothing from the host's filesystem is visible to it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import layout as oci


def runfile(path: str) -> Path:
    """A file of this test's runfiles, by its path under the runfiles root or the main repository."""
    root = Path(os.environ.get("RUNFILES_DIR") or os.environ["TEST_SRCDIR"])
    return root / path if (root / path).exists() else root / "_main" / path


def image_config(layout_dir: str | Path) -> dict:
    return oci.Layout(str(layout_dir)).image()[1]


def unpack(layout_dir: str | Path, root: str | Path) -> Path:
    """Extracts the image's layers in order into root, applying OCI whiteouts."""
    image = oci.Layout(str(layout_dir))
    manifest, _ = image.image()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for layer in manifest["layers"]:
        with tarfile.open(image.blob_path(layer["digest"])) as tar:
            members = []
            for member in tar:
                name = Path(member.name)
                if name.name == ".wh..wh..opq":
                    _clear(root / name.parent)
                elif name.name.startswith(".wh."):
                    _remove(root / name.parent / name.name[4:])
                else:
                    members.append(member)
            # Our own image: its absolute symlinks, setuid bits and owners are wanted as they are.
            tar.extractall(root, members, filter="fully_trusted")
    return root


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clear(directory: Path) -> None:
    for child in directory.iterdir() if directory.is_dir() else ():
        _remove(child)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user(spec: str) -> tuple[str, str]:
    uid, _, gid = (spec or "0").partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ValueError(f"image User {spec!r}: only numeric uid[:gid] is supported here")
    return uid, gid or uid


@contextlib.contextmanager
def run_image(root: Path, config: dict, env: dict[str, str], args: list[str] | None = None):
    """Starts the image's process (or args instead of its Entrypoint+Cmd) in root; yields the Popen."""
    runtime = config.get("config", {})
    argv = args or (runtime.get("Entrypoint") or []) + (runtime.get("Cmd") or [])
    environment = dict(item.split("=", 1) for item in runtime.get("Env") or [])
    environment.update(env)
    uid, gid = _user(runtime.get("User", ""))
    for mountpoint in ("proc", "dev"):
        (root / mountpoint).mkdir(exist_ok=True)
    # A new mount namespace in which root is its own private mount with /dev bound in, then a new
    # PID namespace with its own /proc, chrooted into root, in the working directory, as the
    # image's user: a container, minus cgroups. Under tools/bazel "/" is a chroot (not a mount
    # point, so its propagation cannot change) in a namespace that is private already.
    setup = ('{ mount --make-rprivate / 2>/dev/null || true; } && mount --bind "$0" "$0" && '
             'mount --make-private "$0" && mount --rbind /dev "$0/dev" && exec "$@"')
    inner = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc=/proc", "--propagation=unchanged",
             f"--root={root}", f"--wd={runtime.get('WorkingDir') or '/'}", f"--setgid={gid}", f"--setuid={uid}",
             "--", *argv]
    command = ["unshare", "--mount", "--propagation=unchanged", "--", "sh", "-c", setup, str(root), *inner]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, bytes]:
    """GETs url until it answers; fails early if the process exits (its output in the message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"the image exited with {process.returncode}:\n{process.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer from {url} within {timeout_s} s")
            time.sleep(0.2)


@contextlib.contextmanager
def registry(workdir: Path):
    """A throwaway OCI registry (Debian's docker-registry, distribution 2.8) on 127.0.0.1; yields host:port."""
    port = free_port()
    config = workdir / "registry.json"  # YAML is a superset of JSON
    config.write_text(json.dumps({
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    process = subprocess.Popen(["docker-registry", "serve", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", process, timeout_s=30)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
