"""Payments through the local stack: the seeded channels, NowPayments' IPN, Cloud Scheduler's triggers,
and a tracker that follows each payment hop by hop to its end state (tools/dev pay, e2e tests, bench).

The tracker polls the database (and the ChangeNOW stand-in) for every payment at once: each hop is
one query keyed by the NowPayments payment_id, all of a round in one transaction, so following a
thousand payments costs the same dozen queries per round as following one. A hop is asked only
about the payments that reached the step before it (it cannot be reached earlier), so a round's
queries touch the payments moving, not the whole backlog. A hop's time is the database's own
commit time where the row has one (the transfer's updated_at), else the moment a poll first saw it.
The tracker shares the machine with the stack it measures, so it polls every BUSY_POLL_S when
many payments are in flight.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Callable

import requests
import requests.adapters

from telepay_shared import hops, tokens
from telepay_shared.cloudtasks import audience_for
from tools.devstack import wiring

ETH_STEP = Decimal("0.00000001")
SCHEDULER_EVERY_S = 1.0  # how often a waiting payment makes the stack run a scheduler job
POLL_S, BUSY_POLL_S = 0.05, 1.0
SENDERS = 8  # notifications sent at once


@dataclass(frozen=True)
class DevChannel:
    """A channel `up` registers: where and how its owner is paid."""

    mode: str
    open_channel_id: str
    closed_channel_id: str
    client_id: str  # registered_users.user_id
    wallet: str
    currency: str
    network: str
    threshold_usd: Decimal


# Instant pays USDT (ERC-20), threshold pays ETH: both are delivered on the local chain, and the
# threshold payout's USDT -> ETH swap is a real pair (USDT -> USDT would be refused by ChangeNOW).
CHANNELS = {
    "instant": DevChannel("instant", "-1002000000001", "-1002000000101", "00000000-0000-4000-8000-000000000001",
                          "0xC61ddEF65ef2Cc438C4DAf83533F6693Fd6Ae54d", "usdt", "eth", Decimal("0")),
    "threshold": DevChannel("threshold", "-1002000000002", "-1002000000102", "00000000-0000-4000-8000-000000000002",
                            "0xe54a390a210639be55D264Bccf36F6c74F33A802", "eth", "eth", Decimal("25")),
}
TIERS = ((Decimal("5.00"), 7), (Decimal("10.00"), 30), (Decimal("25.00"), 90))


def seed(database) -> None:
    """Register the dev channels (idempotent: an existing registration is left as it is)."""
    with database.transaction() as tx:
        for channel in CHANNELS.values():
            tx.execute("INSERT INTO registered_users (user_id) VALUES (%s) ON CONFLICT DO NOTHING",
                       (channel.client_id,))
            tx.execute(
                "INSERT INTO main_clients_database (open_channel_id, open_channel_title, closed_channel_id,"
                " closed_channel_title, sub_1_price, sub_1_time, sub_2_price, sub_2_time, sub_3_price, sub_3_time,"
                " client_wallet_address, client_payout_currency, client_payout_network, payout_strategy,"
                " payout_threshold_usd, client_id, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'tools/dev')"
                " ON CONFLICT (open_channel_id) DO NOTHING",
                (channel.open_channel_id, f"Dev {channel.mode} channel", channel.closed_channel_id,
                 f"Dev {channel.mode} channel (private)", *[value for tier in TIERS for value in tier], channel.wallet,
                 channel.currency, channel.network, channel.mode, channel.threshold_usd, channel.client_id))


# ---------------------------------------------------------------------------- what the outside sends

@dataclass(frozen=True)
class Endpoints:
    """Where the stack listens and the keys its callers sign with."""

    npwebhook: str
    microbatch: str
    batchprocessor: str
    changenow: str
    keys: dict[str, str]

    @classmethod
    def of(cls, stack) -> Endpoints:
        """The endpoints of a tools.devstack.stack.Stack."""
        return cls(stack.url("npwebhook"), stack.url("gcmicrobatchprocessor"), stack.url("gcbatchprocessor"),
                   stack.url("changenow"), dict(stack.secrets))


def new_payment_id() -> int:
    """A NowPayments-like payment id (ten digits), fresh for every payment."""
    return 10**9 + secrets.randbelow(9 * 10**9)


def ipn_body(channel: DevChannel, payment_id: int, user_id: int, amount_usd: Decimal, eth_usd: Decimal) -> dict:
    """A finished NowPayments notification: the customer paid amount_usd, the platform received ETH."""
    eth = (amount_usd / eth_usd).quantize(ETH_STEP, ROUND_DOWN)
    return {
        "payment_id": payment_id, "invoice_id": payment_id + 7, "payment_status": "finished",
        "pay_address": "0x" + hashlib.sha256(str(payment_id).encode()).hexdigest()[:40],
        "price_amount": float(amount_usd), "price_currency": "usd", "pay_amount": float(eth),
        "actually_paid": float(eth), "pay_currency": "eth", "order_id": f"PGP-{user_id}|{channel.open_channel_id}",
        "order_description": f"dev {channel.mode} subscription", "outcome_amount": float(eth),
        "outcome_currency": "eth",
    }


def send_ipn(endpoints: Endpoints, body: dict, http=requests) -> requests.Response:
    """POST the notification to np-webhook signed as NowPayments signs it (x-nowpayments-sig); http: requests
    or a Session."""
    signed = tokens.encode(hops.NOWPAYMENTS_IPN, body, {hops.IPN_KEY: endpoints.keys[hops.IPN_KEY]})
    return http.post(endpoints.npwebhook + "/", data=signed["body"], timeout=30,
                     headers={"Content-Type": "application/json", "x-nowpayments-sig": signed["signature"]})


@functools.lru_cache(maxsize=4)
def _issuer(private_pem: str):
    """The stack's ID-token issuer for its key (read once: loading an RSA key takes a while)."""
    from telepay_shared.testing.oidc import OidcIssuer

    return OidcIssuer.from_pem(private_pem)


