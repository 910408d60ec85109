"""The fault-injection soak (tools/dev soak, issue 7): many payments through a running stack while it is
broken on purpose, then the invariants, computed from the database, the chain and the stand-ins' records.

    tools/dev soak [--payments 1000] [--seed N] [--threshold-share 0.2] [--rate R] [--json]

Faults (faults.py), seeded: Cloud Tasks duplicate deliveries (concurrent and after success),
NowPayments repeating IPNs, services killed with SIGKILL and restarted, ChangeNOW 5xx, 429 with
Retry-After and hangs past the client timeout, Ethereum RPC calls that hang or lose their answer
(eth_sendRawTransaction included) through a proxy in front of the chain, PostgreSQL restarts.
GCHostPay3 is restarted for the run with ETHEREUM_RPC_URL on the proxy, SLACK_ALERT_WEBHOOK on the
soak's alert sink and a 2 s RPC timeout, and restarted as it was afterwards.

Invariants (check(), on an Observation):

1. Terminal. Every payment is paid, held, or failed:
   * instant paid: split_payout_hostpay for its payout (idempotency key np:<payment_id>) is
     complete with tx_status success, exactly one successful host-wallet transfer reached the
     exchange's deposit address on chain, with the recorded hash, ChangeNOW's exchange is
     finished, and processed_payments says routed and invited;
   * threshold paid: its credit is converted, in a payout batch marked completed, whose payout
     (batch:<batch_id>) is paid as above; held: its credit waits below a threshold the scheduler
     cannot pass (pending credits below MICRO_BATCH_THRESHOLD_USD in total, or the client's
     converted balance below its payout_threshold_usd); invited either way;
   * failed: a failed_transactions row awaiting review for its payout's unique_id (or its
     conversion's) AND an alert naming that unique_id received by the Slack stand-in.
2. Paid once. Every transfer out of the host wallet (ETH value, or an ERC-20 transfer() call)
   mined since the soak began is attributed by its destination (the exchange deposit address
   recorded for a unique_id); a unique_id with two successful transfers, or a transfer to an
   address no payout recorded, is a violation.
3. Ledger, in Decimal:
   * instant payment, in ETH: received = paid_out + fee + held, where received is the ETH the IPN
     reported (outcome_amount), paid_out the ETH mined from the host wallet to its exchange's
     deposit address (chain), fee the platform fee by the rule, received - floor_8(received *
     (1 - TP_FLAT_FEE/100)), rounding to the payout tables' 8 places included, and held what a
     failed payout leaves for review. Swap costs are the client's (ChangeNOW's spread and fees
     come out of the amount the client receives) and gas is the platform's expense paid from its
     fee: both reported, neither in the balance. Also: recorded from_amount = exchange amountFrom = paid_out.
   * micro-batch conversion C (pooled threshold credits), in ETH: sum(received_i) = swapped +
     sum(fee_i) + dust, 0 <= dust < 10^-8, where received_i is each credit's NowPayments ETH,
     fee_i = received_i * payment_fee_usd_i / usd_i (the platform's share, kept in the wallet:
     defect 14; usd_i = received_i * ETH_USD at 8 places, the value np-webhook gave the payment)
     and swapped the ETH mined from the host to C's deposit address. Its USDT: ChangeNOW's amountTo = the USDT minted to the host wallet on chain = actual_usdt_received
     = the sum of the credits' converted shares. Its swap cost (USD) = swapped * ETH_USD - USDT received.
   * payout batch B, in USDT: the sum of its credits' shares = total_amount_usdt = the USDT mined
     from the host to B's exchange deposit address.
   * in total, in USD at the stand-ins' ETH price: received = paid out + fees + swap costs + held
     (credits waiting for a threshold, payouts under review), and the host wallet's balances on
     chain moved by exactly the scanned transfers and gas.
4. No secret in the logs: every part's log (<stack>/logs/*.log, faults and tracebacks included) is
   scanned for every secret the stack configured (tools/devstack/logscan.py).
"""
from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal

import requests

from tools.devstack import faults, pipeline
from tools.devstack.logscan import find_secrets, stack_secrets

STEP = Decimal("1E-8")
USDT_UNIT = Decimal("1E-6")  # one base unit of the conversions' USDT (ERC-20, 6 decimals)
ERC20_TRANSFER = "0xa9059cbb"
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
REVIEW = "failed_pending_review"
SOAK_OVERRIDES = {"ETHEREUM_RPC_TIMEOUT_S": "2"}  # a hang costs seconds, not the default 10
RPC_HANG_S = 3.5  # past the 2 s timeout
QUIET_S = 8.0  # quiescence: nothing moved and every queue empty this long
SCHEDULER_EVERY_S = 1.5
IPN_RETRY_FOR_S = 120.0  # NowPayments keeps retrying a failed IPN


# ---------------------------------------------------------------------------- what the checker reads

@dataclass(frozen=True)
class SentPayment:
    """A payment the soak notified, as NowPayments reported it."""

    payment_id: int
    mode: str
    amount_usd: Decimal
    received_eth: Decimal  # the IPN's outcome_amount
    user_id: int


@dataclass(frozen=True)
class ChainTransfer:
    """A successful or reverted transfer on chain: ETH value or an ERC-20 Transfer."""

    tx_hash: str
    asset: str  # 'eth' or a token symbol
    to: str  # lower-case address
    amount: Decimal  # whole units
    status: int = 1
    gas_wei: int = 0


