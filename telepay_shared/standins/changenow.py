"""A local stand-in for ChangeNOW API v2 (estimate, create, by-id), for tests and the dev stack only.

It follows ChangeNOW's public contract: header `x-changenow-api-key`, query/JSON field names,
JSON numbers for amounts, 14-hex exchange ids, errors as HTTP 4xx/5xx with
`{"error": code, "message": text}`. Quotes come from configurable USD prices, a spread and
per-currency fees, all Decimal. Only the standard flow with type "direct" is served; fixed-rate
requests are refused with not_valid_params. Exchanges do not progress on their own: tests call
advance()/receive_deposit(), a dev stack POSTs to the /_standin/... control routes.

Fault injection (inject_fault) makes the next N requests to a route answer 5xx, 429 with
Retry-After, hang past a client timeout, answer malformed JSON, or answer any given reply.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_DOWN, ROUND_UP, Decimal, InvalidOperation
from typing import Any

from flask import Flask, Response, request

from telepay_shared.standins.server import StandInServer

DEFAULT_API_KEY = "standin-changenow-key"
ROUTES = {
    "estimate": ("GET", "/v2/exchange/estimated-amount"),
    "create": ("POST", "/v2/exchange"),
    "by_id": ("GET", "/v2/exchange/by-id"),
}
STATUS_PROGRESSION = ("waiting", "confirming", "exchanging", "sending", "finished")
OTHER_STATUSES = ("new", "verifying", "failed", "refunded", "expired")
FAULT_KINDS = ("server_error", "rate_limit", "hang", "malformed", "reply")

DEFAULT_PRICES_USD = {
    "eth": Decimal("3000"),
    "usdt": Decimal("1"),
    "usdc": Decimal("1"),
    "dai": Decimal("1"),
    "link": Decimal("15"),
    "btc": Decimal("60000"),
    "ltc": Decimal("80"),
    "sol": Decimal("150"),
    "trx": Decimal("0.25"),
}
DEFAULT_NETWORKS = {
    "eth": ("eth",),
    "usdt": ("eth", "trx", "bsc", "sol"),
    "usdc": ("eth", "sol"),
    "dai": ("eth",),
    "link": ("eth",),
    "btc": ("btc",),
    "ltc": ("ltc",),
    "sol": ("sol",),
    "trx": ("trx",),
}
_EVM_ADDRESS = r"0x[0-9a-fA-F]{40}"
_BASE58 = "[1-9A-HJ-NP-Za-km-z]"
ADDRESS_PATTERNS = {
    "eth": _EVM_ADDRESS,
    "bsc": _EVM_ADDRESS,
    "trx": f"T{_BASE58}{{33}}",
    "sol": f"{_BASE58}{{32,44}}",
    "btc": r"(bc1[0-9a-z]{25,62}|[13][1-9A-HJ-NP-Za-km-z]{25,34})",
    "ltc": r"(ltc1[0-9a-z]{25,62}|[LM3][1-9A-HJ-NP-Za-km-z]{25,34})",
}
_AMOUNT_STEP = Decimal("0.00000001")
_EVM_NETWORKS = ("eth", "bsc")


@dataclass(eq=False)
class ApiError(Exception):
    """A ChangeNOW-style error answer: HTTP status plus {"error", "message"}."""

    status: int
    error: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.message}"


@dataclass
class Fault:
    """One scripted answer: a status, body and headers, or a hang before answering normally."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0


@dataclass(frozen=True)
class Quote:
    """A validated swap request and what it pays out."""

    from_currency: str
    from_network: str
    to_currency: str
    to_network: str
    from_amount: Decimal
    deposit_fee: Decimal
    withdrawal_fee: Decimal
    to_amount: Decimal


