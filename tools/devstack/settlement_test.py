"""The ChangeNOW stand-in's settlement: the index of exchanges waiting for a deposit (no chain, no stack)."""
from __future__ import annotations

import threading

from tools.devstack.persist import TrackedDict
from tools.devstack.settlement import WaitingExchanges


class Record(dict):
    """An exchange record that counts its reads."""

    reads = 0

    def __getitem__(self, key):
        Record.reads += 1
        return super().__getitem__(key)


class StandIn:
    def __init__(self):
        self._lock = threading.Lock()
        self.exchanges = TrackedDict()

    def create(self, exchange_id: str, status: str = "waiting", currency: str = "eth") -> None:
        self.exchanges[exchange_id] = Record(status=status, payinAddress=f"0xAbC{exchange_id}",
                                             fromCurrency=currency)

    def set_status(self, exchange_id: str, status: str) -> None:
        dict.__getitem__(self.exchanges, exchange_id)["status"] = status


def test_it_answers_what_a_scan_of_every_exchange_answers_as_exchanges_come_and_go():
    standin = StandIn()
    waiting = WaitingExchanges(standin)
    standin.create("a")
    standin.create("b", currency="usdt")
    standin.create("done", status="finished")
    assert waiting.current() == {("0xabca", "eth"): "a", ("0xabcb", "usdt"): "b"}
    standin.set_status("a", "finished")
    standin.create("c")
    assert waiting.current() == {("0xabcb", "usdt"): "b", ("0xabcc", "eth"): "c"}
    standin.set_status("b", "confirming")  # a settlement that failed puts it back before the next look
    standin.set_status("b", "waiting")
    assert waiting.current() == {("0xabcb", "usdt"): "b", ("0xabcc", "eth"): "c"}
    scan = {(r["payinAddress"].lower(), r["fromCurrency"]): i for i, r in standin.exchanges.items()
            if r["status"] == "waiting"}
    assert waiting.current() == scan


def test_a_look_reads_only_the_new_exchanges_and_the_waiting_ones_not_every_exchange():
    standin = StandIn()
    waiting = WaitingExchanges(standin)
    for number in range(5000):
        standin.create(f"old{number}", status="finished")
    standin.create("w1")
    waiting.current()
    Record.reads = 0
    standin.create("w2")
    assert waiting.current() == {("0xabcw1", "eth"): "w1", ("0xabcw2", "eth"): "w2"}
    assert Record.reads < 20  # the new one, and the status of the two waiting; not 5,000 records


def test_it_marks_no_record_changed_for_the_stand_ins_journal():
    standin = StandIn()
    standin.create("a")
    standin.exchanges.take_changes()
    WaitingExchanges(standin).current()
    assert standin.exchanges.touched == set()
