"""GCHostPay3 end to end: a real EVM (eth-tester), real PostgreSQL, the Cloud Tasks emulator, legacy vectors.

Every transfer is really signed, broadcast and mined; balances and the wallet's nonce on the chain
are the evidence that a payout was made exactly once.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from decimal import Decimal

import pytest
from eth_account import Account
from eth_keys import backends as ecc_backends
from web3 import Web3

from telepay_shared import errors, hops, tokens
from telepay_shared.testing.evm import LocalChain
from telepay_shared.testing.pytest_plugin import KEYS, VECTORS

from services.gchostpay3 import ledger
from services.gchostpay3.app import CONFIG_PATH, create_app
from services.gchostpay3.wallet import FEES_REUSED_S, Wallet

pytest_plugins = ["telepay_shared.testing.pytest_plugin"]
T12 = VECTORS["hops"]["gchostpay1->gchostpay3"]
UNREACHABLE_NODE = "http://127.0.0.1:9/v3/provider-project-key"  # the path is the provider's API key
OLD = 6700  # seconds: a token this old is past HOSTPAY3_REVIEW_AFTER_S (6600) but not expired (7200)


@pytest.fixture
def chain():
    return LocalChain()


@pytest.fixture
def usdc(chain):
    return chain.deploy_token("USDC", 6)


@pytest.fixture
def env(service_env, deliveries, slack, database_url, chain, usdc):
    return service_env(
        CONFIG_PATH, DATABASE_URL=database_url, ETHEREUM_RPC_URL=UNREACHABLE_NODE,
        HOST_WALLET_PRIVATE_KEY=chain.host_private_key, HOST_WALLET_ETH_ADDRESS=chain.host_address,
        GCHOSTPAY1_URL=deliveries.url(""), GCHOSTPAY3_URL=deliveries.url("/"), SLACK_ALERT_WEBHOOK=slack.url("/hook"),
        ERC20_USDT_CONTRACT=chain.usdt.address, ERC20_USDC_CONTRACT=usdc.address, ERC20_DAI_CONTRACT=chain.dai.address,
        HOSTPAY3_CONFIRMATION_WAIT_S="0.3", HOSTPAY3_RETRY_DELAY_S="0",
    )


@pytest.fixture
def build(env, load_service_config, database, chain):
    """A test client of the service; by default on the in-process chain, else as configured."""

    def make(*, wallet=None, tasks=None, **env_changes):
        config = load_service_config(CONFIG_PATH, {**env, **env_changes})
        if wallet is None and "ETHEREUM_RPC_URL" not in env_changes:
            wallet = Wallet(chain.w3, chain.host_private_key, chain.host_address)
        return create_app(config, database=database, wallet=wallet, tasks=tasks).test_client()

    return make


@pytest.fixture
def service(build):
    return build()


def new_payin() -> str:
    return Account.create().address


def uid(payin: str) -> str:
    """The payout's unique_id in these tests: one per deposit address (the emulator never forgets a task name)."""
    return payin[2:18].upper()


def t12(payin: str, *, age_s: float = 0, **changes) -> str:
    """A T12 as GCHostPay1 sends it: the legacy vector's fields, signed now (minus age_s)."""
    fields = {**T12["fields"], "payin_address": payin, "unique_id": uid(payin), **changes}
    return tokens.encode(hops.EXECUTE_PAYMENT, fields, KEYS, now=time.time() - age_s)


def t13(payin: str, previous_attempt: int, error_code: str = "RPC_CONNECTION_FAILED", **changes) -> str:
    """A T13 self-retry: the encoder sends previous_attempt + 1."""
    fields = {**T12["fields"], "payin_address": payin, "unique_id": uid(payin), "attempt_count": previous_attempt,
              "first_attempt_at": int(time.time()) - 120, "error_code": error_code, **changes}
    return tokens.encode(hops.EXECUTE_RETRY, fields, KEYS)


def post(client, token: str, retry_count: int = 0):
    return client.post("/", json={"token": token}, headers={"X-CloudTasks-TaskRetryCount": str(retry_count)})


def transfers(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT unique_id, cn_api_id, from_currency::text AS currency, from_network::text AS network, "
                           "from_amount, payin_address, is_complete, tx_hash, tx_status, gas_used, block_number, "
                           "nonce, signed_tx, sender_address, actual_eth_amount FROM split_payout_hostpay")


def failures(database) -> list[dict]:
    with database.transaction() as tx:
        return tx.fetchall("SELECT unique_id, cn_api_id, from_currency, from_amount, error_code, error_message, "
                           "last_error_details, attempt_count, status, recovery_tx_hash FROM failed_transactions "
                           "ORDER BY id")