def scheduler_headers(url: str, keys: dict[str, str]) -> dict[str, str]:
    """What the local Cloud Scheduler sends with an empty body: the job's OIDC token for the target's origin
    (the audience the job is configured with), when the stack has its issuer key, and the body's HMAC."""
    headers = {"X-Webhook-Signature": hmac.new(keys[hops.SUCCESS_KEY].encode(), b"", hashlib.sha256).hexdigest()}
    if keys.get(wiring.OIDC_KEY_NAME):
        token = _issuer(keys[wiring.OIDC_KEY_NAME]).mint(audience_for(url), wiring.TASKS_SERVICE_ACCOUNT)
        headers["Authorization"] = f"Bearer {token}"
    return headers


def run_scheduler_job(url: str, keys: dict[str, str]) -> dict:
    """Call a scheduler endpoint as the local stack's Cloud Scheduler: empty body, OIDC token and HMAC."""
    answer = requests.post(url, data=b"", headers=scheduler_headers(url, keys), timeout=60)
    try:
        return {"http_status": answer.status_code, **answer.json()}
    except ValueError:
        return {"http_status": answer.status_code, "message": answer.text[:200]}


SCHEDULER_JOBS = {"microbatch": lambda e: e.microbatch + "/check-threshold",
                  "batch": lambda e: e.batchprocessor + "/process"}


# ---------------------------------------------------------------------------- the hops

@dataclass(frozen=True)
class Hop:
    """One step a payment reaches: a query returning (payment_id, details...) of the payments there.

    `scheduler` names the job (SCHEDULER_JOBS) that has to run for a payment to reach this step;
    `after` the step a payment reaches first (None: the step before this one in its flow).
    """

    name: str
    service: str
    text: str  # str.format()ed with the row
    sql: str
    scheduler: str | None = None
    after: str | None = None

    def reached(self, tx, payments: list[Payment], endpoints: Endpoints, http) -> list[dict]:
        """The rows of the payments that have reached this step."""
        return tx.fetchall(self.sql, ([payment.payment_id for payment in payments],))


@dataclass(frozen=True)
class ExchangeFinished(Hop):
    """ChangeNOW reports the payout's exchange finished (its by-id answer, as GCHostPay asks it)."""

    def reached(self, tx, payments, endpoints, http) -> list[dict]:
        """The payments whose exchange ChangeNOW reports finished (asked once their payout transfer is mined)."""
        rows = []
        for payment in payments:
            record = http.get(endpoints.changenow + "/v2/exchange/by-id", timeout=10,
                              params={"id": payment.details["cn_api_id"]},
                              headers={"x-changenow-api-key": endpoints.keys["CHANGENOW_API_KEY"]}).json()
            if record.get("status") == "finished":
                rows.append({"payment_id": payment.payment_id, "amount_to": record["amountTo"],
                             "to_currency": record["toCurrency"], "payout_hash": record.get("payoutHash")})
        return rows


