"""The soak's invariant checker on synthetic observations (it must catch a double payment, an unbalanced
ledger and a stuck payment), and the fault machinery on local sockets."""
from __future__ import annotations

import json
import random
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tools.devstack import faults
from tools.devstack.soak import ChainTransfer, Observation, SentPayment, check

D = Decimal
GAS_WEI = 21_000 * 10**9
HOST = "0x" + "ab" * 20


def instant_world(**changes) -> Observation:
    """One instant payment of 0.01 ETH paid correctly: 0.0097 ETH (3 % fee kept) mined once to its exchange."""
    payment = SentPayment(1001, "instant", D("30.00"), D("0.01"), 777)
    tables = {
        "processed_payments": [{"payment_id": 1001, "gcwebhook1_processed": True, "telegram_invite_sent": True}],
        "split_payout_request": [{"idempotency_key": "np:1001", "unique_id": "UID1"}],
        "split_payout_que": [{"unique_id": "UID1", "cn_api_id": "ex1", "payin_address": "0xaaa"}],
        "split_payout_hostpay": [{"unique_id": "UID1", "cn_api_id": "ex1", "payin_address": "0xaaa", "is_complete": True,
                                  "tx_status": "success", "tx_hash": "0xt1", "from_amount": D("0.0097")}],
        "failed_transactions": [], "payout_accumulation": [], "batch_conversions": [], "payout_batches": [],
        "main_clients_database": [],
    }
    observation = Observation(
        payments=[payment], tables=tables, transfers_out=[ChainTransfer("0xt1", "eth", "0xaaa", D("0.0097"), 1, GAS_WEI)],
        transfers_in=[], exchanges={"ex1": {"status": "finished", "amountFrom": 0.0097}}, alerts=[],
        fee_percent=D(3), micro_threshold=D(20), eth_usd=D(3000),
        balance_change={"eth": -(D("0.0097") + D(GAS_WEI).scaleb(-18))})
    for name, value in changes.items():
        setattr(observation, name, value)
    return observation


def violations(observation: Observation, invariant: str | None = None) -> list[dict]:
    """The checker's violations (of one invariant)."""
    return [v for v in check(observation)["violations"] if invariant in (None, v["invariant"])]


def test_a_correct_instant_payment_passes():
    """Paid once, exactly the net amount, rows written: no violation, and the total ledger balances to zero."""
    result = check(instant_world())
    assert result["violations"] == []
    assert result["states"] == {"instant_paid": 1}
    assert D(result["imbalance_usd"]) == 0
    assert D(result["ledger_usd"]["fees"]) == D("0.9")  # 3 % of 0.01 ETH at 3000 USD


def test_a_double_payment_is_caught():
    """A second transfer to the same exchange (the lost-answer case) breaks 'paid once' and the ledger."""
    world = instant_world()
    world.transfers_out.append(ChainTransfer("0xt2", "eth", "0xaaa", D("0.0097"), 1, GAS_WEI))
    world.balance_change["eth"] -= D("0.0097") + D(GAS_WEI).scaleb(-18)
    found = violations(world)
    assert [v["subject"] for v in found if v["invariant"] == "paid_once"] == ["UID1"]
    assert any(v["invariant"] == "ledger" and v["subject"] == "payment 1001" for v in found)


def test_a_transfer_no_payout_recorded_is_caught():
    """Money leaving the host wallet for an address no payout recorded is a violation."""
    world = instant_world()
    world.transfers_out.append(ChainTransfer("0xt9", "usdt", "0xfff", D("5"), 1, GAS_WEI))
    world.balance_change.update(eth=world.balance_change["eth"] - D(GAS_WEI).scaleb(-18), usdt=D("-5"))
    assert [v["subject"] for v in violations(world, "paid_once")] == ["0xt9"]


def test_an_unbalanced_ledger_is_caught():
    """Paying 0.0098 ETH for a payment whose net is 0.0097 ETH breaks received = paid out + fee."""
    world = instant_world(transfers_out=[ChainTransfer("0xt1", "eth", "0xaaa", D("0.0098"), 1, GAS_WEI)])
    world.balance_change["eth"] = -(D("0.0098") + D(GAS_WEI).scaleb(-18))
    found = violations(world, "ledger")
    assert found and found[0]["subject"] == "payment 1001" and "0.0098" in found[0]["message"]


