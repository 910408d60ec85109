"""Process plumbing of the stack's world parts (world.py): stop on SIGTERM, and keep state in files
that a crash leaves either old or new, never half written."""
from __future__ import annotations

import io
import os
import pickle
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

SAVE_EVERY_S = 1.0  # what a crash of a stand-in can lose: the changes of its last second


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


class _Tracking:
    """What TrackedDict adds to a dict: the keys that may have changed since the last take_changes().

    A key counts as touched when it is stored, removed, or looked up by key (`d[k]`, `d.get(k)`,
    `d.setdefault(k)`): a stand-in changes a record in place only after looking it up by key, under
    its lock, so every record that can have changed is touched. Iterating (`items()`, `values()`)
    touches nothing; it is how the stand-ins read, never how they change.
    """

    touched: set

    def __init__(self, *args, **kwargs):
        self.touched = set()
        super().__init__(*args, **kwargs)
        self.touched = set()  # storing the initial contents is not a change

    def __getitem__(self, key):
        self.touched.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.touched.add(key)
        return super().get(key, default)

    def setdefault(self, key, default=None):
        self.touched.add(key)
        return super().setdefault(key, default)

    def __setitem__(self, key, value) -> None:
        self.touched.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.touched.add(key)
        super().__delitem__(key)

    def pop(self, key, *default):
        self.touched.add(key)
        return super().pop(key, *default)

    def popitem(self):
        key, value = super().popitem()
        self.touched.add(key)
        return key, value

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        self.touched.update(self.keys())
        super().clear()

    def take_changes(self) -> tuple[dict, list]:
        """(the touched keys still present with their values, the touched keys now absent); forgets them."""
        present = {key: dict.__getitem__(self, key) for key in self.touched if dict.__contains__(self, key)}
        absent = [key for key in self.touched if not dict.__contains__(self, key)]
        self.touched = set()
        return present, absent


class TrackedDict(_Tracking, dict):
    """A dict that knows which of its keys may have changed (_Tracking)."""


class TrackedDefaultDict(_Tracking, defaultdict):
    """A defaultdict that knows which of its keys may have changed (_Tracking)."""


class SavedState:
    """A stand-in's state in two files: a snapshot, and a journal of the changes made since it.

    The state is named collections, each a TrackedDict or TrackedDefaultDict (records changed in
    place) or a list (append-only, as a log of sent messages is), plus `extras`: small values
    captured whole each time (a block number). Every SAVE_EVERY_S the changes since the last save
    (the touched records, the list's new tail) are appended to the journal as one pickle, so a save
    costs what changed, not what exists: a long-lived stack holds tens of thousands of exchanges and
    rewriting them all every few seconds cost more CPU than serving the payments did.

    `compact()` (at start, after loading, and at a clean stop) writes a whole snapshot and empties the
    journal. A crash between the two leaves a journal whose frames are all in the snapshot already;
    replaying them again gives the same state, since each frame holds whole records and the list
    positions its items belong at, and the snapshot is taken right after the last frame (under the
    same lock). A frame cut short by a crash is the last one, and is dropped.
    """

    def __init__(self, path: Path, lock: threading.Lock, collections: dict[str, Any],
                 extras: Callable[[], dict] = dict):
        self.path, self.lock, self.collections, self.extras = path, lock, collections, extras
        self.journal_path = path.with_name(path.name + ".journal")
        self._listed = {name: 0 for name, items in collections.items() if isinstance(items, list)}
        self._last_extras: dict = {}
        self._writing = threading.Lock()  # one save at a time, so frames land in the order taken

    def load(self) -> dict:
        """Fill the collections from the snapshot and the journal; the saved extras ({} the first time)."""
        saved = pickle.loads(self.path.read_bytes()) if self.path.exists() else {}
        extras = {key: value for key, value in saved.items() if key not in self.collections}
        for name, items in self.collections.items():
            stored = saved.get(name)
            if stored:
                if isinstance(items, list):
                    items.extend(stored)
                else:
                    items.update(stored)
        for frame in self._frames():
            extras.update(frame["extras"])
            for name, (changed, removed) in frame["dicts"].items():
                target = self.collections[name]
                target.update(changed)
                for key in removed:
                    target.pop(key, None)
            for name, (start, appended) in frame["lists"].items():
                del self.collections[name][start:]
                self.collections[name].extend(appended)
        for items in self.collections.values():
            if not isinstance(items, list):
                items.touched = set()
        self._listed = {name: len(self.collections[name]) for name in self._listed}
        self._last_extras = dict(extras)
        return extras

    def _frames(self):
        """The journal's frames in order; a torn last frame (a crash mid-write) ends them."""
        if not self.journal_path.exists():
            return
        stream = io.BytesIO(self.journal_path.read_bytes())
        while stream.tell() < len(stream.getbuffer()):
            try:
                yield pickle.load(stream)
            except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, IndexError):
                return

    def save(self) -> bool:
        """Append what changed since the last save to the journal; whether anything had."""
        with self._writing:
            with self.lock:
                frame = self._take_changes()
            if frame is None:
                return False
            with open(self.journal_path, "ab") as journal:
                journal.write(frame)
            return True

    def _take_changes(self) -> bytes | None:
        """The pickled frame of the changes since the last one, or None (under the stand-in's lock)."""
        dicts, lists = {}, {}
        for name, items in self.collections.items():
            if isinstance(items, list):
                start = self._listed[name]
                if len(items) > start:
                    lists[name] = (start, items[start:])
                    self._listed[name] = len(items)
            elif items.touched:
                dicts[name] = items.take_changes()
        extras = self.extras()
        if not dicts and not lists and extras == self._last_extras:
            return None
        self._last_extras = dict(extras)
        return pickle.dumps({"dicts": dicts, "lists": lists, "extras": extras})

    def compact(self) -> None:
        """Write the whole state as the snapshot, then empty the journal it makes redundant."""
        with self._writing:
            with self.lock:
                frame = self._take_changes()
                whole = pickle.dumps({**{name: (list(items) if isinstance(items, list) else dict(items))
                                         for name, items in self.collections.items()}, **self.extras()})
            if frame is not None:
                with open(self.journal_path, "ab") as journal:
                    journal.write(frame)
            write_atomically(self.path, whole)
            self._empty_journal()

    def _empty_journal(self) -> None:
        self.journal_path.write_bytes(b"")

    def save_periodically(self) -> None:
        """Save every SAVE_EVERY_S in a daemon thread (a crash then loses at most that much)."""
        def loop():
            while True:
                time.sleep(SAVE_EVERY_S)
                self.save()
        threading.Thread(target=loop, name="save-state", daemon=True).start()