def _paid(columns: str = "", joins: str = "", where: str = "") -> str:
    """A query over the payments being followed (processed_payments p), with more columns, joins, conditions."""
    return f"SELECT p.payment_id{columns} FROM processed_payments p {joins} WHERE p.payment_id = ANY(%s){where}"


_CREDIT = "JOIN payout_accumulation a ON a.nowpayments_payment_id = p.payment_id::text"


def _payout_hops(payout_key: str, joins: str = "") -> tuple[Hop, ...]:
    """GCSplit1's keyed payout (payout_key: SQL of its idempotency key) from quote to finished exchange."""
    # One index lookup per followed payment: a plain join on the computed key read the whole table (a
    # hash join) every poll, and the table gains a row per payment (OFFSET 0 keeps the planner from
    # flattening the lateral lookup back into that join).
    request = (f"{joins} JOIN LATERAL (SELECT * FROM split_payout_request WHERE idempotency_key = {payout_key}"
               " OFFSET 0) r ON TRUE")
    transfer = f"{request} JOIN split_payout_hostpay h ON h.unique_id = r.unique_id"
    return (
        Hop("quoted", "gcsplit1+2",
            "payout {unique_id} quoted: {from_amount} {from_currency} -> {to_amount} {to_currency}",
            _paid(", r.unique_id, r.from_amount, r.from_currency, r.to_amount, r.to_currency", request)),
        Hop("exchange", "gcsplit3+1", "ChangeNOW exchange {cn_api_id}, deposit to {payin_address}",
            _paid(", q.cn_api_id, q.payin_address", f"{request} JOIN split_payout_que q ON q.unique_id = r.unique_id")),
        Hop("signed", "gchostpay1-3", "transfer {tx_hash} signed, nonce {nonce}",
            _paid(", h.tx_hash, h.nonce", transfer)),
        Hop("mined", "chain", "transfer mined in block {block_number}",
            _paid(", h.block_number, EXTRACT(EPOCH FROM h.updated_at)::float8 AS at", transfer, " AND h.is_complete")),
        ExchangeFinished("finished", "changenow",
                         "exchange finished: {amount_to} {to_currency} paid out ({payout_hash})", ""),
    )


_RECORDED = Hop("recorded", "npwebhook", "payment recorded, forwarded to GCWebhook1", _paid())
_INVITED = Hop("invited", "gcwebhook2", "invite sent: {telegram_invite_link}",
               _paid(", p.telegram_invite_link", where=" AND p.telegram_invite_sent"), after="routed")

FLOWS = {
    "instant": (
        _RECORDED,
        Hop("routed", "gcwebhook1", "routed: payout to GCSplit1, invite to GCWebhook2",
            _paid(where=" AND p.gcwebhook1_processed")),
        *_payout_hops("'np:' || p.payment_id"),
        _INVITED,
    ),
    "threshold": (
        _RECORDED,
        Hop("routed", "gcwebhook1", "routed: credit to GCAccumulator, invite to GCWebhook2",
            _paid(where=" AND p.gcwebhook1_processed")),
        Hop("credited", "gcaccumulator", "credited {accumulated_amount_usdt} USD after the fee, pending conversion",
            _paid(", a.accumulated_amount_usdt", _CREDIT)),
        Hop("batched", "gcmicrobatch", "in conversion batch {batch_conversion_id} (ETH -> USDT)",
            _paid(", a.batch_conversion_id", _CREDIT, " AND a.batch_conversion_id IS NOT NULL"),
            scheduler="microbatch"),
        Hop("conversion-mined", "chain", "conversion transfer {conversion_tx} mined",
            _paid(", c.tx_hash AS conversion_tx",
                  f"{_CREDIT} JOIN split_payout_hostpay c ON c.unique_id = 'batch_' || a.batch_conversion_id",
                  " AND c.is_complete")),
        Hop("converted", "gcmicrobatch", "converted: {accumulated_amount_usdt} USDT",
            _paid(", a.accumulated_amount_usdt", _CREDIT, " AND a.conversion_status = 'completed'")),
        Hop("batch-paid", "gcbatchprocessor", "in payout batch {payout_batch_id}",
            _paid(", a.payout_batch_id", _CREDIT, " AND a.is_paid_out"), scheduler="batch"),
        *_payout_hops("'batch:' || a.payout_batch_id", _CREDIT),
        _INVITED,
    ),
}


