"""Tests of telepay_shared.testing.harness: the context-manager protocol and stopping a failed start."""
import pytest

from telepay_shared.testing.harness import Harness


class Recorded(Harness):
    """A harness that records its calls; its start fails at `fail_at` when given."""

    def __init__(self, fail_at: str | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def start(self) -> "Recorded":
        self.calls.append("start")
        with self.stopped_on_failure():
            for step in ("bind", "launch"):
                if step == self.fail_at:
                    raise RuntimeError(step)
                self.calls.append(step)
        return self

    def stop(self) -> None:
        self.calls.append("stop")


def test_with_starts_and_stops_even_when_the_block_raises():
    with pytest.raises(KeyError):
        with Recorded() as running:
            assert running.calls == ["start", "bind", "launch"]
            raise KeyError("in the block")
    assert running.calls == ["start", "bind", "launch", "stop"]


def test_a_failed_start_stops_what_it_began_and_raises():
    harness = Recorded(fail_at="launch")
    with pytest.raises(RuntimeError, match="launch"):
        with harness:
            pytest.fail("the block must not run")
    assert harness.calls == ["start", "bind", "stop"]


def test_the_base_has_no_start_or_stop_of_its_own():
    with pytest.raises(NotImplementedError):
        Harness().start()
    with pytest.raises(NotImplementedError):
        Harness().stop()
