"""End to end: the twelve services under gunicorn, wired through the Cloud Tasks emulator, on a real
PostgreSQL and a real EVM, with stand-ins only for NowPayments, ChangeNOW and Telegram.

One stack (tools.devstack.stack, in a temporary folder on free ports) serves every test in order;
each test pays through its own payments and asserts the rows those payments wrote and the balances
they moved on the chain.
"""
from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from web3 import Web3

from telepay_shared import hops, tokens
from telepay_shared.db import Database
from telepay_shared.testing.evm import token_artefact
from telepay_shared.testing.oidc import OidcIssuer
from tools.devstack import cli, pipeline, wiring
from tools.devstack.logscan import find_secrets, stack_secrets
from tools.devstack.stack import PORT_OFFSETS, Settings, Stack

RUNFILES_MAIN = Path(__file__).parent.parent.parent  # <runfiles>/_main: the services, built and declared
FLOW_TIMEOUT_S = 60.0
WEI, USDT_UNITS = Decimal(10**18), Decimal(10**6)


def units(amount, scale: Decimal) -> int:
    """Base units of an amount (a Decimal, or a JSON number), truncated as token transfers truncate."""
    return int(Decimal(str(amount)) * scale)


def _free_port_base() -> int:
    """A port base whose every stack port is free on 127.0.0.1 right now."""
    for candidate in range(21000, 60000, 97):
        ports = [candidate + offset for offset in PORT_OFFSETS.values()]
        try:
            sockets = [socket.create_server(("127.0.0.1", port)) for port in ports]
        except OSError:
            continue
        for probe in sockets:
            probe.close()
        return candidate
    raise RuntimeError("no free range of ports")


@pytest.fixture(scope="module")
def stack():
    """The whole pipeline, up for the module; a short folder path keeps PostgreSQL's socket path legal."""
    folder = Path(tempfile.mkdtemp(prefix="tp-e2e-", dir="/tmp"))
    settings = Settings(port_base=_free_port_base(), durable=False, drain_s=5.0)
    local = Stack(folder, source_root=RUNFILES_MAIN, bin_root=RUNFILES_MAIN, settings=settings)
    try:
        local.up()
        yield local
        local.down()
        # Every line every part wrote, shutdown included: no secret the stack gave out is in any of them.
        assert find_secrets(local.path("logs"), stack_secrets(local)) == []
    finally:
        local.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def database(stack):
    """A pool on the stack's database, for assertions."""
    with Database.from_dsn(stack.dsn, max_size=2) as pool:
        yield pool


class Chain:
    """Reads balances and receipts on the stack's chain."""

    def __init__(self, info: dict):
        self.info = info
        self.w3 = Web3(Web3.HTTPProvider(info["rpc_url"]))
        self.usdt = self.w3.eth.contract(address=info["tokens"]["usdt"]["address"], abi=token_artefact()["abi"])
        self.host = info["host_address"]

    def eth(self, address: str) -> int:
        """Wei held by an address."""
        return self.w3.eth.get_balance(Web3.to_checksum_address(address))

    def usdt_units(self, address: str) -> int:
        """Test-USDT base units held by an address."""
        return self.usdt.functions.balanceOf(Web3.to_checksum_address(address)).call()

    def receipt(self, tx_hash: str):
        """The mined transaction's receipt."""
        return self.w3.eth.get_transaction_receipt(tx_hash)

    def nonce(self) -> int:
        """Transactions the host wallet has mined."""
        return self.w3.eth.get_transaction_count(self.host)


@pytest.fixture(scope="module")
def chain(stack):
    """The stack's chain."""
    return Chain(stack.chain_info())


def follow(stack, database, mode: str, amount_usd: str, count: int = 1, run_jobs: bool = True,
           on_hop=lambda *a: None) -> list[pipeline.Payment]:
    """Pay and follow to the end state; fail with where each payment stopped."""
    tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack), on_hop=on_hop, run_jobs=run_jobs)
    payments = pipeline.pay(tracker, mode, Decimal(amount_usd), count, timeout_s=FLOW_TIMEOUT_S)
    stuck = {p.payment_id: (p.next_hop().name, p.answer) for p in payments if not p.done}
    assert not stuck, f"payments not at their end state (waiting for, IPN answer): {stuck}"
    return payments


def select(database, sql: str, params: tuple) -> list[dict]:
    """The rows a query returns, read in a transaction of its own."""
    with database.transaction() as tx:
        return tx.fetchall(sql, params)