@dataclass
class Observation:
    """Everything the invariants are computed from, gathered at the end of a soak (or made by a test)."""

    payments: list[SentPayment]
    tables: dict[str, list[dict]]  # every row of the payout tables
    transfers_out: list[ChainTransfer]  # every host-wallet transaction mined since the soak began
    transfers_in: list[ChainTransfer]  # token transfers to the host wallet since then (conversion payouts)
    exchanges: dict[str, dict]  # ChangeNOW stand-in records by exchange id
    alerts: list[str]  # texts the Slack stand-in received
    fee_percent: Decimal
    micro_threshold: Decimal
    eth_usd: Decimal
    balance_change: dict[str, Decimal] = field(default_factory=dict)  # host wallet, asset -> end - start


@dataclass(frozen=True)
class Violation:
    """One broken invariant, about one payment, unique_id or batch."""

    invariant: str  # terminal | paid_once | ledger | no_secret_in_logs
    subject: str
    message: str


# ---------------------------------------------------------------------------- the checker

class _Index:
    """The observation's rows by the keys the checks look them up with."""

    def __init__(self, obs: Observation):
        rows = obs.tables
        self.requests = {r["idempotency_key"]: r for r in rows.get("split_payout_request", []) if r["idempotency_key"]}
        self.ques = {r["unique_id"]: r for r in rows.get("split_payout_que", [])}
        self.hostpay = {r["unique_id"]: r for r in rows.get("split_payout_hostpay", [])}
        self.processed = {r["payment_id"]: r for r in rows.get("processed_payments", [])}
        self.credits = {r["nowpayments_payment_id"]: r for r in rows.get("payout_accumulation", [])}
        self.conversions = {str(r["batch_conversion_id"]): r for r in rows.get("batch_conversions", [])}
        self.batches = {r["batch_id"]: r for r in rows.get("payout_batches", [])}
        self.reviews: dict[str, list[dict]] = defaultdict(list)
        for row in rows.get("failed_transactions", []):
            self.reviews[row["unique_id"]].append(row)
        self.thresholds = {r["closed_channel_id"]: r["payout_threshold_usd"]
                           for r in rows.get("main_clients_database", [])}
        # Every deposit address a payout recorded -> its unique_id (attribution of chain transfers).
        self.payout_of = {r["payin_address"].lower(): r["unique_id"] for r in self.hostpay.values() if r["payin_address"]}
        self.payout_of.update({r["payin_address"].lower(): r["unique_id"] for r in self.ques.values()
                               if r["payin_address"]})
        self.payout_of.update({r["payin_address"].lower(): f"batch_{key}" for key, r in self.conversions.items()
                               if r["payin_address"]})