# ---------------------------------------------------------------------------- following payments

def _steps(flow: tuple[Hop, ...], last: str | None = None) -> list[tuple[Hop, str | None]]:
    """Each step of a flow (up to `last`, when given) with the step a payment reaches before it (None for the first)."""
    steps = [(hop, hop.after or (flow[position - 1].name if position else None)) for position, hop in enumerate(flow)]
    names = [hop.name for hop in flow]
    return steps if last is None else steps[:names.index(last) + 1]


@dataclass
class Payment:
    """One payment being followed: when it was notified and when it reached each step."""

    payment_id: int
    mode: str
    amount_usd: Decimal
    user_id: int
    sent_at: float = 0.0  # epoch seconds
    answer: str = ""  # np-webhook's answer to the IPN
    reached: dict[str, float] = field(default_factory=dict)  # hop name -> epoch seconds
    details: dict = field(default_factory=dict)

    @property
    def flow(self) -> tuple[Hop, ...]:
        """The steps of this payment's mode."""
        return FLOWS[self.mode]

    @property
    def done(self) -> bool:
        """Whether every step was reached."""
        return len(self.reached) == len(self.flow)

    def seconds_to(self, hop_name: str) -> float | None:
        """Seconds from the notification to a step, or None when not reached."""
        return None if hop_name not in self.reached else self.reached[hop_name] - self.sent_at

    def next_hop(self) -> Hop | None:
        """The first step, in flow order, not reached yet."""
        return next((hop for hop in self.flow if hop.name not in self.reached), None)