def payout_chain(database, payout_key: str) -> dict:
    """The one payout (request, exchange, transfer) GCSplit1 keyed payout_key: np:<payment> or batch:<batch>."""
    rows = select(
        database,
        "SELECT r.unique_id, r.from_currency, r.to_currency, r.to_amount, q.cn_api_id, q.payin_address,"
        " q.from_amount AS exchange_from_amount, h.tx_hash, h.tx_status, h.is_complete, h.from_amount AS sent,"
        " h.from_currency AS sent_currency"
        " FROM split_payout_request r JOIN split_payout_que q USING (unique_id)"
        " JOIN split_payout_hostpay h USING (unique_id) WHERE r.idempotency_key = %s", (payout_key,))
    assert len(rows) == 1, rows
    return rows[0]


def processed(database, payment_id: int) -> dict:
    """The payment's processed_payments row."""
    return next(iter(select(database, "SELECT * FROM processed_payments WHERE payment_id = %s", (payment_id,))), None)


def exchange(stack, exchange_id: str) -> dict:
    """The ChangeNOW stand-in's record of an exchange."""
    return requests.get(stack.url("changenow") + "/v2/exchange/by-id", params={"id": exchange_id}, timeout=10,
                        headers={"x-changenow-api-key": stack.secrets["CHANGENOW_API_KEY"]}).json()


def invites_to(stack, user_id: int) -> list[dict]:
    """The messages the Telegram stand-in delivered to a user."""
    answer = requests.get(stack.url("telegram") + "/_standin/messages", params={"chat_id": user_id}, timeout=10)
    return answer.json()["result"]


def assert_funded(stack, exchange_id: str, deposit_units: int, recorded: Decimal, scale: Decimal) -> dict:
    """The exchange got exactly the deposit it expects, and the tables recorded it (to their 8 decimals);
    the exchange finished. Its by-id record."""
    record = exchange(stack, exchange_id)
    assert record["status"] == "finished"
    assert deposit_units == units(record["expectedAmountFrom"], scale) == units(record["amountFrom"], scale) > 0
    assert recorded == (Decimal(deposit_units) / scale).quantize(Decimal("1E-8"))
    return record


def assert_instant_paid(stack, database, chain, payment: pipeline.Payment, host_eth_before: int, client_before: int):
    """One payout, one mined transfer of exactly the exchange's deposit, the client paid, one invite."""
    payout = payout_chain(database, f"np:{payment.payment_id}")
    receipt = chain.receipt(payout["tx_hash"])
    assert receipt["status"] == 1 and payout["is_complete"] and payout["tx_status"] == "success"
    assert (payout["from_currency"], payout["to_currency"], payout["sent_currency"]) == ("ETH", "USDT", "ETH")
    deposit_wei = chain.eth(payout["payin_address"])
    record = assert_funded(stack, payout["cn_api_id"], deposit_wei, payout["sent"], WEI)
    assert payout["exchange_from_amount"] == payout["sent"]
    gas_wei = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert host_eth_before - chain.eth(chain.host) == deposit_wei + gas_wei
    client_received = chain.usdt_units(pipeline.CHANNELS["instant"].wallet) - client_before
    assert client_received == units(record["amountTo"], USDT_UNITS)
    row = processed(database, payment.payment_id)
    assert row["gcwebhook1_processed"] and row["telegram_invite_sent"]
    messages = invites_to(stack, payment.user_id)
    assert len(messages) == 1 and row["telegram_invite_link"] in messages[0]["text"]


def test_instant_payout(stack, database, chain):
    """A paid subscription pays the channel owner in USDT through ChangeNOW, from the host wallet."""
    host_before, client_before = chain.eth(chain.host), chain.usdt_units(pipeline.CHANNELS["instant"].wallet)
    payment = follow(stack, database, "instant", "25")[0]
    assert_instant_paid(stack, database, chain, payment, host_before, client_before)