class Checker:
    """Computes the invariants of the module docstring over one Observation."""

    def __init__(self, obs: Observation):
        self.obs, self.ix = obs, _Index(obs)
        self.violations: list[Violation] = []
        self.states: Counter = Counter()
        self.ledger: dict[str, Decimal] = defaultdict(Decimal)  # USD at eth_usd, in total
        self.paid: dict[str, list[ChainTransfer]] = defaultdict(list)  # unique_id -> successful transfers

    def run(self) -> Checker:
        """Every check, in order; the findings are in violations, states and ledger."""
        self._attribute_transfers()
        for payment in self.obs.payments:
            (self._instant if payment.mode == "instant" else self._threshold)(payment)
        touched = {str(self.ix.credits[str(p.payment_id)]["batch_conversion_id"]) for p in self.obs.payments
                   if str(p.payment_id) in self.ix.credits and self.ix.credits[str(p.payment_id)]["batch_conversion_id"]}
        for conversion_id in sorted(touched):
            self._conversion(conversion_id)
        batches = {self.ix.credits[str(p.payment_id)]["payout_batch_id"] for p in self.obs.payments
                   if str(p.payment_id) in self.ix.credits} - {None}
        for batch_id in sorted(batches):
            self._payout_batch(batch_id)
        self._balances()
        return self

    def _violate(self, invariant: str, subject: str, message: str) -> None:
        """Record one violation."""
        self.violations.append(Violation(invariant, subject, message))

    # ---- paid once

    def _attribute_transfers(self) -> None:
        """Map every successful host-wallet transfer to a payout; two for one unique_id, or none, is a violation."""
        for transfer in self.obs.transfers_out:
            if transfer.status != 1 or transfer.amount <= 0:
                continue
            unique_id = self.ix.payout_of.get(transfer.to)
            if unique_id is None:
                self._violate("paid_once", transfer.tx_hash, f"{transfer.amount} {transfer.asset} sent to "
                              f"{transfer.to}, an address no payout recorded")
                continue
            self.paid[unique_id].append(transfer)
        for unique_id, transfers in self.paid.items():
            if len(transfers) > 1:
                self._violate("paid_once", unique_id, f"paid {len(transfers)} times on chain: " + ", ".join(
                    f"{t.amount} {t.asset} in {t.tx_hash}" for t in transfers))

    def _alerted(self, unique_id: str) -> bool:
        """Whether the Slack stand-in received an alert naming the unique_id."""
        return any(unique_id in text for text in self.obs.alerts)

    def _under_review(self, unique_id: str) -> list[dict]:
        """The failed_transactions rows awaiting review for a unique_id."""
        return [row for row in self.ix.reviews.get(unique_id, []) if row["status"] == REVIEW]

    def _failed(self, subject: str, unique_id: str) -> bool:
        """Whether the payout is recorded for review; without the alert that is a violation (still terminal)."""
        if not self._under_review(unique_id):
            return False
        if not self._alerted(unique_id):
            self._violate("terminal", subject, f"payout {unique_id} is recorded for review but no alert names it")
        return True

    def _transfer_complete(self, unique_id: str) -> str | None:
        """Why the payout's transfer is not complete (None: it is: rows written, mined once, exchange finished)."""
        row = self.ix.hostpay.get(unique_id)
        if row is None:
            return "no transfer recorded"
        mined = self.paid.get(unique_id, [])
        if not (row["is_complete"] and row["tx_status"] == "success"):
            return f"transfer {row['tx_hash']} recorded as {row['tx_status']}, not complete"
        if not mined:
            return f"transfer {row['tx_hash']} recorded complete, but nothing reached {row['payin_address']} on chain"
        if all(transfer.tx_hash.lower() != (row["tx_hash"] or "").lower() for transfer in mined):
            return f"recorded hash {row['tx_hash']} is not the transfer mined ({mined[0].tx_hash})"
        exchange = self.obs.exchanges.get(row["cn_api_id"]) or self.obs.exchanges.get(
            (self.ix.ques.get(unique_id) or {}).get("cn_api_id") or "")
        if exchange is None or exchange.get("status") != "finished":
            return f"exchange {row['cn_api_id']} is {exchange and exchange.get('status')}, not finished"
        return None

    def _sent(self, unique_id: str, asset: str) -> Decimal:
        """What reached the payout's deposit address on chain, in whole units of an asset."""
        return sum((t.amount for t in self.paid.get(unique_id, []) if t.asset == asset), Decimal(0))

    # ---- instant payments

    def _instant(self, payment: SentPayment) -> None:
        """Terminal state and ledger of one instant payment."""
        subject = f"payment {payment.payment_id}"
        net = (payment.received_eth * (1 - self.obs.fee_percent / 100)).quantize(STEP, ROUND_DOWN)
        fee = payment.received_eth - net
        request = self.ix.requests.get(f"np:{payment.payment_id}")
        unique_id = request["unique_id"] if request else None
        invited = self._invited(payment)
        if unique_id and self._failed(subject, unique_id):
            state, held = "failed", net
        elif unique_id and not (why := self._transfer_complete(unique_id)) and invited is None:
            state, held = "paid", Decimal(0)
        else:
            reason = invited or (why if unique_id else "no payout request (split_payout_request np:<id>)")
            self._violate("terminal", subject, f"not terminal: {reason}")
            state, held = "stuck", net
        self.states[f"instant_{state}"] += 1
        paid_out = self._sent(unique_id, "eth") if unique_id else Decimal(0)
        if state == "stuck":  # whatever has not left yet is in flight
            self._add_usd(received=payment.received_eth, paid_out=paid_out, fees=fee,
                          in_flight=payment.received_eth - fee - paid_out)
            return
        if payment.received_eth != paid_out + fee + held:
            self._violate("ledger", subject, f"received {payment.received_eth} ETH != paid out {paid_out} + "
                          f"fee {fee} + held {held}")
        if state == "paid":
            self._same_amounts(subject, unique_id, paid_out)
        self._add_usd(received=payment.received_eth, paid_out=paid_out, fees=fee, held=held)

    def _same_amounts(self, subject: str, unique_id: str, paid_out: Decimal) -> None:
        """The recorded transfer amount and the exchange's deposit equal what the chain shows."""
        row = self.ix.hostpay[unique_id]
        exchange = self.obs.exchanges.get(row["cn_api_id"], {})
        received = Decimal(str(exchange.get("amountFrom"))) if exchange.get("amountFrom") is not None else None
        if row["from_amount"] != paid_out or received != paid_out:
            self._violate("ledger", subject, f"payout {unique_id}: recorded {row['from_amount']}, exchange received "
                          f"{received}, chain {paid_out}")

    def _invited(self, payment: SentPayment) -> str | None:
        """Why the payment's own rows are not written (None: routed and invited)."""
        row = self.ix.processed.get(payment.payment_id)
        if row is None:
            return "np-webhook never recorded it"
        if not row["gcwebhook1_processed"]:
            return "not routed by GCWebhook1"
        if not row["telegram_invite_sent"]:
            return "invite not sent"
        return None

    def _add_usd(self, **terms: Decimal) -> None:
        """Add ETH amounts to the total ledger, in USD at the reference price."""
        for name, eth in terms.items():
            self.ledger[name] += Decimal(eth) * self.obs.eth_usd

    # ---- threshold payments

    def _threshold(self, payment: SentPayment) -> None:
        """Terminal state of one threshold payment, and its credit against the fee rule."""
        subject = f"payment {payment.payment_id}"
        credit = self.ix.credits.get(str(payment.payment_id))
        invited = self._invited(payment)
        if credit is None:
            self._violate("terminal", subject, f"not terminal: no credit ({invited or 'invited'})")
            self.states["threshold_stuck"] += 1
            self._add_usd(received=payment.received_eth, in_flight=payment.received_eth)
            return
        self._credit_rule(subject, payment, credit)
        state, reason = self._credit_state(credit)
        if state != "stuck" and invited is not None:
            state, reason = "stuck", invited
        if state == "stuck":
            self._violate("terminal", subject, f"not terminal: {reason}")
        self.states[f"threshold_{state}"] += 1
        if credit["batch_conversion_id"] is None:  # not pooled yet: its whole ETH is still in the wallet
            fee = self._fee_eth(credit)
            self._add_usd(received=credit["nowpayments_outcome_amount"], fees=fee,
                          **{"held" if state == "held" else "in_flight": credit["nowpayments_outcome_amount"] - fee})

    def _gross_usd(self, received_eth: Decimal) -> Decimal:
        """The USD value np-webhook gives the payment's ETH (at the stand-ins' price, 8 places)."""
        return (received_eth * self.obs.eth_usd).quantize(STEP, ROUND_HALF_UP)

    def _fee_eth(self, credit: dict) -> Decimal:
        """The platform's share of a credit's ETH: its fee over the payment's USD value (defect 14)."""
        gross = self._gross_usd(credit["nowpayments_outcome_amount"])
        return credit["nowpayments_outcome_amount"] * credit["payment_fee_usd"] / gross

    def _credit_rule(self, subject: str, payment: SentPayment, credit: dict) -> None:
        """The credit holds the payment's ETH, its USD value, and the fee the rule takes of that value."""
        gross = self._gross_usd(payment.received_eth)
        fee = gross - (gross * (1 - self.obs.fee_percent / 100)).quantize(STEP, ROUND_HALF_EVEN)
        recorded = (credit["nowpayments_outcome_amount"], credit["payment_fee_usd"], credit["payment_amount_usd"])
        if recorded != (payment.received_eth, fee, gross.quantize(Decimal("0.01"), ROUND_HALF_UP)):
            self._violate("ledger", subject, f"credit records (ETH, fee, USD) {recorded}; the IPN and the fee rule "
                          f"make them ({payment.received_eth}, {fee}, {gross})")

    def _credit_state(self, credit: dict) -> tuple[str, str]:
        """(paid | held | failed | stuck, why) of a credit, from its conversion and payout batch."""
        status, conversion_id = credit["conversion_status"], credit["batch_conversion_id"]
        if status == "pending" and conversion_id is None:
            pending = sum((c["accumulated_amount_usdt"] for c in self.ix.credits.values()
                           if c["conversion_status"] == "pending"), Decimal(0))
            if pending < self.obs.micro_threshold:
                return "held", ""
            return "stuck", f"pending credits total {pending} USD, past the {self.obs.micro_threshold} threshold"
        if status != "completed":
            unique_id = f"batch_{conversion_id}"
            if self._failed(f"conversion {conversion_id}", unique_id):
                return "failed", ""
            return "stuck", f"conversion {conversion_id} is {status}"
        if not credit["is_paid_out"]:
            return self._held_converted(credit)
        return self._batch_state(credit["payout_batch_id"])

    def _held_converted(self, credit: dict) -> tuple[str, str]:
        """A converted, unpaid credit is held while its client's converted balance is below the client's threshold."""
        balance = sum((c["accumulated_amount_usdt"] for c in self.ix.credits.values()
                       if c["client_id"] == credit["client_id"] and c["conversion_status"] == "completed"
                       and not c["is_paid_out"]), Decimal(0))
        threshold = self.ix.thresholds.get(credit["client_id"])
        if threshold is None or balance < threshold:
            return "held", ""
        return "stuck", f"client {credit['client_id']} holds {balance} USDT converted, past its {threshold} threshold"

    def _batch_state(self, batch_id: str) -> tuple[str, str]:
        """paid once the payout batch is completed and its payout transfer complete; failed when under review."""
        request = self.ix.requests.get(f"batch:{batch_id}")
        if request is None:
            return "stuck", f"payout batch {batch_id} has no payout request"
        unique_id = request["unique_id"]
        if self._failed(f"payout batch {batch_id}", unique_id):
            return "failed", ""
        why = self._transfer_complete(unique_id)
        batch = self.ix.batches.get(batch_id) or {}
        if why is None and batch.get("status") != "completed":
            why = f"payout batch {batch_id} is {batch.get('status')}, not completed"
        return ("paid", "") if why is None else ("stuck", why)

    def _conversion(self, conversion_id: str) -> None:
        """The ETH and USDT balance of one micro-batch conversion (module docstring)."""
        subject = f"conversion {conversion_id}"
        conversion = self.ix.conversions.get(conversion_id)
        credits = [c for c in self.ix.credits.values() if str(c["batch_conversion_id"]) == conversion_id]
        received = sum((c["nowpayments_outcome_amount"] for c in credits), Decimal(0))
        fees = sum((self._fee_eth(c) for c in credits), Decimal(0))
        swapped = self._sent(f"batch_{conversion_id}", "eth")
        if conversion is None or conversion["conversion_status"] != "completed":
            self._add_usd(received=received, fees=fees, in_flight=received - fees)
            return
        dust = received - fees - swapped
        if not Decimal(0) <= dust < STEP:
            self._violate("ledger", subject, f"received {received} ETH != swapped {swapped} + fees {fees} "
                          f"(+ rounding < 1E-8), off by {dust}")
        usdt = self._converted_usdt(subject, conversion, credits)
        self._add_usd(received=received, fees=fees)
        self.ledger["swap_costs"] += (swapped + dust) * self.obs.eth_usd - usdt
        unpaid = sum((c["accumulated_amount_usdt"] for c in credits if not c["is_paid_out"]), Decimal(0))
        self.ledger["held"] += unpaid
        self.ledger["paid_out"] += usdt - unpaid

    def _converted_usdt(self, subject: str, conversion: dict, credits: list[dict]) -> Decimal:
        """The USDT a conversion yielded, checked across ChangeNOW, the chain and the tables."""
        exchange = self.obs.exchanges.get(conversion["cn_api_id"] or "", {})
        amount_to = Decimal(str(exchange.get("amountTo"))) if exchange.get("amountTo") is not None else None
        minted = [t for t in self.obs.transfers_in if t.tx_hash.lower() == (exchange.get("payoutHash") or "").lower()]
        on_chain = sum((t.amount for t in minted), Decimal(0))
        shares = sum((c["accumulated_amount_usdt"] for c in credits), Decimal(0))
        # ChangeNOW may quote finer than the token; what it can pay is amountTo in whole base units.
        finer = amount_to is not None and Decimal(0) <= amount_to - on_chain < USDT_UNIT
        if not (finer and on_chain == conversion["actual_usdt_received"] == shares):
            self._violate("ledger", subject, f"USDT received: ChangeNOW {amount_to}, chain {on_chain}, "
                          f"recorded {conversion['actual_usdt_received']}, credits' shares {shares}")
        return conversion["actual_usdt_received"] or Decimal(0)

    def _payout_batch(self, batch_id: str) -> None:
        """A payout batch pays exactly its credits' USDT, once."""
        batch = self.ix.batches.get(batch_id)
        request = self.ix.requests.get(f"batch:{batch_id}")
        shares = sum((c["accumulated_amount_usdt"] for c in self.ix.credits.values() if c["payout_batch_id"] == batch_id),
                     Decimal(0))
        sent = self._sent(request["unique_id"], "usdt") if request else Decimal(0)
        if batch is None or batch["total_amount_usdt"] != shares:
            self._violate("ledger", f"payout batch {batch_id}", f"credits' USDT {shares} != batch total "
                          f"{batch and batch['total_amount_usdt']}")
        elif (batch.get("status") == "completed" or sent) and sent != shares:
            self._violate("ledger", f"payout batch {batch_id}", f"sent {sent} USDT on chain for {shares} owed")

    # ---- in total

    def _balances(self) -> None:
        """The host wallet's balances moved exactly by the transfers scanned (nothing unseen left it)."""
        if not self.obs.balance_change:
            return
        eth_out = sum((t.amount for t in self.obs.transfers_out if t.asset == "eth" and t.status == 1), Decimal(0))
        gas = sum((Decimal(t.gas_wei) for t in self.obs.transfers_out), Decimal(0)).scaleb(-18)
        expected = {"eth": -(eth_out + gas)}
        for asset in {t.asset for t in self.obs.transfers_out + self.obs.transfers_in} - {"eth"}:
            out = sum((t.amount for t in self.obs.transfers_out if t.asset == asset and t.status == 1), Decimal(0))
            expected[asset] = sum((t.amount for t in self.obs.transfers_in if t.asset == asset), Decimal(0)) - out
        for asset, change in self.obs.balance_change.items():
            if change != expected.get(asset, Decimal(0)):
                self._violate("ledger", f"host wallet {asset}", f"balance moved {change}, the transfers scanned "
                              f"explain {expected.get(asset, Decimal(0))}")
        self.ledger["gas_eth"] = gas

    def total_imbalance(self) -> Decimal:
        """received - (paid out + fees + swap costs + held + in flight), USD: zero when everything balances."""
        terms = ("paid_out", "fees", "swap_costs", "held", "in_flight")
        return self.ledger["received"] - sum((self.ledger[name] for name in terms), Decimal(0))