def test_an_unexplained_host_balance_change_is_caught():
    """ETH gone from the host wallet that no scanned transfer explains."""
    world = instant_world()
    world.balance_change["eth"] -= D("0.5")
    assert [v["subject"] for v in violations(world, "ledger")] == ["host wallet eth"]


def test_a_stuck_payment_is_caught():
    """A transfer signed but never mined leaves the payment not terminal."""
    world = instant_world(transfers_out=[], balance_change={"eth": D(0)})
    world.tables["split_payout_hostpay"][0].update(is_complete=False, tx_status="pending")
    found = violations(world, "terminal")
    assert [v["subject"] for v in found] == ["payment 1001"] and "not complete" in found[0]["message"]
    assert check(world)["states"] == {"instant_stuck": 1}


def test_a_payment_never_recorded_is_stuck():
    """An IPN np-webhook never took: no rows at all."""
    world = instant_world(transfers_out=[], balance_change={"eth": D(0)})
    for table in ("processed_payments", "split_payout_request", "split_payout_que", "split_payout_hostpay"):
        world.tables[table] = []
    assert [v["subject"] for v in violations(world, "terminal")] == ["payment 1001"]


def failed_world(alerts: list[str]) -> Observation:
    """The instant payment recorded for review before anything was sent."""
    world = instant_world(transfers_out=[], balance_change={"eth": D(0)}, alerts=alerts)
    world.tables["split_payout_hostpay"] = []
    world.tables["failed_transactions"] = [{"unique_id": "UID1", "status": "failed_pending_review"}]
    return world


def test_a_failure_recorded_and_alerted_is_terminal():
    """Failed = recorded for review AND alerted; its net amount is held, the ledger balances."""
    result = check(failed_world(["*ERROR* `gchostpay3` eth_payment_failed_permanently ... unique_id: `UID1`"]))
    assert result["violations"] == [] and result["states"] == {"instant_failed": 1}
    assert D(result["ledger_usd"]["held"]) == D("29.1")


def test_a_failure_without_an_alert_is_caught():
    """Recorded for review but nobody told: a violation."""
    found = violations(failed_world(["an alert about another payout UID2"]), "terminal")
    assert len(found) == 1 and "no alert" in found[0]["message"]


def threshold_world() -> Observation:
    """Two threshold payments ($15, $18) pooled in one conversion and paid in one USDT batch."""
    shares = [D("14.47727272"), D("17.37272728")]  # 31.85 USDT split by 14.55 : 17.46
    credits = [{"nowpayments_payment_id": str(pid), "client_id": "-100", "conversion_status": "completed",
                "batch_conversion_id": "c1", "is_paid_out": True, "payout_batch_id": "b1",
                "accumulated_amount_usdt": share, "payment_fee_usd": fee, "payment_amount_usd": usd,
                "nowpayments_outcome_amount": eth}
               for pid, share, fee, usd, eth in ((2001, shares[0], D("0.45"), D("15.00"), D("0.005")),
                                                 (2002, shares[1], D("0.54"), D("18.00"), D("0.006")))]
    hostpay = [{"unique_id": "UIDB", "cn_api_id": "exb", "payin_address": "0xbbb", "is_complete": True,
                "tx_status": "success", "tx_hash": "0xtb", "from_amount": D("31.85")},
               {"unique_id": "batch_c1", "cn_api_id": "exc", "payin_address": "0xccc", "is_complete": True,
                "tx_status": "success", "tx_hash": "0xtc", "from_amount": D("0.01067")}]
    tables = {
        "processed_payments": [{"payment_id": pid, "gcwebhook1_processed": True, "telegram_invite_sent": True}
                               for pid in (2001, 2002)],
        "payout_accumulation": credits, "split_payout_hostpay": hostpay, "failed_transactions": [],
        "batch_conversions": [{"batch_conversion_id": "c1", "conversion_status": "completed", "cn_api_id": "exc",
                               "payin_address": "0xccc", "actual_usdt_received": D("31.85")}],
        "payout_batches": [{"batch_id": "b1", "total_amount_usdt": D("31.85"), "status": "completed"}],
        "split_payout_request": [{"idempotency_key": "batch:b1", "unique_id": "UIDB"}],
        "split_payout_que": [{"unique_id": "UIDB", "cn_api_id": "exb", "payin_address": "0xbbb"}],
        "main_clients_database": [{"closed_channel_id": "-100", "payout_threshold_usd": D("25")}],
    }
    return Observation(
        payments=[SentPayment(2001, "threshold", D("15"), D("0.005"), 1), SentPayment(2002, "threshold", D("18"),
                                                                                    D("0.006"), 2)],
        tables=tables,
        transfers_out=[ChainTransfer("0xtc", "eth", "0xccc", D("0.01067"), 1, GAS_WEI),
                       ChainTransfer("0xtb", "usdt", "0xbbb", D("31.85"), 1, GAS_WEI)],
        transfers_in=[ChainTransfer("0xmint", "usdt", HOST, D("31.85"))],
        exchanges={"exc": {"status": "finished", "amountFrom": 0.01067, "amountTo": 31.85, "payoutHash": "0xmint"},
                   "exb": {"status": "finished", "amountFrom": 31.85}},
        alerts=[], fee_percent=D(3), micro_threshold=D(20), eth_usd=D(3000),
        balance_change={"eth": -(D("0.01067") + 2 * D(GAS_WEI).scaleb(-18)), "usdt": D(0)})


