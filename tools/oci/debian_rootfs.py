"""A distroless-style root filesystem from the Debian packages installed where this runs.

    debian_rootfs.py --package python3.14-minimal ... [--exclude debconf ...] --out rootfs.tar.gz
                     --versions-out packages.txt [--root /]

Run by the python_base repository rule inside the build environment, so the image gets the very
CPython (and OpenSSL, libc, ...) the wheels were resolved and tested against. It takes the named
packages and everything they depend on (Depends, Pre-Depends), minus --exclude (packages only
needed by maintainer scripts, e.g. debconf), reads each one's files from dpkg's database, checks
them against dpkg's md5sums (a modified build root fails the build instead of leaking into the
image), and adds what a container needs and dpkg does not install: /etc/passwd and /etc/group with
a non-root user, nsswitch.conf, the CA bundle, /home/nonroot and the scanners' package records
(/var/lib/dpkg/status.d, as distroless does), and the standard library's bytecode (pyc.py:
Debian compiles it in a maintainer script, which never runs here). Documentation other than
copyright files, manual pages and translations are left out. No shell and no package manager
end up in the image.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import stat
import sys

import pyc  # beside this file: run as a script, its folder is on sys.path
import tarball

NONROOT_UID = 65532  # distroless's "nonroot"
_DROPPED = re.compile(r"usr/share/(doc|man|info|lintian|locale|bug)(/|$)")
_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\n"
                  f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin\n",
    "etc/group": f"root:x:0:\nnonroot:x:{NONROOT_UID}:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
                         "networks: files\nprotocols: files\nservices: files\n",
}
# OpenSSL's default paths (Debian's openssl package, which we leave out, ships these links).
_LINKS = {"usr/lib/ssl/cert.pem": "/etc/ssl/certs/ca-certificates.crt", "usr/lib/ssl/certs": "/etc/ssl/certs",
          "usr/bin/python3": "python3.14"}


def parse_status(text: str) -> dict[str, dict]:
    """Installed packages from /var/lib/dpkg/status: name -> fields (plus the raw paragraph)."""
    packages = {}
    for paragraph in text.strip().split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*(?:\n[ \t].*)*)", paragraph, re.M))
        if fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = dict(fields, _raw=paragraph.strip() + "\n")
    return packages


def dependencies(fields: dict) -> list[list[str]]:
    """Each dependency as its list of alternatives, versions and architecture qualifiers dropped."""
    text = ", ".join(filter(None, (fields.get("Pre-Depends"), fields.get("Depends"))))
    return [[re.sub(r"\(.*?\)|:\w+", "", alternative).strip() for alternative in dependency.split("|")]
            for dependency in text.split(",") if dependency.strip()]


def closure(roots: list[str], exclude: set[str], packages: dict[str, dict]) -> list[str]:
    """The roots and their dependencies; a dependency with an excluded alternative is skipped."""
    provides: dict[str, list[str]] = {}
    for name, fields in packages.items():
        for virtual in re.findall(r"([\w.+-]+)(?:\s*\([^)]*\))?", fields.get("Provides", "")):
            provides.setdefault(virtual, []).append(name)
    chosen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        if name not in packages:
            raise SystemExit(f"debian_rootfs: package {name} is not installed in the build environment")
        chosen.add(name)
        for alternatives in dependencies(packages[name]):
            names = [n if n in packages else min(provides.get(n, [n])) for n in alternatives]
            if not exclude.intersection(alternatives + names):
                todo.append(next((n for n in names if n in packages), names[0]))
    return sorted(chosen)


def _info(root: str, package: str, suffix: str) -> str:
    """A file of dpkg's database for a package, with or without its :arch qualifier."""
    for name in (f"{package}:amd64.{suffix}", f"{package}.{suffix}"):
        path = os.path.join(root, "var/lib/dpkg/info", name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    return ""


def _checksums(root: str, package: str, fields: dict) -> dict[str, str]:
    sums = {path: md5 for md5, path in (line.split(None, 1) for line in _info(root, package, "md5sums").splitlines())}
    for line in fields.get("Conffiles", "").splitlines():  # conffiles are checked too
        parts = line.split()
        if len(parts) >= 2:
            sums[parts[0].lstrip("/")] = parts[1]
    return sums


def _canonical(root: str, path: str) -> str:
    """The path with its parent's symlinks resolved (/lib/x -> usr/lib/x on merged-/usr)."""
    parent = os.path.realpath(os.path.join(root, os.path.dirname(path)))
    return os.path.relpath(os.path.join(parent, os.path.basename(path)), root)


def package_entries(root: str, package: str, fields: dict) -> list[tarball.Entry]:
    entries, sums = [], _checksums(root, package, fields)
    for listed in _info(root, package, "list").splitlines():
        path = listed.lstrip("/")
        if not path or path == "." or (_DROPPED.match(path) and not path.endswith("/copyright")):
            continue
        source = os.path.join(root, path)
        info = os.lstat(source)
        name = _canonical(root, path)
        if stat.S_ISLNK(info.st_mode):
            entries.append(tarball.Entry(name, "symlink", target=os.readlink(source)))
        elif stat.S_ISDIR(info.st_mode):
            entries.append(tarball.Entry(name, "dir", mode=stat.S_IMODE(info.st_mode)))
        else:
            with open(source, "rb") as f:
                if path in sums and hashlib.md5(f.read()).hexdigest() != sums[path]:
                    raise SystemExit(f"debian_rootfs: /{path} differs from package {package}'s copy")
            entries.append(tarball.Entry(name, source=source, mode=stat.S_IMODE(info.st_mode)))
    return entries


def _ca_bundle(root: str) -> bytes:
    """Every certificate of the ca-certificates package in one PEM file (update-ca-certificates'
    output without the build machine's own additions, such as an inspecting proxy's CA)."""
    certs = os.path.join(root, "usr/share/ca-certificates/mozilla")
    pems = []
    for name in sorted(os.listdir(certs)):
        with open(os.path.join(certs, name), "rb") as f:
            pems.append(f.read().rstrip(b"\n") + b"\n")
    return b"".join(pems)


def extra_entries(root: str, packages: dict[str, dict], chosen: list[str]) -> list[tarball.Entry]:
    entries = [tarball.Entry(path, data=text.encode()) for path, text in _FILES.items()]
    entries += [tarball.Entry(path, "symlink", target=target) for path, target in _LINKS.items()]
    entries += [tarball.Entry("etc/ssl/certs/ca-certificates.crt", data=_ca_bundle(root)),
                tarball.Entry("home/nonroot", "dir", mode=0o700, uid=NONROOT_UID, gid=NONROOT_UID)]
    entries += [tarball.Entry(f"var/lib/dpkg/status.d/{name}", data=packages[name]["_raw"].encode())
                for name in chosen]
    return entries


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/")
    parser.add_argument("--package", action="append", required=True)
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--pyc-cache-tag", help="compile the packages' .py files for this interpreter")
    parser.add_argument("--out", required=True)
    parser.add_argument("--versions-out", required=True)
    args = parser.parse_args(argv)
    with open(os.path.join(args.root, "var/lib/dpkg/status"), encoding="utf-8") as f:
        packages = parse_status(f.read())
    chosen = closure(args.package, set(args.exclude), packages)
    entries = [e for name in chosen for e in package_entries(args.root, name, packages[name])]
    # Generated files win over a package's copy of the same path (e.g. base-files' empty /home).
    generated = extra_entries(args.root, packages, chosen)
    replaced = {e.path for e in generated}
    entries = [e for e in entries if e.path not in replaced] + generated
    tarball.write(entries + (pyc.compiled(entries, args.pyc_cache_tag) if args.pyc_cache_tag else []), args.out)
    with open(args.versions_out, "w") as f:
        f.writelines(f"{name}={packages[name]['Version']}\n" for name in chosen)


if __name__ == "__main__":
    main(sys.argv[1:])