def check(obs: Observation) -> dict:
    """The invariants' verdict: violations, terminal states and the ledger in total."""
    checker = Checker(obs).run()
    imbalance = checker.total_imbalance()
    # Rounding: every payment's ETH at 8 places is worth at most 1E-8 * price, every share 1E-8 USDT.
    tolerance = STEP * obs.eth_usd * (len(obs.payments) + 1)
    if abs(imbalance) > tolerance:
        checker._violate("ledger", "in total", f"received != paid out + fees + swap costs + held by {imbalance} USD")
    return {"violations": [dataclasses.asdict(v) for v in checker.violations], "states": dict(checker.states),
            "ledger_usd": {name: str(value.quantize(STEP)) for name, value in sorted(checker.ledger.items())},
            "imbalance_usd": str(imbalance.quantize(STEP))}


# ---------------------------------------------------------------------------- observing the stack

TABLES = ("processed_payments", "payout_accumulation", "batch_conversions", "payout_batches", "split_payout_request",
          "split_payout_que", "split_payout_hostpay", "failed_transactions", "main_clients_database")


def read_tables(database) -> dict[str, list[dict]]:
    """Every row of the tables the invariants read."""
    with database.transaction() as tx:
        return {table: tx.fetchall(f"SELECT * FROM {table}") for table in TABLES}


