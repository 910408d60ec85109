"""Reproducible tar archives: the same entries always give the same bytes.

Every member gets a fixed mtime, owner 0:0 (unless given), no user or group names, a normalised
mode, and members are written in path order with every parent directory listed first. That is
what makes an image layer's digest depend on file contents only, never on the machine, the
checkout time or the umask of whoever built it.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from dataclasses import dataclass

# 2000-01-01, as rules_pkg's pkg_tar: some tools refuse timestamps before 1980.
MTIME = 946684800


@dataclass(frozen=True)
class Entry:
    """One member: a regular file (source path or inline bytes), a directory or a symlink."""

    path: str  # relative, no leading "/" or "./"
    kind: str = "file"  # file, dir, symlink
    source: str | None = None
    data: bytes | None = None
    target: str | None = None  # symlink target
    mode: int | None = None  # default: 0755 for directories and executables, else 0644
    uid: int = 0
    gid: int = 0


def file_mode(path: str) -> int:
    """0755 when any execute bit is set on the file, else 0644: read-only build outputs and
    group-writable checkouts all map to the same two modes."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def complete(entries: list[Entry]) -> list[Entry]:
    """Adds missing parent directories and sorts; a path given twice is an error."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        path = entry.path.strip("/")
        if path in by_path and by_path[path] != entry:
            raise ValueError(f"two different entries for {path}")
        by_path[path] = entry
    for path in list(by_path):
        for parent in _parents(path):
            by_path.setdefault(parent, Entry(parent, "dir"))
    return [by_path[p] for p in sorted(by_path)]


def _member(entry: Entry) -> tuple[tarfile.TarInfo, io.IOBase | None]:
    info = tarfile.TarInfo(entry.path.strip("/"))
    info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, entry.uid, entry.gid, "", ""
    if entry.kind == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755 if entry.mode is None else entry.mode
        return info, None
    if entry.kind == "symlink":
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
        return info, None
    if entry.data is not None:
        info.size, info.mode = len(entry.data), 0o644 if entry.mode is None else entry.mode
        return info, io.BytesIO(entry.data)
    info.size = os.path.getsize(entry.source)
    info.mode = file_mode(entry.source) if entry.mode is None else entry.mode
    return info, open(entry.source, "rb")


def gzip_writer(raw):
    """gzip with no file name and mtime 0 in its header; level 6 is gzip's own default."""
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)


def write(entries: list[Entry], out_path: str, compress: bool = True) -> None:
    """Writes the entries (parents added, sorted) as a tar, gzip-compressed by default."""
    with open(out_path, "wb") as raw:
        stream = gzip_writer(raw) if compress else raw
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in complete(entries):
                info, content = _member(entry)
                if content is None:
                    tar.addfile(info)
                else:
                    with content:
                        tar.addfile(info, content)
        if compress:
            stream.close()