class ChangeNowStandIn(StandInServer):
    """ChangeNOW v2 stand-in served by waitress on 127.0.0.1 (ephemeral port by default)."""

    url_path = "/v2"  # like the real base URL, what ChangeNowClient is given

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        prices_usd: dict[str, Decimal] | None = None,
        networks: dict[str, tuple[str, ...]] | None = None,
        spread: Decimal = Decimal("0.005"),
        deposit_fees: dict[str, Decimal] | None = None,
        withdrawal_fees: dict[str, Decimal] | None = None,
        min_usd: Decimal = Decimal("5"),
        max_usd: Decimal = Decimal("1000000"),
        inactive_pairs: tuple[tuple[str, str], ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        hang_s: float = 5.0,
    ):
        super().__init__(host, port, hang_s)
        self.api_key = api_key
        self.prices_usd = dict(prices_usd or DEFAULT_PRICES_USD)
        self.networks = dict(networks or DEFAULT_NETWORKS)
        self.spread = spread
        self.deposit_fees = dict(deposit_fees or {})
        self.withdrawal_fees = dict(withdrawal_fees or {})
        self.min_usd = min_usd
        self.max_usd = max_usd
        self.inactive_pairs = frozenset(inactive_pairs)
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.requests_seen: list[dict[str, Any]] = []
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.app = self._create_app()

    # ---- controls for tests and the dev stack ----------------------------------------------

    def inject_fault(
        self,
        route: str,
        kind: str,
        count: int = 1,
        *,
        status: int | None = None,
        retry_after: str | None = "1",
        body: Any = None,
        hang_s: float | None = None,
    ) -> None:
        """Make the next `count` requests to `route` (a ROUTES key) misbehave as `kind` (FAULT_KINDS)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}")
        fault = self._make_fault(kind, status, retry_after, body, hang_s)
        with self._lock:
            self._faults[route].extend(fault for _ in range(count))

    def clear_faults(self) -> None:
        """Drop every fault still queued."""
        with self._lock:
            self._faults.clear()

    def _make_fault(self, kind, status, retry_after, body, hang_s) -> Fault:
        """Build the scripted answer for one fault kind."""
        if kind == "server_error":
            return Fault(status=status or 502, body="<html><body>502 Bad Gateway</body></html>")
        if kind == "rate_limit":
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return Fault(429, _json_text({"error": "too_many_requests", "message": "Too many requests"}), headers)
        if kind == "hang":
            return Fault(hang_s=self.hang_s if hang_s is None else hang_s)
        if kind == "malformed":
            return Fault(status=status or 200, body='{"id": "trunc')
        if kind == "reply" and status:
            return Fault(status=status, body=_json_text(body if body is not None else {}))
        raise ValueError(f"unknown fault kind {kind!r} (reply needs a status)")

    def advance(self, exchange_id: str, status: str | None = None) -> dict[str, Any]:
        """Move an exchange to `status`, or one step along STATUS_PROGRESSION; returns its by-id view."""
        with self._lock:
            record = self._record(exchange_id)
            target = status or _next_status(record["status"])
            if target not in STATUS_PROGRESSION + OTHER_STATUSES:
                raise ValueError(f"unknown status {target!r}")
            if target in STATUS_PROGRESSION[1:] and record["amountFrom"] is None:
                self._credit_deposit(record, record["expectedAmountFrom"])
            if target == "finished":
                record["payoutHash"] = "0x" + secrets.token_hex(32)
            record.update(status=target, updatedAt=_now_text())
            return dict(record)

    def receive_deposit(self, exchange_id: str, amount: Decimal | None = None) -> dict[str, Any]:
        """Simulate the deposit landing (default: the expected amount); amountTo follows the rate."""
        with self._lock:
            record = self._record(exchange_id)
            if record["status"] not in ("new", "waiting"):
                raise ValueError(f"exchange {exchange_id} is {record['status']}, not awaiting a deposit")
            self._credit_deposit(record, record["expectedAmountFrom"] if amount is None else Decimal(amount))
            record.update(status="confirming", updatedAt=_now_text())
            return dict(record)

    def open_exchange(
        self,
        from_currency: str,
        to_currency: str,
        amount: Decimal,
        address: str,
        *,
        exchange_id: str | None = None,
        status: str = "waiting",
        amount_to: Decimal | None = None,
    ) -> dict[str, Any]:
        """Create an exchange as POST /exchange would (same checks, default networks), under `exchange_id`
        when given, moved on to `status`, its amountTo set when given; returns its by-id view."""
        if status not in STATUS_PROGRESSION + OTHER_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        body = {"fromCurrency": from_currency, "toCurrency": to_currency, "fromAmount": amount, "address": address}
        exchange_id = self._new_exchange(body, exchange_id)["id"]
        if status != "waiting":
            self.advance(exchange_id, status)
        with self._lock:
            record = self._record(exchange_id)
            if amount_to is not None:
                record["amountTo"] = Decimal(str(amount_to))
            return dict(record)

    def _record(self, exchange_id: str) -> dict[str, Any]:
        """The stored exchange, or KeyError."""
        if exchange_id not in self.exchanges:
            raise KeyError(f"unknown exchange {exchange_id!r}")
        return self.exchanges[exchange_id]

    def _credit_deposit(self, record: dict[str, Any], amount: Decimal) -> None:
        """Record the received deposit and the payout it buys at the current rate."""
        to_amount = self._payout_for(
            record["fromCurrency"], record["toCurrency"], amount - self.deposit_fees.get(record["fromCurrency"], 0)
        )
        record.update(
            amountFrom=amount,
            amountTo=max(to_amount, Decimal(0)),
            depositReceivedAt=_now_text(),
            payinHash="0x" + secrets.token_hex(32),
        )

    # ---- ChangeNOW rules ------------------------------------------------------------------

    def quote(self, fields: dict[str, Any]) -> Quote:
        """Validate a swap request the way ChangeNOW does and price it."""
        if (fields.get("flow") or "standard") != "standard":
            raise ApiError(400, "not_valid_params", "Only the standard flow is supported")
        if (fields.get("type") or "direct") != "direct":
            raise ApiError(400, "not_valid_params", "type must be direct for the standard flow")
        from_currency, from_network = self._asset(fields, "from")
        to_currency, to_network = self._asset(fields, "to")
        if (from_currency, from_network) == (to_currency, to_network) or (
            (from_currency, to_currency) in self.inactive_pairs
        ):
            raise ApiError(400, "pair_is_inactive", "Pair is inactive")
        from_amount = _parse_amount(fields.get("fromAmount"), "fromAmount")
        self._check_range(from_currency, from_amount)
        deposit_fee = self.deposit_fees.get(from_currency, Decimal(0))
        withdrawal_fee = self.withdrawal_fees.get(to_currency, Decimal(0))
        to_amount = self._payout_for(from_currency, to_currency, from_amount - deposit_fee)
        if to_amount <= 0:
            raise ApiError(400, "deposit_too_small", "Amount does not cover the network fees")
        return Quote(
            from_currency, from_network, to_currency, to_network, from_amount, deposit_fee, withdrawal_fee, to_amount
        )

    def _asset(self, fields: dict[str, Any], side: str) -> tuple[str, str]:
        """The (ticker, network) of one side; the network defaults to the currency's first one."""
        currency = str(fields.get(f"{side}Currency") or "").strip().lower()
        if currency not in self.prices_usd or currency not in self.networks:
            raise ApiError(400, "not_valid_params", f"{side}Currency is not supported")
        network = str(fields.get(f"{side}Network") or self.networks[currency][0]).strip().lower()
        if network not in self.networks[currency]:
            raise ApiError(400, "not_valid_params", f"{side}Network is not supported for {currency}")
        return currency, network

    def _check_range(self, currency: str, amount: Decimal) -> None:
        """Refuse amounts outside the [min_usd, max_usd] window expressed in `currency`."""
        price = self.prices_usd[currency]
        minimum = (self.min_usd / price).quantize(_AMOUNT_STEP, ROUND_UP)
        maximum = (self.max_usd / price).quantize(_AMOUNT_STEP, ROUND_DOWN)
        if amount <= 0 or amount < minimum:
            raise ApiError(400, "deposit_too_small", f"Amount is less than minimal: {minimum}")
        if amount > maximum:
            raise ApiError(400, "out_of_range", f"Amount is more than maximal: {maximum}")

    def _payout_for(self, from_currency: str, to_currency: str, swapped_amount: Decimal) -> Decimal:
        """What `swapped_amount` (after the deposit fee) pays out after spread and withdrawal fee."""
        rate = self.prices_usd[from_currency] / self.prices_usd[to_currency]
        gross = swapped_amount * rate * (1 - self.spread)
        return (gross - self.withdrawal_fees.get(to_currency, 0)).quantize(_AMOUNT_STEP, ROUND_DOWN)

    def _new_exchange(self, body: dict[str, Any], exchange_id: str | None = None) -> dict[str, Any]:
        """Validate a POST /exchange body, store the exchange (under a new id unless given) and return the by-id record."""
        quote = self.quote(body)
        address = str(body.get("address") or "").strip()
        if not _address_ok(quote.to_network, address):
            raise ApiError(400, "not_valid_address", "Invalid withdrawal address")
        refund_address = str(body.get("refundAddress") or "").strip()
        if refund_address and not _address_ok(quote.from_network, refund_address):
            raise ApiError(400, "not_valid_refund_address", "Invalid refund address")
        now = _now_text()
        record = {
            "id": exchange_id or secrets.token_hex(7),
            "status": "waiting",
            "actionsAvailable": False,
            "fromCurrency": quote.from_currency,
            "fromNetwork": quote.from_network,
            "toCurrency": quote.to_currency,
            "toNetwork": quote.to_network,
            "expectedAmountFrom": quote.from_amount,
            "expectedAmountTo": quote.to_amount,
            "amountFrom": None,
            "amountTo": None,
            "payinAddress": _payin_address(quote.from_network),
            "payoutAddress": address,
            "payinExtraId": None,
            "payoutExtraId": body.get("extraId") or None,
            # Real ChangeNOW answers null when no refund address was given (legacy defect 29).
            "refundAddress": refund_address or None,
            "refundExtraId": body.get("refundExtraId") or None,
            "createdAt": now,
            "updatedAt": now,
            "depositReceivedAt": None,
            "payinHash": None,
            "payoutHash": None,
            "fromLegacyTicker": quote.from_currency,
            "toLegacyTicker": quote.to_currency,
            "userId": body.get("userId") or None,
            "payload": body.get("payload") or None,
        }
        with self._lock:
            if record["id"] in self.exchanges:
                raise ValueError(f"exchange {record['id']} already exists")
            self.exchanges[record["id"]] = record
        return record

    # ---- HTTP --------------------------------------------------------------------------------

    def _create_app(self) -> Flask:
        """The Flask app: ChangeNOW routes plus /_standin/ control routes."""
        app = Flask(__name__)
        app.add_url_rule(ROUTES["estimate"][1], "estimate", self._estimate_view, methods=["GET"])
        app.add_url_rule(ROUTES["create"][1], "create", self._create_view, methods=["POST"])
        app.add_url_rule(ROUTES["by_id"][1], "by_id", self._by_id_view, methods=["GET"])
        app.add_url_rule("/_standin/exchanges/<exchange_id>/advance", "advance", self._advance_view, methods=["POST"])
        app.add_url_rule("/_standin/exchanges/<exchange_id>/deposit", "deposit", self._deposit_view, methods=["POST"])
        app.add_url_rule("/_standin/faults", "faults", self._faults_view, methods=["POST"])
        app.before_request(self._gate)
        app.register_error_handler(ApiError, lambda exc: _json_response(exc.status, _error_body(exc)))
        return app

    def _gate(self) -> Response | None:
        """Record the request, play any scripted fault, then check the API key like ChangeNOW."""
        route = request.endpoint
        if route not in ROUTES:
            return None
        api_key_ok = request.headers.get("x-changenow-api-key") == self.api_key
        seen = {"route": route, "args": request.args.to_dict(), "body": _request_json(), "api_key_ok": api_key_ok}
        with self._lock:
            self.requests_seen.append(seen)
            fault = self._faults[route].popleft() if self._faults[route] else None
        if fault is not None:
            if fault.hang_s:
                self._released.wait(fault.hang_s)
            else:
                return Response(fault.body, fault.status, fault.headers, mimetype="application/json")
        if not api_key_ok:
            raise ApiError(401, "unauthorized", "Invalid api key")
        return None

    def _estimate_view(self) -> Response:
        """GET /v2/exchange/estimated-amount."""
        quote = self.quote(request.args.to_dict())
        return _json_response(
            200,
            {
                "fromCurrency": quote.from_currency,
                "fromNetwork": quote.from_network,
                "toCurrency": quote.to_currency,
                "toNetwork": quote.to_network,
                "flow": "standard",
                "type": "direct",
                "rateId": None,
                "validUntil": None,
                "transactionSpeedForecast": "10-60",
                "warningMessage": None,
                "depositFee": quote.deposit_fee,
                "withdrawalFee": quote.withdrawal_fee,
                "userId": None,
                "fromAmount": quote.from_amount,
                "toAmount": quote.to_amount,
            },
        )

    def _create_view(self) -> Response:
        """POST /v2/exchange."""
        body = _request_json()
        if not isinstance(body, dict):
            raise ApiError(400, "not_valid_params", "Body must be a JSON object")
        record = self._new_exchange(body)
        answer = {key: record[key] for key in _CREATE_ANSWER_KEYS}
        answer.update(
            fromAmount=record["expectedAmountFrom"],
            toAmount=record["expectedAmountTo"],
            flow="standard",
            type="direct",
            payoutExtraIdName=None,
            rateId=None,
        )
        return _json_response(200, answer)

    def _by_id_view(self) -> Response:
        """GET /v2/exchange/by-id?id=."""
        exchange_id = request.args.get("id", "").strip()
        if not exchange_id:
            raise ApiError(400, "not_valid_params", "id is required")
        with self._lock:
            record = self.exchanges.get(exchange_id)
            if record is None:
                raise ApiError(404, "not_found", "Exchange not found")
            return _json_response(200, dict(record))

    def _advance_view(self, exchange_id: str) -> Response:
        """POST /_standin/exchanges/<id>/advance {"status"?}."""
        return self._control(self.advance, exchange_id, (_request_json() or {}).get("status"))

    def _deposit_view(self, exchange_id: str) -> Response:
        """POST /_standin/exchanges/<id>/deposit {"amount"?}."""
        amount = (_request_json() or {}).get("amount")
        return self._control(self.receive_deposit, exchange_id, None if amount is None else Decimal(str(amount)))

    def _faults_view(self) -> Response:
        """POST /_standin/faults {"route", "kind", "count"?, "status"?, "retry_after"?, "body"?, "hang_s"?}."""
        spec = dict(_request_json() or {})
        try:
            self.inject_fault(spec.pop("route", ""), spec.pop("kind", ""), int(spec.pop("count", 1)), **spec)
        except (TypeError, ValueError) as exc:
            return _json_response(400, {"error": "not_valid_params", "message": str(exc)})
        return _json_response(200, {"status": "queued"})

    def _control(self, action, exchange_id: str, argument) -> Response:
        """Run a control action and answer its record, 404 unknown id, 409 impossible transition."""
        try:
            return _json_response(200, action(exchange_id, argument))
        except KeyError:
            return _json_response(404, {"error": "not_found", "message": "Exchange not found"})
        except ValueError as exc:
            return _json_response(409, {"error": "conflict", "message": str(exc)})