class ChainReader:
    """Reads the host wallet's transfers and balances from the chain itself."""

    def __init__(self, info: dict):
        from web3 import Web3

        self.w3 = Web3(Web3.HTTPProvider(info["rpc_url"], request_kwargs={"timeout": 60}))
        self.host = info["host_address"].lower()
        self.tokens = {t["address"].lower(): (symbol, t["decimals"]) for symbol, t in info["tokens"].items()}

    def head(self) -> int:
        """The latest block number."""
        return self.w3.eth.block_number

    def balances(self) -> dict[str, Decimal]:
        """The host wallet's ETH and token balances, in whole units."""
        from web3 import Web3

        host = Web3.to_checksum_address(self.host)
        found = {"eth": Decimal(self.w3.eth.get_balance(host)).scaleb(-18)}
        for address, (symbol, decimals) in self.tokens.items():
            data = "0x70a08231" + host[2:].lower().rjust(64, "0")  # balanceOf(host)
            raw = self.w3.eth.call({"to": Web3.to_checksum_address(address), "data": data})
            found[symbol] = Decimal(int.from_bytes(raw, "big")).scaleb(-decimals)
        return found

    def transfers_out(self, first: int, last: int) -> list[ChainTransfer]:
        """Every transaction the host wallet sent in blocks first..last, as the transfer it made."""
        found = []
        for number in range(first, last + 1):
            for tx in self.w3.eth.get_block(number, full_transactions=True)["transactions"]:
                if tx["from"].lower() == self.host:
                    found.append(self._as_transfer(tx))
        return found

    def _as_transfer(self, tx) -> ChainTransfer:
        """One host transaction: ETH value, or a token's transfer(to, amount); with its receipt's status and gas."""
        receipt = self.w3.eth.get_transaction_receipt(tx["hash"])
        data = bytes(tx.get("input") or tx.get("data") or b"").hex()  # eth-tester names it data
        gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
        token = self.tokens.get((tx["to"] or "").lower())
        if token and data.startswith(ERC20_TRANSFER[2:]):
            to, units = "0x" + data[8 + 24:8 + 64], int(data[8 + 64:8 + 128], 16)
            return ChainTransfer(tx["hash"].to_0x_hex(), token[0], to.lower(), Decimal(units).scaleb(-token[1]),
                                 receipt["status"], gas)
        return ChainTransfer(tx["hash"].to_0x_hex(), "eth", (tx["to"] or "").lower(),
                             Decimal(tx["value"]).scaleb(-18), receipt["status"], gas)

    def transfers_in(self, first: int, last: int) -> list[ChainTransfer]:
        """Token transfers to the host wallet in blocks first..last (the conversions' USDT)."""
        from web3 import Web3

        found = []
        for address, (symbol, decimals) in self.tokens.items():
            logs = self.w3.eth.get_logs({"fromBlock": first, "toBlock": last, "address": Web3.to_checksum_address(address),
                                         "topics": [TRANSFER_TOPIC, None, "0x" + self.host[2:].rjust(64, "0")]})
            found += [ChainTransfer(entry["transactionHash"].to_0x_hex(), symbol, self.host,
                                    Decimal(int.from_bytes(entry["data"], "big")).scaleb(-decimals)) for entry in logs]
        return found