def test_duplicate_notification_pays_once(stack, database, chain):
    """NowPayments delivering one IPN three times (twice at once) makes one payout, one transfer, one invite."""
    host_before, client_before = chain.eth(chain.host), chain.usdt_units(pipeline.CHANNELS["instant"].wallet)
    nonce_before = chain.nonce()
    endpoints = pipeline.Endpoints.of(stack)
    payment = pipeline.Payment(pipeline.new_payment_id(), "instant", Decimal("20"), 777000001)
    concurrent = [threading.Thread(target=pipeline.notify, args=(endpoints, payment)) for _ in range(2)]
    for thread in concurrent:
        thread.start()
    for thread in concurrent:
        thread.join()
    tracker = pipeline.Tracker(database, endpoints)
    tracker.payments[payment.payment_id] = payment
    assert tracker.follow(lambda: payment.done, FLOW_TIMEOUT_S), payment.next_hop()
    pipeline.notify(endpoints, payment)  # a late repeat, after the payout went out
    assert payment.answer.startswith("200"), payment.answer
    tracker.follow(lambda: False, 1.0)  # give a wrongly accepted repeat time to move money
    assert chain.nonce() == nonce_before + 1
    assert_instant_paid(stack, database, chain, payment, host_before, client_before)


def inject_changenow_faults(stack, *faults: tuple[str, str, int]) -> None:
    """Make the stand-in's next calls of a route fail (route, kind, count)."""
    for route, kind, count in faults:
        answer = requests.post(stack.url("changenow") + "/_standin/faults", timeout=10,
                               json={"route": route, "kind": kind, "count": count, "retry_after": "0"})
        assert answer.status_code == 200, answer.text


def test_changenow_failures_are_retried_until_the_payout_completes(stack, database, chain):
    """ChangeNOW answering 502 and 429 (estimate, create, status) delays the payout; it completes once."""
    host_before, client_before = chain.eth(chain.host), chain.usdt_units(pipeline.CHANNELS["instant"].wallet)
    inject_changenow_faults(stack, ("estimate", "server_error", 2), ("create", "server_error", 3),
                            ("by_id", "rate_limit", 2))
    payment = follow(stack, database, "instant", "30")[0]
    assert_instant_paid(stack, database, chain, payment, host_before, client_before)
    # Every injected fault was consumed by the pipeline's calls: a fresh create now succeeds at once.
    fresh = requests.post(stack.url("changenow") + "/v2/exchange", timeout=10,
                          headers={"x-changenow-api-key": stack.secrets["CHANGENOW_API_KEY"]},
                          json={"fromCurrency": "eth", "toCurrency": "usdt", "fromNetwork": "eth", "toNetwork": "eth",
                                "fromAmount": "0.01", "address": pipeline.CHANNELS["instant"].wallet})
    assert fresh.status_code == 200, fresh.text


def test_service_killed_mid_flow_recovers_on_redelivery(stack, database, chain):
    """GCHostPay3 killed while a payment is under way: the transfer waits in its queue, then happens once.

    It is killed as the payment is notified: the whole flow now takes ~60 ms, less than one of the
    tracker's polls, so a kill on the first hop the tracker saw could land after the transfer.
    """
    host_before, client_before = chain.eth(chain.host), chain.usdt_units(pipeline.CHANNELS["instant"].wallet)
    nonce_before = chain.nonce()
    killed = [stack.stop_part("gchostpay3", signal.SIGKILL, timeout_s=5)]
    tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack))
    payment = pipeline.pay(tracker, "instant", Decimal("25"), until=lambda p: "exchange" in p.reached,
                           timeout_s=FLOW_TIMEOUT_S)[0]
    tracker.follow(lambda: False, 1.0)  # the transfer order (T12) is meanwhile redelivered to a dead port
    assert killed == [True] and "exchange" in payment.reached and "signed" not in payment.reached, payment.reached
    assert chain.nonce() == nonce_before
    stack.start_service("gchostpay3")
    assert tracker.follow(lambda: payment.done, FLOW_TIMEOUT_S), payment.next_hop()
    assert chain.nonce() == nonce_before + 1
    assert_instant_paid(stack, database, chain, payment, host_before, client_before)


def credits(database, payment_ids: list[int]) -> list[dict]:
    """The payout_accumulation rows of the payments."""
    return select(database, "SELECT * FROM payout_accumulation WHERE nowpayments_payment_id = ANY(%s) ORDER BY id",
                  ([str(p) for p in payment_ids],))