def completions(deliveries, count: int = 1) -> list[dict]:
    """The T14 tokens GCHostPay1 received, decoded."""
    got = deliveries.expect_exactly(count, quiet_s=0.5)
    assert {d.path for d in got} <= {"/payment-completed"}
    return [tokens.decode(hops.PAYMENT_COMPLETED, json.loads(d.body)["token"], KEYS) for d in got]


def alerts(slack, count: int) -> list[str]:
    return [json.loads(d.body)["text"] for d in slack.expect_exactly(count, quiet_s=0.3)]


# --------------------------------------------------------------------------- transfers on the chain


def test_eth_transfer_is_mined_recorded_and_reported_to_gchostpay1(service, chain, database, deliveries, slack):
    payin = new_payin()
    host_before = chain.eth_balance(chain.host_address)
    answer = post(service, t12(payin))
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "success" and answer.json["attempt"] == 1
    assert chain.eth_balance(payin) == 4_462_000_000_000_000  # 0.004462 ETH, to the wei
    assert chain.nonce(chain.host_address) == 1
    receipt = chain.w3.eth.get_transaction_receipt(answer.json["tx_hash"])
    spent = host_before - chain.eth_balance(chain.host_address)
    assert spent == 4_462_000_000_000_000 + receipt["gasUsed"] * receipt["effectiveGasPrice"]
    [row] = transfers(database)
    assert row | {"signed_tx": None} == {
        "unique_id": uid(payin), "cn_api_id": "e6c5b2a1d4f3a9", "currency": "ETH", "network": "ETH",
        "from_amount": Decimal("0.00446200"), "payin_address": payin, "is_complete": True,
        "tx_hash": receipt["transactionHash"].to_0x_hex(), "tx_status": "success", "gas_used": 21000,
        "block_number": receipt["blockNumber"], "nonce": 0, "signed_tx": None,
        "sender_address": chain.host_address, "actual_eth_amount": Decimal("0.004462000000000000")}
    assert Web3.keccak(hexstr=row["signed_tx"]).to_0x_hex() == row["tx_hash"]  # the stored bytes are the sent tx
    [t14] = completions(deliveries)
    assert {k: t14[k] for k in ("unique_id", "cn_api_id", "tx_hash", "tx_status", "gas_used", "block_number")} == {
        "unique_id": uid(payin), "cn_api_id": "e6c5b2a1d4f3a9", "tx_hash": row["tx_hash"],
        "tx_status": "success", "gas_used": 21000, "block_number": receipt["blockNumber"]}
    assert failures(database) == [] and slack.expect_exactly(0, quiet_s=0.1) == []


@pytest.mark.parametrize("symbol, amount, units", [
    ("usdt", 12.345678, 12_345_678),
    ("usdc", 250.5, 250_500_000),
    ("dai", 0.123456789012345678, 123_456_789_012_345_680),
])
def test_erc20_transfer_moves_exact_token_units(build, chain, usdc, database, deliveries, symbol, amount, units):
    token = {"usdt": chain.usdt, "usdc": usdc, "dai": chain.dai}[symbol]
    payin, service = new_payin(), build()
    host_tokens, host_eth = chain.token_balance(token, chain.host_address), chain.eth_balance(chain.host_address)
    answer = post(service, t12(payin, from_currency=symbol, from_amount=amount, context="threshold"))
    assert answer.status_code == 200, answer.json
    assert chain.token_balance(token, payin) == units
    assert chain.token_balance(token, chain.host_address) == host_tokens - units
    assert chain.eth_balance(payin) == 0
    receipt = chain.w3.eth.get_transaction_receipt(answer.json["tx_hash"])
    assert receipt["to"] == token.address and 21000 < receipt["gasUsed"] < 100_000
    assert chain.eth_balance(chain.host_address) == host_eth - receipt["gasUsed"] * receipt["effectiveGasPrice"]
    [row] = transfers(database)
    assert (row["currency"], row["is_complete"], row["actual_eth_amount"]) == (symbol.upper(), True, 0)
    # Threshold payouts report to GCHostPay1 too: GCAccumulator's /swap-executed never existed (defect 28).
    [t14] = completions(deliveries)
    assert t14["tx_hash"] == row["tx_hash"]


def test_node_reached_over_json_rpc_http(build, chain, deliveries):
    payin = new_payin()
    with chain.serve_json_rpc() as node:
        answer = post(build(ETHEREUM_RPC_URL=node.url), t12(payin, from_currency="usdt", from_amount=3.5))
    assert answer.status_code == 200, answer.json
    assert chain.token_balance(chain.usdt, payin) == 3_500_000
    completions(deliveries)