def read_exchanges(stack, ids: set[str]) -> dict[str, dict]:
    """The ChangeNOW stand-in's records of the exchanges (faults taken beforehand)."""
    headers = {"x-changenow-api-key": stack.secrets["CHANGENOW_API_KEY"]}
    found = {}
    for exchange_id in sorted(ids):
        answer = requests.get(stack.url("changenow") + "/v2/exchange/by-id", params={"id": exchange_id},
                              headers=headers, timeout=30)
        if answer.status_code == 200:
            found[exchange_id] = answer.json()
    return found


# ---------------------------------------------------------------------------- running a soak

@dataclass
class Options:
    """What a soak does (tools/dev soak's flags)."""

    payments: int = 1000
    seed: int = 1
    threshold_share: float = 0.2
    rate: float = 4.0  # payments notified per second
    duplicate_share: float = 0.1  # Cloud Tasks deliveries repeated
    ipn_duplicate_share: float = 0.05  # IPNs NowPayments sends twice
    faults_per_minute: float = 20.0  # besides one of each kind
    minimum_each: int = 1
    db_restarts: int = 1
    settle_timeout_s: float = 600.0


@dataclass
class _Run:
    """A soak in progress: its parts and what it has counted."""

    stack: object
    options: Options
    rng: random.Random
    say: object
    sent: list[SentPayment] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    ipn_failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def soak_stack(stack, proxy_url: str, sink_url: str):
    """The same stack, its services wired to the fault proxy, the alert sink and a short RPC timeout."""
    from tools.devstack.stack import Stack

    overrides = {**stack.settings.overrides, **SOAK_OVERRIDES, "ETHEREUM_RPC_URL": proxy_url,
                 "SLACK_ALERT_WEBHOOK": sink_url}
    return Stack(stack.folder, source_root=stack.source_root, bin_root=stack.bin_root,
                 settings=dataclasses.replace(stack.settings, overrides=overrides), say=lambda text: None)


def rewired_services(stack) -> list[str]:
    """The services whose environment the soak changes (they declare the chain or the alert webhook)."""
    names = ("ETHEREUM_RPC_URL", "SLACK_ALERT_WEBHOOK")
    return [service for service in stack.services()
            if any(name in (stack.declaration(service).get(section) or {}) for section in ("secrets", "env")
                   for name in names)]


def restart_services(stack, services: list[str]) -> None:
    """Restart services so they read the stack's (possibly new) environment."""
    for service in services:
        stack.stop_part(service)
        stack.start_service(service)


def _ipn(run: _Run, payment: SentPayment, endpoints: pipeline.Endpoints) -> None:
    """Send a payment's IPN until np-webhook takes it (retried on 5xx and refused connections, as NowPayments does)."""
    channel = pipeline.CHANNELS[payment.mode]
    body = pipeline.ipn_body(channel, payment.payment_id, payment.user_id, payment.amount_usd, pipeline.ETH_USD)
    deadline, attempt = time.monotonic() + IPN_RETRY_FOR_S, 0
    while True:
        try:
            answer = pipeline.send_ipn(endpoints, body)
            if answer.status_code < 500:
                if answer.status_code != 200:
                    run.ipn_failures.append(f"{payment.payment_id}: {answer.status_code} {answer.text[:120]}")
                return
        except requests.RequestException:
            pass
        attempt += 1
        if time.monotonic() > deadline:
            run.ipn_failures.append(f"{payment.payment_id}: np-webhook did not take it in {IPN_RETRY_FOR_S} s")
            return
        time.sleep(min(0.25 * attempt, 3.0))


def _new_payment(run: _Run) -> SentPayment:
    """A random payment: instant or threshold, a random USD amount."""
    mode = "threshold" if run.rng.random() < run.options.threshold_share else "instant"
    low, high = (5, 30) if mode == "threshold" else (10, 60)
    amount = Decimal(run.rng.randint(low * 100, high * 100)) / 100
    received = (amount / pipeline.ETH_USD).quantize(pipeline.ETH_STEP, ROUND_DOWN)
    return SentPayment(pipeline.new_payment_id(), mode, amount, received, 10**9 + run.rng.randrange(10**9))