def test_pooled_threshold_payments_balance_per_batch_and_in_total():
    """ETH in = swapped + fees; USDT out of the swap = shares = batch = sent; the swap's cost closes the total."""
    result = check(threshold_world())
    assert result["violations"] == []
    assert result["states"] == {"threshold_paid": 2}
    assert D(result["ledger_usd"]["swap_costs"]) == D("0.16")  # 0.01067 ETH = 32.01 USD swapped for 31.85 USDT
    assert D(result["imbalance_usd"]) == 0


def test_a_conversion_that_swapped_the_fee_too_is_caught():
    """Swapping the platform's fee share along with the clients' ETH (defect 14) unbalances the conversion."""
    world = threshold_world()
    world.transfers_out[0] = ChainTransfer("0xtc", "eth", "0xccc", D("0.011"), 1, GAS_WEI)
    world.balance_change["eth"] = -(D("0.011") + 2 * D(GAS_WEI).scaleb(-18))
    assert [v["subject"] for v in violations(world, "ledger")] == ["conversion c1"]


def test_a_batch_paying_more_than_its_credits_is_caught():
    """A payout batch whose on-chain USDT differs from its credits' shares."""
    world = threshold_world()
    world.transfers_out[1] = ChainTransfer("0xtb", "usdt", "0xbbb", D("32"), 1, GAS_WEI)
    world.balance_change["usdt"] = D("-0.15")
    assert "payout batch b1" in {v["subject"] for v in violations(world, "ledger")}


def test_a_credit_left_past_the_threshold_is_stuck():
    """Pending credits summing past the micro-batch threshold that no run converted are not terminal."""
    world = threshold_world()
    for credit in world.tables["payout_accumulation"]:
        credit.update(conversion_status="pending", batch_conversion_id=None, is_paid_out=False, payout_batch_id=None,
                      accumulated_amount_usdt=D("14.55"))
    world.tables["batch_conversions"], world.transfers_out, world.transfers_in = [], [], []
    world.balance_change = {"eth": D(0), "usdt": D(0)}
    assert [v["subject"] for v in violations(world, "terminal")] == ["payment 2001", "payment 2002"]
    world.micro_threshold = D(50)  # below this threshold they are legitimately held
    result = check(world)
    assert result["violations"] == [] and result["states"] == {"threshold_held": 2}


# ---------------------------------------------------------------------------- the fault machinery

class _Upstream:
    """A JSON-RPC 'chain' that counts the calls that reached it."""

    def __init__(self):
        self.seen: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.seen.append(body["method"])
                answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": "0x1"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def proxied():
    """An RPC fault proxy in front of a counting upstream."""
    upstream = _Upstream()
    proxy = faults.RpcFaultProxy(upstream.url, hang_s=1.0).start()
    yield proxy, upstream
    proxy.stop()
    upstream.server.shutdown()


def rpc(url: str, method: str, timeout: float = 0.5):
    """One JSON-RPC call."""
    return requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": []}, timeout=timeout)