def test_the_node_is_asked_once_what_cannot_change_and_no_more_than_each_payout_needs(build, chain, deliveries,
                                                                                      monkeypatch):
    """Chain id and decimals are asked by the first payout only; each payout asks balance and nonce in
    one batch, and broadcasts its fresh transfer without asking first whether the node has it."""
    requests_seen: list[list[str]] = []
    with chain.serve_json_rpc() as node:
        answer_body = node.answer_body

        def recording(body: bytes):
            calls = json.loads(body)
            requests_seen.append([call["method"] for call in (calls if isinstance(calls, list) else [calls])])
            return answer_body(body)

        monkeypatch.setattr(node, "answer_body", recording)
        service = build(ETHEREUM_RPC_URL=node.url)
        payins, per_payout = [new_payin() for _ in range(2)], []
        for payin in payins:
            before = len(requests_seen)
            assert post(service, t12(payin, from_currency="usdt", from_amount=1.25)).status_code == 200
            per_payout.append(requests_seen[before:])
    assert [chain.token_balance(chain.usdt, payin) for payin in payins] == [1_250_000] * 2
    first, second = ([method for request in requests for method in request] for requests in per_payout)
    assert "eth_chainId" in first and "eth_chainId" not in second
    assert (first.count("eth_call"), second.count("eth_call")) == (2, 1)  # decimals, then balanceOf only
    for requests, methods in zip(per_payout, (first, second)):
        assert requests.count(["eth_getBalance", "eth_getTransactionCount"]) == 1
        assert "eth_getTransactionByHash" not in methods and methods.count("eth_sendRawTransaction") == 1
    completions(deliveries, 2)


def test_a_fee_quote_serves_the_payouts_of_the_next_two_seconds(build, chain, deliveries):
    """A burst of payouts asks the node for fees once; a quote older than FEES_REUSED_S is asked again."""
    asked: list[str] = []
    wallet = Wallet(chain.w3, chain.host_private_key, chain.host_address)
    now = [1000.0]
    wallet.clock = lambda: now[0]
    quote = wallet._fees_now
    wallet._fees_now = lambda: (asked.append("eth_feeHistory"), quote())[1]
    service = build(wallet=wallet)
    for step_s in (0.0, FEES_REUSED_S - 0.01, 0.01):
        now[0] += step_s
        assert post(service, t12(new_payin())).status_code == 200
    assert asked == ["eth_feeHistory", "eth_feeHistory"]  # the first and the third payout
    completions(deliveries, 3)


def test_signing_looks_for_the_signing_backend_once_not_per_payout(build, chain, deliveries, monkeypatch):
    """eth_keys' default is to look for coincurve (an import that fails here) at every signature."""
    wallet = Wallet(chain.w3, chain.host_private_key, chain.host_address)
    looked_up = []
    real_get_backend = ecc_backends.get_backend

    def get_backend(*args, **kwargs):
        # Only signing's lookups: the in-process test chain recovers senders with its own.
        if any(frame.filename.endswith("gchostpay3/wallet.py") and frame.name == "sign"
               for frame in traceback.extract_stack()):
            looked_up.append(args)
        return real_get_backend(*args, **kwargs)

    monkeypatch.setattr(ecc_backends, "get_backend", get_backend)
    service = build(wallet=wallet)
    for _ in range(3):
        assert post(service, t12(new_payin())).status_code == 200
    assert looked_up == []
    completions(deliveries, 3)


# --------------------------------------------------------------------------- never twice (defects 11-13)


def test_redelivered_order_and_a_stray_retry_pay_once(service, chain, database, deliveries):
    payin = new_payin()
    token = t12(payin)
    first = post(service, token)
    again = post(service, token, retry_count=1)
    retry = post(service, t13(payin, 1))
    assert [a.status_code for a in (first, again, retry)] == [200, 200, 200]
    assert again.json["message"] == "Payment already executed" and again.json["tx_hash"] == first.json["tx_hash"]
    assert retry.json["tx_hash"] == first.json["tx_hash"]
    assert chain.nonce(chain.host_address) == 1  # one transaction on chain
    assert chain.eth_balance(payin) == 4_462_000_000_000_000
    assert len(transfers(database)) == 1
    completions(deliveries, 1)  # every re-send of T14 had the same task name