def send_payments(run: _Run, endpoints: pipeline.Endpoints) -> None:
    """Notify every payment at the configured rate; some IPNs twice (at once, or a little later)."""
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for number in range(run.options.payments):
            time.sleep(max(0.0, started + number / run.options.rate - time.monotonic()))
            payment = _new_payment(run)
            run.sent.append(payment)
            run.counts[f"payments_{payment.mode}"] += 1
            pool.submit(_ipn, run, payment, endpoints)
            if run.rng.random() < run.options.ipn_duplicate_share:
                run.counts["duplicate_ipn"] += 1
                delay = run.rng.choice((0.0, run.rng.uniform(0.5, 5.0)))
                pool.submit(lambda p=payment, d=delay: (time.sleep(d), _ipn(run, p, endpoints)))


class Scheduler:
    """Cloud Scheduler's part: the micro-batch and batch jobs, every SCHEDULER_EVERY_S, in a thread."""

    def __init__(self, endpoints: pipeline.Endpoints):
        self.endpoints, self.answers = endpoints, Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> Scheduler:
        """Start running the jobs."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current run."""
        self._stop.set()
        self._thread.join()

    def run_once(self) -> None:
        """Run both jobs once; failures (a service down) are counted, as Cloud Scheduler only logs them."""
        for job in ("microbatch", "batch"):
            try:
                answer = pipeline.run_scheduler_job(pipeline.SCHEDULER_JOBS[job](self.endpoints), self.endpoints.keys)
                self.answers[f"{job}_{answer['http_status']}"] += 1
            except requests.RequestException:
                self.answers[f"{job}_unreachable"] += 1

    def _run(self) -> None:
        """Run the jobs until stopped."""
        while not self._stop.wait(SCHEDULER_EVERY_S):
            self.run_once()


def progress(database) -> tuple:
    """A fingerprint of the pipeline's state: it stops changing once nothing moves."""
    with database.transaction() as tx:
        return tuple(tx.fetchone(
            "SELECT (SELECT count(*) FROM processed_payments WHERE telegram_invite_sent) AS invited,"
            " (SELECT count(*) FROM split_payout_hostpay WHERE is_complete) AS transfers,"
            " (SELECT count(*) FROM payout_accumulation WHERE conversion_status = 'completed') AS converted,"
            " (SELECT count(*) FROM payout_accumulation WHERE is_paid_out) AS batched,"
            " (SELECT count(*) FROM payout_batches WHERE status = 'completed') AS batches,"
            " (SELECT count(*) FROM failed_transactions) AS reviews,"
            " (SELECT count(*) FROM split_payout_request) AS requests").values())


def settle(stack, database, timeout_s: float, say) -> float:
    """Wait until nothing has moved and the queues have held the same tasks for QUIET_S (the scheduler keeps
    running); seconds waited. A task retried forever (a 4xx is retried too) does not hold the soak up."""
    started = time.monotonic()
    last, quiet_since = None, time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            queued = frozenset(task.name for tasks in stack.queued_tasks().values() for task in tasks)
            state = (progress(database), queued)
        except Exception as exc:  # noqa: BLE001 - the database may still be coming back
            say(f"  settling: {type(exc).__name__}")
            state = None
        if state != last or state is None:
            last, quiet_since = state, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def observe(stack, database, run: _Run, sink: faults.AlertSink, reader: ChainReader, first_block: int,
            balances_before: dict[str, Decimal]) -> Observation:
    """Gather the database, the chain, the exchanges and the alerts for the checker."""
    tables = read_tables(database)
    head = reader.head()
    exchange_ids = {row["cn_api_id"] for table in ("split_payout_que", "batch_conversions", "split_payout_hostpay")
                    for row in tables[table] if row.get("cn_api_id")}
    after = reader.balances()
    environment = stack.service_environment("gcsplit1")
    micro = stack.service_environment("gcmicrobatchprocessor").get("MICRO_BATCH_THRESHOLD_USD", "20.00")
    return Observation(
        payments=list(run.sent), tables=tables, transfers_out=reader.transfers_out(first_block, head),
        transfers_in=reader.transfers_in(first_block, head), exchanges=read_exchanges(stack, exchange_ids),
        alerts=sink.texts(), fee_percent=Decimal(environment.get("TP_FLAT_FEE", "3")), micro_threshold=Decimal(micro),
        eth_usd=pipeline.ETH_USD, balance_change={asset: after[asset] - balances_before[asset] for asset in after})


def run_soak(stack, options: Options, say=print) -> dict:
    """Pay, break, settle, check (module docstring); the report as a dict."""
    from telepay_shared.db import Database

    _require_up(stack)
    run = _Run(stack, options, random.Random(options.seed), say)
    proxy = faults.RpcFaultProxy(stack.chain_info()["rpc_url"], RPC_HANG_S).start()
    sink = faults.AlertSink().start()
    broken = soak_stack(stack, proxy.url, sink.url)
    rewired = rewired_services(stack)
    say(f"soak: {options.payments} payments at {options.rate}/s, seed {options.seed}; "
        f"restarting {', '.join(rewired)} on the RPC fault proxy and the alert sink")
    restart_services(broken, rewired)
    reader = ChainReader(stack.chain_info())
    first_block, balances_before = reader.head() + 1, reader.balances()
    endpoints = pipeline.Endpoints.of(stack)
    duplicates_before = faults.duplicate_counts(stack.folder)
    window_s = options.payments / options.rate
    plan = faults.FaultPlan(run.rng, window_s, faults.FAULT_KINDS, options.minimum_each, options.faults_per_minute,
                            options.db_restarts)
    injector = faults.Injector(broken, plan, proxy, say=lambda text: say(f"  {text}"))
    scheduler = Scheduler(endpoints).start()
    started = time.monotonic()
    try:
        faults.set_duplicates(stack.folder, options.duplicate_share, options.seed)
        injector.start()
        send_payments(run, endpoints)
        injector.join()
        faults.set_duplicates(stack.folder, 0.0)
        run.counts["rpc_faults_unfired"] = proxy.disarm()
        run.counts["changenow_faults_unfired"] = faults.consume_changenow_faults(stack)
        say(f"soak: {len(run.sent)} payments notified in {time.monotonic() - started:.0f} s; settling")
        with Database.from_dsn(stack.dsn, max_size=2) as database:
            settled_s = settle(stack, database, options.settle_timeout_s, say)
            scheduler.stop()
            scheduler.run_once()  # one last look, so a threshold still reachable shows as stuck, not held
            settle(stack, database, 30.0, say)
            observation = observe(stack, database, run, sink, reader, first_block, balances_before)
        run.counts.update({f"queued_at_end {queue}": len(tasks) for queue, tasks in stack.queued_tasks().items()
                           if tasks})
    finally:
        faults.set_duplicates(stack.folder, 0.0)
        injector.stop()
        scheduler.stop()  # idempotent
        restart_services(stack, rewired)
        proxy.stop()
        sink.stop()
    verdict = check(observation)
    # Faults make services log their worst (tracebacks, refused requests): no secret may be among it.
    verdict["violations"] += [dataclasses.asdict(Violation("no_secret_in_logs", finding.split(":", 1)[0], finding))
                              for finding in find_secrets(stack.path("logs"), stack_secrets(stack))]
    return report(run, injector, proxy, stack, duplicates_before, verdict, time.monotonic() - started, settled_s,
                  scheduler)


