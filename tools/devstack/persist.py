"""Process plumbing of the stack's world parts (world.py): stop on SIGTERM, and keep state in files
that a crash leaves either old or new, never half written."""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

SAVE_EVERY_S = 3.0


def wait_for_termination() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def write_atomically(path: Path, data: bytes) -> None:
    """Replace a file in one step, so a crash leaves the old or the new content, never half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class SavedState:
    """A pickle file holding a stand-in's state: loaded at start, saved on stop and while it changes."""

    def __init__(self, path: Path, capture: Callable[[], Any], lock: threading.Lock):
        self.path, self.capture, self.lock = path, capture, lock  # the stand-in's lock: no change mid-pickle
        self._last = b""

    def load(self) -> Any:
        """The saved state, or None the first time."""
        return pickle.loads(self.path.read_bytes()) if self.path.exists() else None

    def save(self) -> None:
        """Write the current state when it differs from what was last written."""
        with self.lock:
            data = pickle.dumps(self.capture())
        if data != self._last:
            write_atomically(self.path, data)
            self._last = data

    def save_periodically(self) -> None:
        """Save every few seconds in a daemon thread (a crash then loses seconds, not the run)."""
        def loop():
            while True:
                time.sleep(SAVE_EVERY_S)
                self.save()
        threading.Thread(target=loop, name="save-state", daemon=True).start()