def deliver_concurrently(build, chain, tokens_to_send: list[str]) -> list:
    """Each token POSTed from its own thread (its own app instance), all against the chain over HTTP."""
    answers = []
    with chain.serve_json_rpc() as node:
        clients = [build(ETHEREUM_RPC_URL=node.url) for _ in tokens_to_send]
        threads = [threading.Thread(target=lambda c=c, t=t: answers.append(post(c, t)))
                   for c, t in zip(clients, tokens_to_send)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(a.status_code for a in answers) == [200] * len(tokens_to_send), [a.json for a in answers]
    return answers


def test_concurrent_deliveries_pay_once(build, chain, deliveries):
    payin = new_payin()
    answers = deliver_concurrently(build, chain, [t12(payin)] * 3)
    assert len({a.json["tx_hash"] for a in answers}) == 1
    assert chain.nonce(chain.host_address) == 1 and chain.eth_balance(payin) == 4_462_000_000_000_000
    completions(deliveries, 1)


def test_concurrent_payouts_get_distinct_nonces(build, chain, database, deliveries):
    # Defect 13: legacy's concurrent executions read the same 'latest' nonce and collided.
    payins = [new_payin() for _ in range(3)]
    deliver_concurrently(build, chain, [t12(payin) for payin in payins])
    assert sorted(r["nonce"] for r in transfers(database)) == [0, 1, 2]
    assert chain.nonce(chain.host_address) == 3
    assert [chain.eth_balance(payin) for payin in payins] == [4_462_000_000_000_000] * 3
    completions(deliveries, 3)


def test_crash_after_commit_the_redelivery_broadcasts_the_stored_transaction(service, build, chain, database,
                                                                               deliveries, monkeypatch):
    payin = new_payin()
    token = t12(payin)
    monkeypatch.setattr(Wallet, "broadcast", lambda self, raw: (_ for _ in ()).throw(RuntimeError("instance killed")))
    crashed = post(service, token)
    assert (crashed.status_code, crashed.json["error"]) == (503, "broadcast_failed")
    [row] = transfers(database)
    assert (row["tx_status"], row["nonce"], row["is_complete"]) == ("pending", 0, False) and row["signed_tx"]
    assert chain.nonce(chain.host_address) == 0 and chain.eth_balance(payin) == 0  # nothing reached the node
    deliveries.expect_exactly(0, quiet_s=0.2)
    monkeypatch.undo()
    redelivered = post(build(), token, retry_count=1)
    assert redelivered.status_code == 200, redelivered.json
    assert redelivered.json["tx_hash"] == row["tx_hash"]  # the stored transaction, not a new one
    assert chain.w3.eth.get_transaction(row["tx_hash"])["nonce"] == 0
    assert chain.nonce(chain.host_address) == 1 and chain.eth_balance(payin) == 4_462_000_000_000_000
    assert [r["tx_hash"] for r in transfers(database)] == [row["tx_hash"]]
    completions(deliveries, 1)


def strand_a_transfer(service, monkeypatch) -> str:
    """A payout whose transfer is recorded but never reached the node (its instance died before broadcasting)."""
    stranded = new_payin()
    real_broadcast = Wallet.broadcast
    monkeypatch.setattr(Wallet, "broadcast", lambda self, raw: (_ for _ in ()).throw(OSError("instance killed")))
    assert post(service, t12(stranded)).status_code == 503
    monkeypatch.setattr(Wallet, "broadcast", real_broadcast)
    return stranded


def test_a_new_payout_does_not_wait_behind_a_transfer_that_never_reached_the_node(build, chain, database,
                                                                                   deliveries, monkeypatch):
    service = build(HOSTPAY3_UNSENT_AFTER_S="0")  # the stranded transfer counts as stranded at once
    stranded, other = strand_a_transfer(service, monkeypatch), new_payin()
    # Another payout: its nonce follows the recorded one, and the stranded transfer is resent first.
    answer = post(service, t12(other))
    assert answer.status_code == 200, answer.json
    assert {r["unique_id"]: r["nonce"] for r in transfers(database)} == {uid(stranded): 0, uid(other): 1}
    assert chain.eth_balance(stranded) == chain.eth_balance(other) == 4_462_000_000_000_000
    # The stranded payout's own redelivery finds it mined and reports it; nothing is sent again.
    assert post(service, t12(stranded), retry_count=3).json["status"] == "success"
    assert chain.nonce(chain.host_address) == 2
    assert sorted(t["unique_id"] for t in completions(deliveries, 2)) == sorted([uid(stranded), uid(other)])


def test_a_transfer_recorded_moments_ago_is_left_to_its_own_delivery(service, chain, database, deliveries,
                                                                     monkeypatch):
    """Within HOSTPAY3_UNSENT_AFTER_S a recorded transfer is being broadcast by its own delivery: the next payout
    neither asks the node about it nor resends it under the wallet lock. It waits behind the gap instead (503:
    the in-process eth-tester refuses a nonce ahead, where a node would queue it), and both are paid once the
    first delivery comes back."""
    stranded, other = strand_a_transfer(service, monkeypatch), new_payin()
    sent: list[str] = []
    real_broadcast = Wallet.broadcast
    monkeypatch.setattr(Wallet, "broadcast", lambda self, raw: (sent.append(raw), real_broadcast(self, raw))[1])
    waiting = post(service, t12(other))
    [stranded_row] = [r for r in transfers(database) if r["unique_id"] == uid(stranded)]
    assert stranded_row["signed_tx"] not in sent  # not resent by the other payout
    assert (waiting.status_code, waiting.json["error"]) == (503, "broadcast_failed")  # nonce 1 waits behind 0
    assert {r["unique_id"]: r["nonce"] for r in transfers(database)} == {uid(stranded): 0, uid(other): 1}
    assert chain.nonce(chain.host_address) == 0
    assert post(service, t12(stranded), retry_count=1).status_code == 200
    assert post(service, t12(other), retry_count=1).status_code == 200
    assert chain.nonce(chain.host_address) == 2
    assert chain.eth_balance(stranded) == chain.eth_balance(other) == 4_462_000_000_000_000
    assert sorted(t["unique_id"] for t in completions(deliveries, 2)) == sorted([uid(stranded), uid(other)])


def test_confirmation_timeout_answers_503_and_the_next_delivery_finds_the_receipt(service, chain, database,
                                                                                   deliveries):
    payin = new_payin()
    token = t12(payin)
    with chain.mining_paused():
        for retry_count in (0, 1):  # Cloud Tasks comes back while the block is still not mined
            waiting = post(service, token, retry_count)
            assert (waiting.status_code, waiting.json["error"]) == (503, "awaiting_confirmation")
        [row] = transfers(database)
        assert (row["tx_status"], row["nonce"]) == ("pending", 0)
        assert waiting.json["tx_hash"] == row["tx_hash"]
        deliveries.expect_exactly(0, quiet_s=0.2)
        chain.mine()
        mined = post(service, token, retry_count=2)
    assert mined.status_code == 200 and mined.json["tx_hash"] == row["tx_hash"]
    assert chain.nonce(chain.host_address) == 1 and chain.eth_balance(payin) == 4_462_000_000_000_000
    [t14] = completions(deliveries)
    assert t14["tx_hash"] == row["tx_hash"]


def test_settling_a_recorded_transfer_does_not_wait_for_the_wallet_lock(service, chain, database, deliveries):
    """While another payout holds the wallet's lock (signing), a mined transfer is still recorded and reported."""
    payin = new_payin()
    token = t12(payin)
    with chain.mining_paused():
        assert post(service, token).status_code == 503  # broadcast, not mined yet
        chain.mine()
    answers = []
    with database.transaction() as signing_elsewhere:
        ledger.lock_wallet(signing_elsewhere, chain.host_address)
        settling = threading.Thread(target=lambda: answers.append(post(service, token, retry_count=1)))
        settling.start()
        settling.join(15)
        assert not settling.is_alive() and answers[0].status_code == 200, answers
    [row] = transfers(database)
    assert (row["tx_status"], row["is_complete"]) == ("success", True)
    assert completions(deliveries)[0]["tx_hash"] == row["tx_hash"]


def test_failed_report_after_the_transfer_is_retried_without_paying_again(build, chain, database, deliveries, tasks):
    # Defect 12: legacy treated a failed T14 enqueue as a payment failure and sent the funds again.
    class FirstEnqueueFails:
        calls = 0

        def enqueue(self, *args, **kwargs):
            FirstEnqueueFails.calls += 1
            if FirstEnqueueFails.calls == 1:
                raise errors.TaskEnqueueFailed("Cloud Tasks unavailable")
            return tasks.enqueue(*args, **kwargs)

    service, payin = build(tasks=FirstEnqueueFails()), new_payin()
    token = t12(payin)
    failed = post(service, token)
    assert (failed.status_code, failed.json["error"]) == (503, "task_enqueue_failed")
    assert chain.nonce(chain.host_address) == 1 and transfers(database)[0]["is_complete"] is True
    assert post(service, token, retry_count=1).status_code == 200
    assert chain.nonce(chain.host_address) == 1 and chain.eth_balance(payin) == 4_462_000_000_000_000
    completions(deliveries, 1)


def test_nonce_taken_by_another_transaction_is_recorded_not_resent(service, chain, database, deliveries, slack,
                                                                    monkeypatch):
    payin = new_payin()
    monkeypatch.setattr(Wallet, "broadcast", lambda self, raw: (_ for _ in ()).throw(OSError("instance killed")))
    assert post(service, t12(payin)).status_code == 503
    monkeypatch.undo()
    chain.drain_host_eth(keep_wei=10**18)  # someone else spends nonce 0 with the same key
    answer = post(service, t12(payin), retry_count=1)
    assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
        200, "failed_permanently", "NONCE_CONFLICT")
    assert transfers(database)[0]["tx_status"] == "failed" and chain.eth_balance(payin) == 0
    [failure] = failures(database)
    assert (failure["error_code"], failure["status"]) == ("NONCE_CONFLICT", "failed_pending_review")
    assert "NONCE_CONFLICT" in alerts(slack, 1)[0]
    assert post(service, t12(payin), retry_count=2).json["status"] == "failed_permanently"
    assert chain.nonce(chain.host_address) == 1 and len(failures(database)) == 1
    slack.expect_exactly(1, quiet_s=0.2)
    deliveries.expect_exactly(0, quiet_s=0.2)