class Tracker:
    """Follows payments to their end state, running scheduler jobs when a payment waits for one."""

    def __init__(self, database, endpoints: Endpoints, on_hop: Callable[[Payment, Hop, dict], None] = lambda *a: None,
                 on_job: Callable[[str, dict], None] = lambda *a: None, run_jobs: bool = True,
                 follow_to: str | None = None):
        self.database, self.endpoints = database, endpoints
        self.on_hop, self.on_job, self.run_jobs = on_hop, on_job, run_jobs
        # follow_to: the last step asked about (the bench's "mined"); the steps after it still happen, but
        # the tracker, which shares the machine with the stack it measures, does not poll for them.
        self.follow_to = follow_to
        self.payments: dict[int, Payment] = {}
        self._last_job: dict[str, float] = {}
        self.http = requests.Session()  # one kept connection to the ChangeNOW stand-in
        # A GET is safe to repeat: once more on a connection the stand-in closed (restarted) meanwhile.
        self.http.mount("http://", requests.adapters.HTTPAdapter(max_retries=1))

    def poll(self) -> None:
        """One round (one transaction): the steps each followed payment may have reached since the last
        round, in flow order, then any scheduler job due."""
        pending = [payment for payment in list(self.payments.values()) if payment.sent_at and not payment.done]
        with self.database.transaction() as tx:
            for mode in FLOWS:
                in_mode = [payment for payment in pending if payment.mode == mode]
                for hop, before in _steps(FLOWS[mode], self.follow_to):
                    waiting = [payment for payment in in_mode if hop.name not in payment.reached
                               and (before is None or before in payment.reached)]
                    if waiting:
                        self._check(tx, hop, waiting)
        jobs = {payment.next_hop().scheduler for payment in pending if payment.next_hop() is not None} - {None}
        for job in sorted(jobs) if self.run_jobs else ():
            if time.monotonic() - self._last_job.get(job, 0.0) >= SCHEDULER_EVERY_S:
                self._last_job[job] = time.monotonic()
                self.on_job(job, run_scheduler_job(SCHEDULER_JOBS[job](self.endpoints), self.endpoints.keys))

    def _check(self, tx, hop: Hop, waiting: list[Payment]) -> None:
        """Record the step for the payments that have reached it."""
        rows = hop.reached(tx, waiting, self.endpoints, self.http)
        now = time.time()
        for row in rows:
            payment = self.payments[row.pop("payment_id")]
            at = row.pop("at", None)
            payment.reached[hop.name] = max(at or now, payment.sent_at)
            payment.details.update(row)
            self.on_hop(payment, hop, row)

    def follow(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """Poll until `until()` holds (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if until():
                return True
            pending = sum(1 for payment in self.payments.values() if not payment.done)
            # Many payments in flight: poll less, not to load the stack being measured (mined times come
            # from the database's own clock, so they stay exact).
            time.sleep(POLL_S if pending <= 5 else BUSY_POLL_S)
        return False


def known_payment(database, payment_id: int) -> Payment:
    """A payment np-webhook recorded earlier, to follow: its mode from the rows it wrote, its time from its record."""
    with database.transaction() as tx:
        row = tx.fetchone(
            "SELECT p.user_id, EXTRACT(EPOCH FROM p.created_at)::float8 AS at, a.id IS NOT NULL AS credited"
            " FROM processed_payments p"
            " LEFT JOIN payout_accumulation a ON a.nowpayments_payment_id = p.payment_id::text"
            " WHERE p.payment_id = %s", (payment_id,))
    if row is None:
        raise ValueError(f"no payment {payment_id} was recorded by np-webhook")
    return Payment(payment_id, "threshold" if row["credited"] else "instant", Decimal(0), row["user_id"],
                   sent_at=row["at"])


def notify(endpoints: Endpoints, payment: Payment, attempts: int = 5, http=requests) -> None:
    """Send the payment's IPN, again on a 5xx as NowPayments would (np-webhook answers 503 to be retried)."""
    body = ipn_body(CHANNELS[payment.mode], payment.payment_id, payment.user_id, payment.amount_usd, ETH_USD)
    payment.sent_at = time.time()
    for attempt in range(attempts):
        answer = send_ipn(endpoints, body, http)
        payment.answer = f"{answer.status_code} {answer.text.strip()[:120]}"
        if answer.status_code < 500:
            return
        time.sleep(0.2 * (attempt + 1))


def pay(tracker: Tracker, mode: str, amount_usd: Decimal, count: int = 1, rate: float | None = None,
        timeout_s: float = 120.0, until: Callable[[Payment], bool] = lambda payment: payment.done) -> list[Payment]:
    """Notify `count` payments (at `rate` per second, or at once) and follow them until `until` holds for all
    (by default: their end state) or the timeout passes."""
    payments = [Payment(new_payment_id(), mode, amount_usd, 10**9 + secrets.randbelow(10**9)) for _ in range(count)]
    for payment in payments:
        tracker.payments[payment.payment_id] = payment

    def send_all():
        started = time.monotonic()
        # The senders share kept connections to np-webhook: the client and np-webhook do not pay a
        # connection per notification on the cores the pipeline being measured runs on.
        with requests.Session() as http, ThreadPoolExecutor(SENDERS) as pool:  # the senders end first
            http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=SENDERS))
            for number, payment in enumerate(payments):
                if rate:
                    time.sleep(max(0.0, started + number / rate - time.monotonic()))
                pool.submit(notify, tracker.endpoints, payment, http=http)

    with ThreadPoolExecutor(1) as sender:
        sending = sender.submit(send_all)
        tracker.follow(lambda: sending.done() and all(until(p) for p in payments), timeout_s)
        sending.result()
    return payments


def _eth_usd() -> Decimal:
    """The ETH price the stand-ins quote (ChangeNOW's table, which the CoinGecko stand-in serves too)."""
    from telepay_shared.standins.changenow import DEFAULT_PRICES_USD

    return DEFAULT_PRICES_USD["eth"]


ETH_USD = _eth_usd()


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (share 0.5: the median) of the values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summary(payments: list[Payment], end_hop: str = "mined") -> dict:
    """Latency from notification to end_hop (p50, p95, max) and the throughput of the run."""
    latencies = [p.seconds_to(end_hop) for p in payments if p.seconds_to(end_hop) is not None]
    ends = [p.reached[end_hop] for p in payments if end_hop in p.reached]
    span = (max(ends) - min(p.sent_at for p in payments)) if ends else None
    return {
        "payments": len(payments), "reached": len(latencies), "done": sum(p.done for p in payments),
        "p50_s": percentile(latencies, 0.50), "p95_s": percentile(latencies, 0.95),
        "max_s": max(latencies, default=None),
        "throughput_per_s": len(ends) / span if span else None,
        "p50_s_by_hop": {hop.name: percentile([p.seconds_to(hop.name) for p in payments if hop.name in p.reached], 0.5)
                         for hop in (payments[0].flow if payments else ())},
    }
