"""The stand-ins' saved state (persist.SavedState): a snapshot plus a journal of what changed."""
from __future__ import annotations

import io
import pickle
import threading
from decimal import Decimal

from tools.devstack.persist import SavedState, TrackedDefaultDict, TrackedDict


class World:
    """A stand-in's state as the stack's stand-ins hold it: records, a message log, counters, a position."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.records, self.messages, self.counters = TrackedDict(), [], TrackedDefaultDict(int)
        self.position = 0
        self.state = SavedState(path, self.lock, {"records": self.records, "messages": self.messages,
                                                  "counters": self.counters},
                                lambda: {"position": self.position})

    def load(self) -> dict:
        extras = self.state.load()
        self.position = extras.get("position", 0)
        return extras

    def contents(self) -> tuple:
        return dict(self.records), list(self.messages), dict(self.counters), self.position


def _frames(path) -> list[dict]:
    frames, data = [], path.read_bytes()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        frames.append(pickle.load(stream))
    return frames


def test_every_kind_of_change_survives_a_restart_through_the_journal_alone(tmp_path):
    world = World(tmp_path / "state.pickle")
    world.load()
    world.records["a"] = {"status": "waiting", "amount": Decimal("1.50")}
    world.records["b"] = {"status": "waiting", "amount": Decimal("2")}
    world.records["gone"] = {"status": "waiting"}
    world.messages.append({"text": "hello"})
    world.counters[42] += 1
    world.position = 7
    assert world.state.save()
    world.records["a"]["status"] = "finished"  # changed in place, after a lookup by key
    del world.records["gone"]
    world.messages.append({"text": "again"})
    world.counters[42] += 1
    world.position = 9
    assert world.state.save()
    assert not (tmp_path / "state.pickle").exists()  # nothing but the journal so far

    again = World(tmp_path / "state.pickle")
    assert again.load() == {"position": 9}
    assert again.contents() == world.contents()
    assert again.records["a"] == {"status": "finished", "amount": Decimal("1.50")}
    assert "gone" not in again.records
    assert again.counters[42] == 2


def test_a_save_writes_only_what_changed_not_everything_held(tmp_path):
    world = World(tmp_path / "state.pickle")
    world.load()
    for number in range(2000):
        world.records[f"x{number}"] = {"status": "waiting", "payload": "p" * 100}
    world.state.compact()
    assert (tmp_path / "state.pickle.journal").read_bytes() == b""

    world.records["x7"]["status"] = "finished"
    assert world.state.save()
    frames = _frames(tmp_path / "state.pickle.journal")
    assert len(frames) == 1
    assert frames[0]["dicts"] == {"records": ({"x7": {"status": "finished", "payload": "p" * 100}}, [])}
    assert frames[0]["lists"] == {}
    assert len((tmp_path / "state.pickle.journal").read_bytes()) < 1000


def test_iterating_reads_without_marking_anything_changed(tmp_path):
    world = World(tmp_path / "state.pickle")
    world.load()
    world.records["a"] = {"status": "waiting"}
    world.state.save()
    assert [key for key, record in world.records.items() if record["status"] == "waiting"] == ["a"]
    assert list(world.records.values()) == [{"status": "waiting"}]
    assert not world.state.save()  # nothing written: nothing changed
    assert len(_frames(tmp_path / "state.pickle.journal")) == 1


def test_a_clean_stop_folds_the_journal_into_the_snapshot(tmp_path):
    world = World(tmp_path / "state.pickle")
    world.load()
    world.records["a"] = {"status": "waiting"}
    world.messages.append({"text": "m"})
    world.position = 3
    world.state.save()
    world.state.compact()
    assert (tmp_path / "state.pickle.journal").read_bytes() == b""
    # The snapshot is the plain shape the stack saved before there was a journal.
    assert pickle.loads((tmp_path / "state.pickle").read_bytes()) == {
        "records": {"a": {"status": "waiting"}}, "messages": [{"text": "m"}], "counters": {}, "position": 3}
    again = World(tmp_path / "state.pickle")
    again.load()
    assert again.contents() == world.contents()


def test_a_snapshot_written_before_the_journal_existed_still_loads(tmp_path):
    (tmp_path / "state.pickle").write_bytes(pickle.dumps(
        {"records": {"old": {"status": "finished"}}, "messages": [{"text": "old"}], "counters": {5: 3},
         "position": 11}))
    world = World(tmp_path / "state.pickle")
    assert world.load() == {"position": 11}
    assert world.contents() == ({"old": {"status": "finished"}}, [{"text": "old"}], {5: 3}, 11)


def test_a_crash_between_the_snapshot_and_emptying_the_journal_changes_nothing_on_replay(tmp_path, monkeypatch):
    world = World(tmp_path / "state.pickle")
    world.load()
    world.records["a"] = {"status": "waiting"}
    world.messages.append({"text": "first"})
    world.state.save()
    world.records["a"]["status"] = "finished"
    world.records["b"] = {"status": "waiting"}
    world.messages.append({"text": "second"})
    world.state.save()
    world.records["b"]["status"] = "finished"  # after the last frame: only the snapshot has it
    monkeypatch.setattr(world.state, "_empty_journal", lambda: None)  # the crash: the journal stays
    world.state.compact()
    assert len(_frames(tmp_path / "state.pickle.journal")) == 3  # compact's own frame carries b's change

    again = World(tmp_path / "state.pickle")
    again.load()
    assert again.contents() == world.contents()
    assert again.messages == [{"text": "first"}, {"text": "second"}]  # replayed in place, not appended twice
    assert again.records["b"] == {"status": "finished"}


def test_a_frame_torn_by_a_crash_is_dropped_and_the_frames_before_it_kept(tmp_path):
    world = World(tmp_path / "state.pickle")
    world.load()
    world.records["a"] = {"status": "waiting"}
    world.state.save()
    world.records["b"] = {"status": "waiting"}
    world.state.save()
    journal = tmp_path / "state.pickle.journal"
    journal.write_bytes(journal.read_bytes()[:-5])

    again = World(tmp_path / "state.pickle")
    again.load()
    assert again.contents() == ({"a": {"status": "waiting"}}, [], {}, 0)
    # The stand-in goes on: the next save's frame follows a compacted state, not the torn one.
    again.state.compact()
    again.records["c"] = {"status": "waiting"}
    again.state.save()
    third = World(tmp_path / "state.pickle")
    third.load()
    assert set(third.records) == {"a", "c"}


def test_every_way_of_changing_a_dict_is_tracked():
    records = TrackedDict({"kept": 1})
    assert records.take_changes() == ({}, [])
    records["set"] = 1
    records.setdefault("defaulted", 2)
    records.update({"updated": 3})
    records.get("looked-up")
    records["kept"]  # noqa: B018 - a lookup by key may precede a change in place
    records.pop("set")
    changed, removed = records.take_changes()
    assert changed == {"defaulted": 2, "updated": 3, "kept": 1}
    assert sorted(removed) == ["looked-up", "set"]
    records.clear()
    changed, removed = records.take_changes()
    assert changed == {}
    assert sorted(removed) == ["defaulted", "kept", "updated"]


def test_a_counter_incremented_in_a_defaultdict_is_tracked():
    counters = TrackedDefaultDict(int)
    counters[5] += 1
    counters[5] += 1
    assert counters.take_changes() == ({5: 2}, [])