_CREATE_ANSWER_KEYS = (
    "id",
    "payinAddress",
    "payoutAddress",
    "payinExtraId",
    "payoutExtraId",
    "fromCurrency",
    "fromNetwork",
    "toCurrency",
    "toNetwork",
    "refundAddress",
    "refundExtraId",
)


def _next_status(status: str) -> str:
    """The status after `status` in the normal progression."""
    if status == "new":
        return "waiting"
    if status not in STATUS_PROGRESSION[:-1]:
        raise ValueError(f"exchange is {status}; nothing follows")
    return STATUS_PROGRESSION[STATUS_PROGRESSION.index(status) + 1]


def _parse_amount(value: Any, name: str) -> Decimal:
    """A request amount as Decimal, refusing absent, non-numeric and non-finite values."""
    if value is None or value == "" or isinstance(value, bool):
        raise ApiError(400, "not_valid_params", f"{name} is required")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ApiError(400, "not_valid_params", f"{name} is not a number") from None
    if not amount.is_finite():
        raise ApiError(400, "not_valid_params", f"{name} is not a number")
    return amount


def _address_ok(network: str, address: str) -> bool:
    """Whether `address` looks valid on `network` (any non-empty text on networks we do not know)."""
    pattern = ADDRESS_PATTERNS.get(network)
    return bool(address) and (pattern is None or re.fullmatch(pattern, address) is not None)