def test_threshold_credits_convert_in_a_micro_batch_then_pay_out_in_one_batch(stack, database, chain):
    """Credits below MICRO_BATCH_THRESHOLD_USD wait; at the threshold one ETH->USDT swap converts them;
    the client's converted balance, once over its own threshold, is paid out in one USDT->ETH payout."""
    channel = pipeline.CHANNELS["threshold"]
    endpoints = pipeline.Endpoints.of(stack)
    client_before, host_usdt_before = chain.eth(channel.wallet), chain.usdt_units(chain.host)
    first = follow_until(stack, database, "credited", "15")
    answer = pipeline.run_scheduler_job(pipeline.SCHEDULER_JOBS["microbatch"](endpoints), endpoints.keys)
    assert answer["http_status"] == 200 and answer["batch_created"] is False, answer
    assert [(c["conversion_status"], c["accumulated_amount_usdt"]) for c in credits(database, [first.payment_id])] == [
        ("pending", Decimal("14.55"))]  # $15 less the 3 % platform fee

    second = follow(stack, database, "threshold", "15")[0]
    tracker = pipeline.Tracker(database, endpoints)
    tracker.payments[first.payment_id] = first
    assert tracker.follow(lambda: first.done, FLOW_TIMEOUT_S), first.next_hop()

    rows = credits(database, [first.payment_id, second.payment_id])
    assert {r["conversion_status"] for r in rows} == {"completed"}
    assert len({r["batch_conversion_id"] for r in rows}) == 1
    assert {r["is_paid_out"] for r in rows} == {True} and len({r["payout_batch_id"] for r in rows}) == 1
    [conversion] = select(database, "SELECT * FROM batch_conversions WHERE batch_conversion_id = %s",
                          (rows[0]["batch_conversion_id"],))
    [converted] = select(database, "SELECT * FROM split_payout_hostpay WHERE unique_id = %s",
                         (f"batch_{rows[0]['batch_conversion_id']}",))
    payout = payout_chain(database, f"batch:{rows[0]['payout_batch_id']}")
    # The conversion: one ETH deposit, the USDT received split over the credits to the cent.
    assert conversion["conversion_status"] == "completed" and converted["is_complete"]
    assert chain.receipt(converted["tx_hash"])["status"] == 1
    received = assert_funded(stack, conversion["cn_api_id"], chain.eth(conversion["payin_address"]),
                             converted["from_amount"], WEI)["amountTo"]
    assert sum(r["accumulated_amount_usdt"] for r in rows) == conversion["actual_usdt_received"]
    # The payout: the whole converted balance sent as USDT (ERC-20) and swapped to ETH for the client.
    assert (payout["from_currency"], payout["to_currency"], payout["sent_currency"]) == ("USDT", "ETH", "USDT")
    assert payout["is_complete"] and payout["sent"] == conversion["actual_usdt_received"]
    assert chain.receipt(payout["tx_hash"])["status"] == 1
    deposit_units = chain.usdt_units(payout["payin_address"])
    paid = assert_funded(stack, payout["cn_api_id"], deposit_units, payout["sent"], USDT_UNITS)
    assert chain.usdt_units(chain.host) - host_usdt_before == units(received, USDT_UNITS) - deposit_units
    assert chain.eth(channel.wallet) - client_before == units(paid["amountTo"], WEI)
    for payment in (first, second):
        assert processed(database, payment.payment_id)["telegram_invite_sent"]
        assert len(invites_to(stack, payment.user_id)) == 1


def follow_until(stack, database, hop_name: str, amount_usd: str) -> pipeline.Payment:
    """Notify one threshold payment and follow it (no scheduler runs) until it reaches hop_name."""
    tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack), run_jobs=False)
    payment = pipeline.pay(tracker, "threshold", Decimal(amount_usd), until=lambda p: hop_name in p.reached,
                           timeout_s=FLOW_TIMEOUT_S)[0]
    assert hop_name in payment.reached, payment.next_hop()
    return payment


def execute_payment_token(stack, unique_id: str) -> str:
    """A fresh, correctly signed T12 (GCHostPay1 -> GCHostPay3): the order to send ETH from the host wallet."""
    fields = {"unique_id": unique_id, "cn_api_id": "e2e" + unique_id.lower(), "from_currency": "eth",
              "from_network": "eth", "from_amount": 0.001, "context": "instant",
              "payin_address": "0x" + secrets.token_hex(20)}
    return tokens.encode(hops.EXECUTE_PAYMENT, fields, {hops.SUCCESS_KEY: stack.secrets[hops.SUCCESS_KEY]})