def free_port_base(first: int = 24000) -> int:
    """A port base (stack.PORT_OFFSETS) whose every port is free on 127.0.0.1 now, for a soak's own stack."""
    import socket

    from tools.devstack.stack import PORT_OFFSETS

    for base in range(first, 60000, 101):
        probes = []
        try:
            for offset in PORT_OFFSETS.values():
                probes.append(socket.create_server((faults.LOOPBACK, base + offset)))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free range of ports on 127.0.0.1")


def _require_up(stack) -> None:
    """Refuse to soak a stack that is not running."""
    from tools.devstack.stack import StackError

    down = [part for part in ("postgres", "tasks", "chain", "changenow", "telegram", "coingecko", *stack.services())
            if stack.pid(part) is None]
    if down:
        raise StackError(f"the stack is not up ({', '.join(down)} not running): tools/dev up first")


def report(run: _Run, injector: faults.Injector, proxy: faults.RpcFaultProxy, stack, duplicates_before: Counter,
           verdict: dict, seconds: float, settled_s: float, scheduler: Scheduler) -> dict:
    """Payments by mode, faults by kind, violations and the verdict."""
    duplicates = faults.duplicate_counts(stack.folder) - duplicates_before
    injected = Counter(injector.injected)
    injected["duplicate_delivery"] = duplicates["concurrent"] + duplicates["after_success"]
    injected["duplicate_ipn"] = run.counts["duplicate_ipn"]
    return {
        "payments": {"total": len(run.sent), "instant": run.counts["payments_instant"],
                     "threshold": run.counts["payments_threshold"]},
        "faults": dict(sorted(injected.items())),
        "fault_details": {"duplicate_deliveries": {k: v for k, v in sorted(duplicates.items())},
                          "rpc_fired": {f"{kind} {method}": n for (kind, method), n in sorted(proxy.fired.items())},
                          "rpc_unfired": run.counts["rpc_faults_unfired"],
                          "changenow_queued": injector.changenow_calls,
                          "changenow_unfired": run.counts["changenow_faults_unfired"],
                          "not_injected": injector.errors, "ipn_failures": run.ipn_failures[:20],
                          "queued_at_end": {k.split(" ", 1)[1]: v for k, v in run.counts.items()
                                            if k.startswith("queued_at_end ")},
                          "scheduler": dict(scheduler.answers)},
        "states": verdict["states"], "ledger_usd": verdict["ledger_usd"], "imbalance_usd": verdict["imbalance_usd"],
        "violations": verdict["violations"],
        "seconds": round(seconds, 1), "settle_seconds": round(settled_s, 1),
        "verdict": "PASS" if not verdict["violations"] else "FAIL",
    }


def print_report(result: dict) -> None:
    """The report for people."""
    payments = result["payments"]
    print(f"payments run: {payments['total']} ({payments['instant']} instant, {payments['threshold']} threshold) "
          f"in {result['seconds']} s (settled in {result['settle_seconds']} s)")
    print("faults injected: " + ", ".join(f"{kind} {count}" for kind, count in result["faults"].items()))
    details = result["fault_details"]
    print(f"  RPC faults fired: {details['rpc_fired']}; Cloud Tasks duplicates: {details['duplicate_deliveries']}")
    if details["not_injected"]:
        print(f"  not injected: {details['not_injected']}")
    print("end states: " + ", ".join(f"{state} {count}" for state, count in sorted(result["states"].items())))
    print("ledger (USD at the reference ETH price): " + ", ".join(f"{k} {v}" for k, v in result["ledger_usd"].items())
          + f"; imbalance {result['imbalance_usd']}")
    print(f"invariant violations: {len(result['violations'])}")
    for violation in result["violations"][:200]:
        print(f"  [{violation['invariant']}] {violation['subject']}: {violation['message']}")
    print(f"verdict: {result['verdict']}")


def main_command(stack, args) -> int:
    """tools/dev soak: run, print the report (or JSON), exit 1 on any violation."""
    options = Options(payments=args.payments, seed=args.seed, threshold_share=args.threshold_share, rate=args.rate,
                      settle_timeout_s=args.settle_timeout)
    result = run_soak(stack, options, say=(lambda text: None) if args.json else print)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if result["verdict"] == "PASS" else 1