# --------------------------------------------------------------------------- failures


def test_reverted_transfer_is_recorded_and_alerted_once(service, chain, database, deliveries, slack):
    payin = new_payin()
    chain.set_blocked(chain.usdt, payin)  # USDT-style blacklist: the transfer is mined and reverts
    token = t12(payin, from_currency="usdt", from_amount=10.0, unique_id="batch_" + "7" * 36)
    answer = post(service, token)
    assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
        200, "failed_permanently", "TRANSACTION_REVERTED_PERMANENT")
    [row] = transfers(database)
    receipt = chain.w3.eth.get_transaction_receipt(row["tx_hash"])
    assert receipt["status"] == 0 and (row["tx_status"], row["is_complete"]) == ("reverted", False)
    assert row["block_number"] == receipt["blockNumber"] and chain.token_balance(chain.usdt, payin) == 0
    [failure] = failures(database)
    assert failure["unique_id"] == "batch_" + "7" * 36  # 42 characters: legacy's VARCHAR(16) refused it (defect 26)
    assert (failure["error_code"], failure["status"], failure["from_currency"]) == (
        "TRANSACTION_REVERTED_PERMANENT", "failed_pending_review", "usdt")
    assert failure["last_error_details"]["tx_hash"] == row["tx_hash"]
    [text] = alerts(slack, 1)
    assert "eth_payment_failed_permanently" in text and "batch_" + "7" * 36 in text
    assert chain.host_private_key[2:] not in text
    again = post(service, token, retry_count=1)
    assert (again.status_code, again.json["status"]) == (200, "failed_permanently")
    assert chain.nonce(chain.host_address) == 1 and len(failures(database)) == 1  # no new transfer, no new row
    slack.expect_exactly(1, quiet_s=0.2)
    deliveries.expect_exactly(0, quiet_s=0.2)


