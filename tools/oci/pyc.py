"""Bytecode compiled ahead of time for a layer's Python files.

Without it a container compiles every module it imports at every start, and cannot even keep
the result (the non-root user may not write beside the sources): importing gcsplit2's app takes
2.8 s from source and 0.27 s from bytecode (measured in its image), which is Cloud Run cold
start time.

The .pyc files are PEP 552 "unchecked-hash": no source mtime inside, and Python uses them
without reading the source first (the sources of an image never change). One sequential
`python -m compileall` compiles them, with PYTHONHASHSEED=0 because a set literal becomes a
frozenset constant marshalled in string-hash order, and with this interpreter, which must be
the image's (its cache tag, e.g. cpython-314, is checked), so the same sources always give the
same bytes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import tarball


def compiled(entries: list[tarball.Entry], cache_tag: str) -> list[tarball.Entry]:
    """Entries for __pycache__/<module>.<cache_tag>.pyc beside every .py file among entries."""
    if sys.implementation.cache_tag != cache_tag:
        raise SystemExit(f"bytecode for {cache_tag} needs that interpreter; this is {sys.implementation.cache_tag}")
    sources = [e for e in entries if e.kind == "file" and e.source and e.path.endswith(".py")]
    with tempfile.TemporaryDirectory() as tmp:
        # A tree of links at the image paths: compileall writes __pycache__ beside them and
        # records /<image path> as the file name that tracebacks show.
        for entry in sources:
            link = os.path.join(tmp, entry.path)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(entry.source), link)
        listing = "".join(os.path.join(tmp, e.path) + "\n" for e in sources)
        # Files that do not compile (Python 2 test data in some wheels) just get no bytecode.
        subprocess.run([sys.executable, "-m", "compileall", "-qq", "--invalidation-mode", "unchecked-hash",
                        "-s", tmp, "-p", "/", "-i", "-"], input=listing, text=True,
                       env=dict(os.environ, PYTHONHASHSEED="0"), check=False)
        result = []
        for entry in sources:
            directory, name = os.path.split(entry.path)
            pyc = os.path.join(directory, "__pycache__", f"{name[:-3]}.{cache_tag}.pyc")
            if os.path.exists(os.path.join(tmp, pyc)):
                with open(os.path.join(tmp, pyc), "rb") as f:
                    result.append(tarball.Entry(pyc, data=f.read(), mode=0o644))
        return result