def _payin_address(network: str) -> str:
    """A fresh deposit address: 0x + 40 hex on EVM networks."""
    if network in _EVM_NETWORKS:
        return "0x" + secrets.token_hex(20)
    return f"standin-{network}-{secrets.token_hex(16)}"


def _now_text() -> str:
    """Current UTC time in ChangeNOW's ISO form with milliseconds and Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request_json() -> Any:
    """The request body parsed with exact Decimal numbers, or None when absent or invalid."""
    raw = request.get_data(cache=True)
    if not raw:
        return None
    try:
        return json.loads(raw, parse_float=Decimal)
    except ValueError:
        return None


def _error_body(exc: ApiError) -> dict[str, str]:
    """ChangeNOW's error body."""
    return {"error": exc.error, "message": exc.message}


def _json_text(value: Any) -> str:
    """JSON text where Decimal becomes a plain JSON number, digit for digit (json.dumps cannot)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(key))}: {_json_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json_text(item) for item in value) + "]"
    return json.dumps(value)


def _json_response(status: int, body: Any) -> Response:
    """A JSON response with exact Decimal numbers."""
    return Response(_json_text(body), status, mimetype="application/json")


def main(argv: list[str] | None = None) -> int:
    """Serve the stand-in on a fixed port for the local dev stack."""
    parser = argparse.ArgumentParser(description="ChangeNOW API v2 stand-in (local development only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--api-key", default=os.environ.get("CHANGENOW_API_KEY", DEFAULT_API_KEY))
    args = parser.parse_args(argv)
    standin = ChangeNowStandIn(api_key=args.api_key, host=args.host, port=args.port)
    return standin.serve_until_interrupted("ChangeNOW stand-in")


if __name__ == "__main__":
    raise SystemExit(main())