def test_insufficient_balance_waits_for_a_top_up(service, chain, database, deliveries, slack):
    payin = new_payin()
    chain.drain_host_eth(keep_wei=10**15)  # 0.001 ETH: less than the 0.004462 ordered
    token = t12(payin)
    for retry_count in (0, 1):
        blocked = post(service, token, retry_count)
        assert (blocked.status_code, blocked.json["error"], blocked.json["error_code"]) == (
            503, "payout_blocked", "INSUFFICIENT_FUNDS")
    assert transfers(database) == [] and failures(database) == [] and chain.nonce(chain.host_address) == 1
    [text] = alerts(slack, 1)  # the first delivery notifies; the redelivery only logs
    assert "eth_payment_blocked" in text and "INSUFFICIENT_FUNDS" in text
    chain.send_eth(chain.host_address, 10**18)  # the operator tops the wallet up
    paid = post(service, token, retry_count=2)
    assert paid.status_code == 200, paid.json
    assert chain.eth_balance(payin) == 4_462_000_000_000_000
    completions(deliveries, 1)


def test_insufficient_token_balance_waits_too(service, chain, database):
    answer = post(service, t12(new_payin(), from_currency="dai", from_amount=2_000_000.0))
    assert (answer.status_code, answer.json["error_code"]) == (503, "INSUFFICIENT_FUNDS")
    assert transfers(database) == [] and chain.nonce(chain.host_address) == 0