def test_a_lost_answer_reaches_the_chain_but_not_the_caller(proxied):
    """lost_answer: the transaction is accepted upstream, the caller times out; the next call goes through."""
    proxy, upstream = proxied
    proxy.arm("lost_answer", "eth_sendRawTransaction")
    assert rpc(proxy.url, "eth_chainId").json()["result"] == "0x1"  # another method is not taken
    with pytest.raises(requests.Timeout):
        rpc(proxy.url, "eth_sendRawTransaction")
    assert upstream.seen == ["eth_chainId", "eth_sendRawTransaction"]
    assert rpc(proxy.url, "eth_sendRawTransaction").status_code == 200
    assert proxy.fired == {("lost_answer", "eth_sendRawTransaction"): 1}


def test_a_hang_never_reaches_the_chain_and_a_reset_drops_the_answer(proxied):
    """hang: nothing forwarded; reset: forwarded, the connection closed without an answer."""
    proxy, upstream = proxied
    proxy.arm("hang")
    with pytest.raises(requests.Timeout):
        rpc(proxy.url, "eth_getTransactionReceipt")
    assert upstream.seen == []
    proxy.arm("reset", "eth_getTransactionCount")
    with pytest.raises(requests.ConnectionError):
        rpc(proxy.url, "eth_getTransactionCount", timeout=5)
    assert upstream.seen == ["eth_getTransactionCount"]
    proxy.arm("hang", count=3)
    assert proxy.disarm() == 3


def test_the_alert_sink_keeps_slack_messages():
    """What an Alerter posts to SLACK_ALERT_WEBHOOK is kept."""
    sink = faults.AlertSink().start()
    try:
        assert requests.post(sink.url, json={"text": "*ERROR* payout UID1"}, timeout=5).status_code == 200
        assert sink.texts() == ["*ERROR* payout UID1"]
    finally:
        sink.stop()


def test_a_fault_plan_has_every_kind_and_is_reproducible():
    """Each kind at least the minimum, the database restart as asked, the same plan for the same seed."""
    plan = faults.FaultPlan(random.Random(7), 60.0, faults.FAULT_KINDS, minimum=2, per_minute=10, db_restarts=1)
    counts = plan.counts()
    scheduled = set(faults.FAULT_KINDS) - {"duplicate_delivery"}
    assert set(counts) == scheduled and counts["db_restart"] == 1
    assert all(counts[kind] >= 2 for kind in scheduled - {"db_restart"})
    assert all(0 <= fault.at_s <= 60 for fault in plan.faults)
    again = faults.FaultPlan(random.Random(7), 60.0, faults.FAULT_KINDS, minimum=2, per_minute=10, db_restarts=1)
    assert again.faults == plan.faults


def test_duplicates_are_switched_through_the_stack_folder(tmp_path):
    """The control file the emulator reads, and the counts it writes back."""
    from tools.devstack import emulator

    (tmp_path / "run").mkdir()
    faults.set_duplicates(tmp_path, 0.5, seed=3)
    duplicator = emulator.Duplicator(tmp_path / emulator.FAULTS_FILE, tmp_path / emulator.FAULT_STATS_FILE)
    modes = [duplicator.choose(f"task-{n}") for n in range(400)]
    assert 120 < sum(mode is not None for mode in modes) < 280
    late = next(n for n, mode in enumerate(modes) if mode == "after_success")
    assert duplicator.take_late(f"task-{late}") is not None and duplicator.take_late(f"task-{late}") is None
    duplicator.count("concurrent", 200)
    assert faults.duplicate_counts(tmp_path) == {"concurrent": 1, "answer_200": 1}



def test_a_restarted_emulator_counts_on_from_the_stats_file(tmp_path):
    """The soak reports the counts' growth: a new emulator process must not start them again at zero."""
    from tools.devstack import emulator

    (tmp_path / "run").mkdir()
    paths = (tmp_path / emulator.FAULTS_FILE, tmp_path / emulator.FAULT_STATS_FILE)
    first = emulator.Duplicator(*paths)
    for _ in range(3):
        first.count("after_success", 200)
    before = faults.duplicate_counts(tmp_path)
    restarted = emulator.Duplicator(*paths)
    restarted.count("concurrent", 503)
    assert faults.duplicate_counts(tmp_path) - before == {"concurrent": 1, "answer_503": 1}
    assert faults.duplicate_counts(tmp_path)["after_success"] == 3
    paths[1].write_text("not json")
    assert emulator.Duplicator(*paths).counts == {}


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
