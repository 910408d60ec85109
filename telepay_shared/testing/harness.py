"""The start/stop protocol of the local harnesses and stand-ins (servers, emulators, recorders).

`with SomeHarness() as running:` starts it and stops it after the block. A start() made of several
steps wraps them in `with self.stopped_on_failure():`, so a step that fails stops what the
earlier ones began (a process, a port, a directory) before the error goes on.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self


class Harness:
    """Base of a harness whose start() returns it running and whose stop() may be called at any time."""

    def start(self) -> Self:
        """Start; returns self once ready for use."""
        raise NotImplementedError

    def stop(self) -> None:
        """Release everything start() took; a no-op when nothing is running."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @contextmanager
    def stopped_on_failure(self) -> Iterator[None]:
        """Around the steps of start(): if one raises, stop() and let the error through."""
        try:
            yield
        except BaseException:
            self.stop()
            raise