def test_underfunded_payout_is_recorded_for_review_before_its_token_expires(service, chain, database, deliveries,
                                                                            slack):
    payin = new_payin()
    chain.drain_host_eth(keep_wei=10**15)
    answer = post(service, t12(payin, age_s=OLD), retry_count=100)
    assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
        200, "pending_review", "INSUFFICIENT_FUNDS")
    [failure] = failures(database)
    assert (failure["error_code"], failure["status"], failure["from_amount"]) == (
        "INSUFFICIENT_FUNDS", "failed_pending_review", Decimal("0.00446200"))
    assert "eth_payment_failed_permanently" in alerts(slack, 1)[0]
    # A payout awaiting review is not attempted again behind the reviewer's back.
    chain.send_eth(chain.host_address, 10**18)
    assert post(service, t12(payin)).json["status"] == "failed_permanently"
    assert chain.eth_balance(payin) == 0 and transfers(database) == []
    deliveries.expect_exactly(0, quiet_s=0.2)


def test_unconfirmed_transfer_is_recorded_for_review_and_recovered_when_mined(service, chain, database,
                                                                              deliveries, slack):
    payin = new_payin()
    with chain.mining_paused():
        answer = post(service, t12(payin, age_s=OLD))
        assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
            200, "pending_review", "CONFIRMATION_TIMEOUT")
        [failure] = failures(database)
        assert failure["status"] == "failed_pending_review"
        alerts(slack, 1)
    # The transaction was mined in the end; a later delivery reports it and closes the review.
    paid = post(service, t12(payin))
    assert paid.status_code == 200 and chain.eth_balance(payin) == 4_462_000_000_000_000
    [failure] = failures(database)
    assert (failure["status"], failure["recovery_tx_hash"]) == ("recovered", paid.json["tx_hash"])
    assert chain.nonce(chain.host_address) == 1
    completions(deliveries, 1)


def test_unreachable_node_is_retried_with_t13_then_recorded(build, chain, database, deliveries, slack):
    payin = new_payin()
    down = build(ETHEREUM_RPC_URL=UNREACHABLE_NODE)
    answer = post(down, t12(payin))
    assert (answer.status_code, answer.json["status"], answer.json["error_code"], answer.json["attempt"]) == (
        200, "retry_scheduled", "RPC_CONNECTION_FAILED", 2)
    [delivery] = deliveries.expect_exactly(1, quiet_s=0.3)
    assert delivery.path == "/"
    retry_token = json.loads(delivery.body)["token"]
    retry = tokens.decode(hops.EXECUTE_PAYMENT, retry_token, KEYS)
    assert (retry["attempt_count"], retry["error_code"], retry["from_amount"], retry["payin_address"]) == (
        2, "RPC_CONNECTION_FAILED", 0.004462, payin)
    assert transfers(database) == [] and failures(database) == []
    # The last attempt fails too: recorded for review and alerted, 200 so the retries stop.
    last = post(down, t13(payin, 2))
    assert (last.status_code, last.json["status"], last.json["error_code"]) == (
        200, "failed_permanently", "RPC_CONNECTION_FAILED")
    [failure] = failures(database)
    assert (failure["attempt_count"], failure["status"]) == (3, "failed_pending_review")
    assert "provider-project-key" in UNREACHABLE_NODE and "url: ***" in failure["error_message"]
    assert "provider-project-key" not in alerts(slack, 1)[0] + failure["error_message"]  # the node URL is a secret
    assert chain.nonce(chain.host_address) == 0
    deliveries.expect_exactly(1, quiet_s=0.2)


def test_node_back_before_the_last_attempt_pays_the_retry(build, chain, deliveries):
    payin = new_payin()
    assert post(build(ETHEREUM_RPC_URL=UNREACHABLE_NODE), t12(payin)).json["status"] == "retry_scheduled"
    retry_token = json.loads(deliveries.wait_for(1)[0].body)["token"]
    answer = post(build(), retry_token)
    assert (answer.status_code, answer.json["attempt"]) == (200, 2)
    assert chain.eth_balance(payin) == 4_462_000_000_000_000


def test_failure_that_retrying_cannot_fix_is_recorded_at_once(service, chain, database, deliveries, slack,
                                                              monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ValueError("signer refused the private key")

    monkeypatch.setattr(Wallet, "sign", refuse)
    answer = post(service, t12(new_payin()))
    assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
        200, "failed_permanently", "WALLET_UNLOCKED_FAILED")  # not retryable: no T13
    [failure] = failures(database)
    assert (failure["attempt_count"], failure["last_error_details"]["retryable"]) == (1, False)
    assert chain.host_private_key[2:] not in alerts(slack, 1)[0]
    assert chain.nonce(chain.host_address) == 0 and transfers(database) == []
    deliveries.expect_exactly(0, quiet_s=0.3)