def deliver_as_cloud_tasks(url: str, body: dict, authorization: str | None) -> requests.Response:
    """POST a task body with Cloud Tasks' headers, and its Authorization header only when given."""
    headers = {"Content-Type": "application/json", "X-CloudTasks-QueueName": "gchostpay3-payment-exec-queue",
               "X-CloudTasks-TaskName": secrets.token_hex(32), "X-CloudTasks-TaskRetryCount": "0"}
    if authorization:
        headers["Authorization"] = authorization
    return requests.post(url, json=body, headers=headers, timeout=30)


def test_a_task_without_a_valid_oidc_token_is_refused_and_moves_nothing(stack, database, chain):
    """GCHostPay3 runs TP_AUTH_MODE=oidc as deployed: a validly signed T12 without the Cloud Tasks identity
    token, or with one for another audience, another caller, or from another key, is refused 401; no transfer."""
    assert stack.service_environment("gchostpay3")["TP_AUTH_MODE"] == "oidc"
    issuer = OidcIssuer.from_pem(stack.secrets[wiring.OIDC_KEY_NAME])
    origin, email = stack.url("gchostpay3"), wiring.TASKS_SERVICE_ACCOUNT
    nonce_before, host_before = chain.nonce(), chain.eth(chain.host)
    unique_id = "E2E" + secrets.token_hex(7).upper()[:13]
    body = {"token": execute_payment_token(stack, unique_id)}
    refused = {
        "no token": None,
        "wrong audience": "Bearer " + issuer.mint(stack.url("gchostpay1"), email),
        "wrong caller": "Bearer " + issuer.mint(origin, "intruder@elsewhere.iam.gserviceaccount.com"),
        "another key": "Bearer " + OidcIssuer().mint(origin, email),
        "expired": "Bearer " + issuer.mint(origin, email, now=time.time() - 7200),
    }
    answers = {case: deliver_as_cloud_tasks(origin + "/", body, authorization) for case, authorization in refused.items()}
    assert {case: (a.status_code, a.json()["error"]) for case, a in answers.items()} == {
        case: (401, "unauthorized") for case in refused}
    time.sleep(1.0)  # a wrongly accepted order would be signed and broadcast by now
    assert select(database, "SELECT unique_id FROM split_payout_hostpay WHERE unique_id = %s", (unique_id,)) == []
    assert (chain.nonce(), chain.eth(chain.host)) == (nonce_before, host_before)


def test_scheduler_jobs_authenticate_by_oidc_token_alone(stack):
    """GCBatchProcessor's /process (oidc_or_hmac): Cloud Scheduler's ID token suffices; a token for another
    audience, without the body's HMAC, is refused."""
    url = pipeline.SCHEDULER_JOBS["batch"](pipeline.Endpoints.of(stack))
    token_only = {k: v for k, v in pipeline.scheduler_headers(url, stack.secrets).items() if k == "Authorization"}
    assert requests.post(url, data=b"", headers=token_only, timeout=60).status_code == 200
    issuer = OidcIssuer.from_pem(stack.secrets[wiring.OIDC_KEY_NAME])
    elsewhere = {"Authorization": "Bearer " + issuer.mint(stack.url("gcsplit1"), wiring.TASKS_SERVICE_ACCOUNT)}
    answer = requests.post(url, data=b"", headers=elsewhere, timeout=60)
    assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized")


def test_fund_tops_the_host_wallet_up_by_exactly_the_amount(stack, chain):
    """tools/dev fund: a long-lived stack's payouts spend the host wallet's ETH; the funder refills it."""
    before, after = stack.fund_host_wallet(Decimal("2.5"))
    assert after - before == 2_500_000_000_000_000_000
    assert chain.eth(chain.host) == after


@pytest.mark.parametrize("eth, reason", [(Decimal("0"), "positive"), (Decimal("-1"), "positive"),
                                         (Decimal("NaN"), "positive"), (Decimal("1E-19"), "18 decimals")])
def test_fund_refuses_an_amount_that_is_not_a_whole_number_of_wei(stack, chain, eth, reason):
    before = chain.eth(chain.host)
    with pytest.raises(ValueError, match=reason):
        stack.fund_host_wallet(eth)
    assert chain.eth(chain.host) == before
    with pytest.raises(argparse.ArgumentTypeError, match="not a decimal number"):
        cli.decimal_argument("1,5")


def test_no_secret_in_any_log_so_far(stack):
    """The parts' logs after every flow above (the stack fixture scans them again once it is down)."""
    assert find_secrets(stack.path("logs"), stack_secrets(stack)) == []


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