def test_token_decimals_that_disagree_with_the_contract_block_the_payout(build, chain, database, slack):
    service = build(ERC20_USDT_DECIMALS="18")  # a 10^12 times larger transfer if it were believed
    answer = post(service, t12(new_payin(), from_currency="usdt", from_amount=1.5))
    assert (answer.status_code, answer.json["error"], answer.json["error_code"]) == (
        503, "payout_blocked", "TOKEN_DECIMALS_MISMATCH")
    assert "TOKEN_DECIMALS_MISMATCH" in alerts(slack, 1)[0]
    assert transfers(database) == [] and chain.nonce(chain.host_address) == 0


def test_legacy_retry_beyond_the_attempt_limit_is_recorded_not_paid(service, chain, database, slack):
    answer = post(service, t13(new_payin(), 3, error_code="CONFIRMATION_TIMEOUT"))
    assert (answer.status_code, answer.json["status"], answer.json["error_code"]) == (
        200, "failed_permanently", "CONFIRMATION_TIMEOUT")
    assert chain.nonce(chain.host_address) == 0 and failures(database)[0]["attempt_count"] == 4
    alerts(slack, 1)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("changes, code", [
    ({"from_currency": "btc"}, "UNSUPPORTED_CURRENCY"),
    ({"from_network": "trx"}, "UNSUPPORTED_NETWORK"),
    ({"from_amount": 0.0}, "INVALID_AMOUNT"),
    ({"from_amount": -0.5}, "INVALID_AMOUNT"),
    ({"from_currency": "usdt", "from_amount": 1.0000001}, "INVALID_AMOUNT"),  # defect 34: not truncated
    ({"payin_address": "0x12345"}, "INVALID_ADDRESS"),
])
def test_orders_that_cannot_be_paid_answer_400_recorded_and_alerted(service, chain, database, deliveries, slack,
                                                                    changes, code):
    answer = post(service, t12(new_payin(), **changes))
    assert (answer.status_code, answer.json["error"], answer.json["error_code"]) == (400, "bad_request", code)
    [failure] = failures(database)
    assert (failure["error_code"], failure["status"]) == (code, "failed_pending_review")
    assert code in alerts(slack, 1)[0]
    assert transfers(database) == [] and chain.nonce(chain.host_address) == 0
    deliveries.expect_exactly(0, quiet_s=0.2)


def test_bad_tokens_are_rejected_without_a_trace(service, chain, database, deliveries, slack):
    payin = new_payin()
    good = t12(payin)
    tampered = good[:40] + ("A" if good[40] != "A" else "B") + good[41:]
    expired = t12(payin, age_s=7200 + 60)
    wrong_key = tokens.encode(hops.EXECUTE_PAYMENT, {**T12["fields"], "payin_address": payin},
                              {hops.SUCCESS_KEY: "not-the-key"})
    for token, reason in ((tampered, "bad_signature"), (expired, "expired"), (wrong_key, "bad_signature"),
                          ("not-a-token", "malformed")):
        answer = post(service, token)
        assert (answer.status_code, answer.json["error"]) == (401, "token_rejected"), reason
    for body in ({}, {"token": ""}, [1]):
        assert service.post("/", json=body).status_code == 400
    assert service.post("/", data="{", content_type="application/json").status_code == 400
    assert transfers(database) == [] and failures(database) == [] and chain.nonce(chain.host_address) == 0
    deliveries.expect_exactly(0, quiet_s=0.3)
    slack.expect_exactly(0, quiet_s=0.1)


def test_legacy_vectors_are_accepted_at_the_endpoint(service, chain, deliveries):
    # The legacy tokens themselves were minted at the vectors' clock; the endpoint gets their fields signed now.
    vector_t13 = tokens.decode(hops.EXECUTE_PAYMENT, VECTORS["hops"]["gchostpay3->gchostpay3"]["token"], KEYS,
                               now=VECTORS["created_at"])
    payin = new_payin()
    answer = post(service, t13(payin, vector_t13["attempt_count"] - 1, vector_t13["error_code"]))
    assert (answer.status_code, answer.json["attempt"]) == (200, 2)
    assert chain.eth_balance(payin) == 4_462_000_000_000_000
    completions(deliveries, 1)


def test_wallet_key_must_match_the_configured_address(env, load_service_config, database, chain):
    config = load_service_config(CONFIG_PATH, {**env, "HOST_WALLET_ETH_ADDRESS": new_payin()})
    with pytest.raises(errors.ConfigError, match="does not belong") as refused:
        create_app(config, database=database)
    assert chain.host_private_key[2:] not in str(refused.value)


def test_health(service):
    assert service.get("/health").status_code == 200
