"""ChangeNOW API v2 client: estimate, create exchange, exchange status, with bounded retries.

Every call runs inside an HTTP request that Cloud Tasks delivered, so the retry loop is short:
at most `max_attempts` tries and at most `max_total_wait_s` seconds of sleeping per call (worst
case wall time is max_attempts * timeout_s + max_total_wait_s). Beyond that the call raises a
TransientError and Cloud Tasks redelivers later (legacy defect 24 slept 60 s forever instead).

Error classes (telepay_shared.errors):
* ChangeNowUnavailable: 5xx, 408, timeouts, connection errors, a body that is not a JSON object
  (all retried in-call first).
* ChangeNowBadResponse (a ChangeNowUnavailable): a JSON 2xx body missing what we need (id,
  payinAddress, toAmount, status). Not retried in-call: retrying a create would only mint more
  exchanges; Cloud Tasks redelivery is the retry.
* ChangeNowRateLimited: 429 when attempts or the wait budget ran out, or when Retry-After is
  longer than the budget left; carries retry_after_s.
* ChangeNowAuthFailed: 401/403. Retrying the same request cannot heal it, but the fault is our
  configuration, not the payout: a 4xx would make Cloud Tasks drop every payout while the key is
  wrong, so it is a TransientError (5xx, tasks kept until an operator fixes the secret) and is
  not retried in-call.
* ChangeNowRejected: any other 4xx (not_valid_params, pair_is_inactive, deposit_too_small,
  out_of_range, ...), with ChangeNOW's error code and message; permanent.
* ChangeNowNotFound: 404 from /exchange/by-id (unknown exchange id).

A retried POST /exchange after a timeout may leave an orphan exchange at ChangeNOW; that costs
nothing because money moves only when the host wallet pays the payin address we got back.
The API key travels only in the request header; it is never logged and is scrubbed from any
text ChangeNOW echoes into our exceptions.
"""
from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

import requests

from telepay_shared import errors

DEFAULT_BASE_URL = "https://api.changenow.io/v2"
API_KEY_HEADER = "x-changenow-api-key"
FLOW_STANDARD = "standard"
TYPE_DIRECT = "direct"
IN_PROGRESS_STATUSES = frozenset({"new", "waiting", "confirming", "exchanging", "sending", "verifying"})
FINISHED_STATUS = "finished"

_CONNECT_TIMEOUT_S = 3.05
_MAX_SERVER_TEXT = 200
_REQUIRED = object()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """ChangeNOW's quote for swapping from_amount; to_amount is already net of both fees."""

    from_currency: str
    from_network: str
    to_currency: str
    to_network: str
    from_amount: Decimal
    to_amount: Decimal
    deposit_fee: Decimal
    withdrawal_fee: Decimal
    flow: str
    exchange_type: str
    rate_id: str | None
    valid_until: str | None
    warning_message: str | None


@dataclass(frozen=True)
class Exchange:
    """A created exchange: pay `from_amount` to `payin_address` (falls back to the amount asked if omitted)."""

    exchange_id: str
    payin_address: str
    payin_extra_id: str
    payout_address: str
    payout_extra_id: str
    refund_address: str
    refund_extra_id: str
    from_amount: Decimal
    to_amount: Decimal
    from_currency: str
    from_network: str
    to_currency: str
    to_network: str
    flow: str
    exchange_type: str
    rate_id: str | None


@dataclass(frozen=True)
class ExchangeStatus:
    """State of an exchange; amount_from/amount_to are 0 until ChangeNOW knows them."""

    exchange_id: str
    status: str
    from_currency: str
    from_network: str
    to_currency: str
    to_network: str
    expected_amount_from: Decimal | None
    expected_amount_to: Decimal | None
    amount_from: Decimal
    amount_to: Decimal
    payin_address: str
    payout_address: str
    refund_address: str
    payin_hash: str | None
    payout_hash: str | None
    created_at: str | None
    updated_at: str | None
    deposit_received_at: str | None

    @property
    def in_progress(self) -> bool:
        """True while ChangeNOW may still move the exchange towards finished."""
        return self.status in IN_PROGRESS_STATUSES

    @property
    def finished(self) -> bool:
        """True once ChangeNOW reports the payout sent."""
        return self.status == FINISHED_STATUS


class ChangeNowClient:
    """Calls ChangeNOW API v2 with one short, bounded retry loop per call."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        session: requests.Session | None = None,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
        max_total_wait_s: float = 4.0,
        sleep: Callable[[float], None] = time.sleep,
        backoff_base_s: float = 0.5,
    ):
        if not api_key or not api_key.strip():
            raise errors.ConfigError("CHANGENOW_API_KEY is empty")
        if max_attempts < 1 or timeout_s <= 0 or max_total_wait_s < 0:
            raise errors.ConfigError("ChangeNOW client limits must be positive")
        self._api_key = api_key.strip()
        self._base_url = base_url.rstrip("/")
        self._session = session or requests.Session()
        self._timeout = (min(_CONNECT_TIMEOUT_S, timeout_s), timeout_s)
        self._max_attempts = max_attempts
        self._max_total_wait_s = max_total_wait_s
        self._sleep = sleep
        self._backoff_base_s = backoff_base_s

    def __repr__(self) -> str:
        """Show the target, never the key."""
        return f"ChangeNowClient(base_url={self._base_url!r})"

    @classmethod
    def from_config(cls, config, **options) -> "ChangeNowClient":
        """Build from a service Config: secret CHANGENOW_API_KEY, optional CHANGENOW_API_URL."""
        base_url = config.get("CHANGENOW_API_URL") or DEFAULT_BASE_URL
        return cls(config.CHANGENOW_API_KEY.reveal(), base_url=base_url, **options)

    def estimate(
        self, from_currency: str, to_currency: str, from_amount: Decimal, from_network: str, to_network: str
    ) -> Estimate:
        """Ask how much to_currency a standard-flow swap of from_amount would pay out."""
        query = {
            "fromCurrency": _ticker(from_currency),
            "toCurrency": _ticker(to_currency),
            "fromAmount": decimal_text(from_amount),
            "fromNetwork": _ticker(from_network),
            "toNetwork": _ticker(to_network),
            "flow": FLOW_STANDARD,
            "type": TYPE_DIRECT,
        }
        body = self._call("GET", "/exchange/estimated-amount", params=query)
        return Estimate(
            from_currency=_text(body, "fromCurrency", query["fromCurrency"]),
            from_network=_text(body, "fromNetwork", query["fromNetwork"]),
            to_currency=_text(body, "toCurrency", query["toCurrency"]),
            to_network=_text(body, "toNetwork", query["toNetwork"]),
            from_amount=_amount(body, "fromAmount", from_amount),
            to_amount=_amount(body, "toAmount"),
            deposit_fee=_amount(body, "depositFee", Decimal(0)),
            withdrawal_fee=_amount(body, "withdrawalFee", Decimal(0)),
            flow=_text(body, "flow", FLOW_STANDARD),
            exchange_type=_text(body, "type", TYPE_DIRECT),
            rate_id=_optional_text(body, "rateId"),
            valid_until=_optional_text(body, "validUntil"),
            warning_message=_optional_text(body, "warningMessage"),
        )

    def create_exchange(
        self,
        from_currency: str,
        to_currency: str,
        from_amount: Decimal,
        address: str,
        from_network: str,
        to_network: str,
        user_id: str | int = "",
        refund_address: str = "",
        payload: str = "",
    ) -> Exchange:
        """Create a standard-flow exchange paying out to `address`; returns where to deposit."""
        request = {
            "fromCurrency": _ticker(from_currency),
            "toCurrency": _ticker(to_currency),
            "fromNetwork": _ticker(from_network),
            "toNetwork": _ticker(to_network),
            "fromAmount": decimal_text(from_amount),
            "toAmount": "",
            "address": address,
            "extraId": "",
            "refundAddress": refund_address,
            "refundExtraId": "",
            "userId": str(user_id),
            "payload": payload,
            "contactEmail": "",
            "source": "",
            "flow": FLOW_STANDARD,
            "type": TYPE_DIRECT,
            "rateId": "",
        }
        body = self._call("POST", "/exchange", json_body=request)
        return Exchange(
            exchange_id=_required_text(body, "id"),
            payin_address=_required_text(body, "payinAddress"),
            payin_extra_id=_text(body, "payinExtraId"),
            payout_address=_text(body, "payoutAddress", address),
            payout_extra_id=_text(body, "payoutExtraId"),
            refund_address=_text(body, "refundAddress"),
            refund_extra_id=_text(body, "refundExtraId"),
            from_amount=_amount(body, "fromAmount", from_amount),
            to_amount=_amount(body, "toAmount", Decimal(0)),
            from_currency=_text(body, "fromCurrency", request["fromCurrency"]),
            from_network=_text(body, "fromNetwork", request["fromNetwork"]),
            to_currency=_text(body, "toCurrency", request["toCurrency"]),
            to_network=_text(body, "toNetwork", request["toNetwork"]),
            flow=_text(body, "flow", FLOW_STANDARD),
            exchange_type=_text(body, "type", TYPE_DIRECT),
            rate_id=_optional_text(body, "rateId"),
        )

    def exchange_status(self, exchange_id: str) -> ExchangeStatus:
        """Read an exchange's status and amounts by its ChangeNOW id."""
        body = self._call("GET", "/exchange/by-id", params={"id": exchange_id}, not_found_is_final=True)
        return ExchangeStatus(
            exchange_id=_text(body, "id", exchange_id),
            status=_required_text(body, "status"),
            from_currency=_text(body, "fromCurrency"),
            from_network=_text(body, "fromNetwork"),
            to_currency=_text(body, "toCurrency"),
            to_network=_text(body, "toNetwork"),
            expected_amount_from=_amount(body, "expectedAmountFrom", None),
            expected_amount_to=_amount(body, "expectedAmountTo", None),
            amount_from=_amount(body, "amountFrom", Decimal(0)),
            amount_to=_amount(body, "amountTo", Decimal(0)),
            payin_address=_text(body, "payinAddress"),
            payout_address=_text(body, "payoutAddress"),
            refund_address=_text(body, "refundAddress"),
            payin_hash=_optional_text(body, "payinHash"),
            payout_hash=_optional_text(body, "payoutHash"),
            created_at=_optional_text(body, "createdAt"),
            updated_at=_optional_text(body, "updatedAt"),
            deposit_received_at=_optional_text(body, "depositReceivedAt"),
        )

    def _call(
        self, method: str, path: str, params=None, json_body=None, not_found_is_final: bool = False
    ) -> dict[str, Any]:
        """Send one logical request, retrying transient failures within the attempt and wait budgets."""
        slept_s = 0.0
        for attempt in range(1, self._max_attempts):
            try:
                return self._attempt(method, path, params, json_body, not_found_is_final)
            except (errors.ChangeNowRateLimited, errors.ChangeNowUnavailable) as failure:
                delay_s = self._retry_delay(failure, attempt, self._max_total_wait_s - slept_s)
                if delay_s is None:
                    raise
                log.warning(
                    "ChangeNOW %s %s failed (%s), retry %d in %.2fs", method, path, failure.code, attempt, delay_s
                )
                self._sleep(delay_s)
                slept_s += delay_s
        return self._attempt(method, path, params, json_body, not_found_is_final)

    def _retry_delay(self, failure: errors.TelePayError, attempt: int, budget_left_s: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the wait budget cannot cover it."""
        retry_after_s = getattr(failure, "retry_after_s", None)
        if retry_after_s is not None:
            return retry_after_s if retry_after_s <= budget_left_s else None
        backoff_s = self._backoff_base_s * 2 ** (attempt - 1)
        jittered_s = random.uniform(backoff_s / 2, backoff_s)
        return min(jittered_s, budget_left_s) if budget_left_s > 0 else None

    def _attempt(self, method, path, params, json_body, not_found_is_final) -> dict[str, Any]:
        """Make one HTTP exchange and turn its outcome into a JSON object or a typed error."""
        where = {"route": path, "method": method}
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                params=params,
                json=json_body,
                headers={API_KEY_HEADER: self._api_key, "Accept": "application/json"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise errors.ChangeNowUnavailable(
                f"ChangeNOW {method} {path} unreachable: {type(exc).__name__}", **where
            ) from None
        if response.ok:
            return self._json_object(response, where)
        raise self._http_error(response, where, not_found_is_final)

    def _json_object(self, response: requests.Response, where: dict) -> dict[str, Any]:
        """Decode a 2xx body, keeping every JSON number exact as Decimal."""
        try:
            body = json.loads(response.content, parse_float=Decimal)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Often a proxy's HTML or a truncated body, so it is worth another attempt.
            raise errors.ChangeNowUnavailable(
                f"ChangeNOW {where['method']} {where['route']} answered {response.status_code} without a JSON object",
                changenow_status=response.status_code,
                **where,
            )
        return body

    def _http_error(self, response: requests.Response, where: dict, not_found_is_final: bool) -> errors.TelePayError:
        """Map a non-2xx answer to the error class that encodes its retry decision."""
        status = response.status_code
        cn_error, cn_message = self._server_error_text(response)
        summary = f"ChangeNOW {where['method']} {where['route']} answered {status}: {cn_error} {cn_message}".rstrip()
        details = dict(where, changenow_status=status, changenow_error=cn_error)
        if status == 429:
            retry_after_s = retry_after_seconds(response.headers.get("Retry-After"))
            return errors.ChangeNowRateLimited(summary, retry_after_s=retry_after_s, **details)
        if status >= 500 or status == 408:
            return errors.ChangeNowUnavailable(summary, **details)
        if status in (401, 403):
            log.error("ChangeNOW refused the API key (%d); fix the CHANGENOW_API_KEY secret", status)
            return errors.ChangeNowAuthFailed(summary, **details)
        if status == 404 and not_found_is_final:
            return errors.ChangeNowNotFound(summary, **details)
        return errors.ChangeNowRejected(summary, changenow_message=cn_message, **details)

    def _server_error_text(self, response: requests.Response) -> tuple[str, str]:
        """ChangeNOW's error code and message from an error body, short and with our key scrubbed."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return f"http_{response.status_code}", ""
        code = str(body.get("error") or f"http_{response.status_code}")
        message = str(body.get("message") or "")
        return self._scrub(code), self._scrub(message)

    def _scrub(self, server_text: str) -> str:
        """Cut server text short and blank out our API key should the server echo it."""
        return server_text[:_MAX_SERVER_TEXT].replace(self._api_key, "***")


def decimal_text(amount: Decimal | int) -> str:
    """Plain decimal text for an amount (no exponent, no float artefacts); floats are refused."""
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        raise TypeError(f"ChangeNOW amounts must be Decimal, not {type(amount).__name__}")
    amount = Decimal(amount)
    if not amount.is_finite():
        raise ValueError("ChangeNOW amounts must be finite")
    return format(amount, "f")


def retry_after_seconds(header: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP-date); None if absent or invalid."""
    if not header or not header.strip():
        return None
    try:
        seconds = float(header)
    except ValueError:
        return _seconds_until_http_date(header, now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until_http_date(header: str, now: Callable[[], float]) -> float | None:
    """Seconds from now until an HTTP-date, floored at 0; None when it does not parse."""
    try:
        when = email.utils.parsedate_to_datetime(header.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


def _ticker(value: str) -> str:
    """ChangeNOW tickers and networks are lowercase."""
    return value.strip().lower()


def _bad_field(body: dict, key: str) -> errors.ChangeNowBadResponse:
    """The error for a response field that is missing or unusable."""
    return errors.ChangeNowBadResponse(f"ChangeNOW response has no usable {key!r}", field=key, keys=sorted(body)[:30])


def _amount(body: dict, key: str, default: Any = _REQUIRED) -> Any:
    """A response amount as Decimal; `default` when null or absent, unless the field is required."""
    value = body.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _bad_field(body, key)
        return default
    if isinstance(value, bool):
        raise _bad_field(body, key)
    try:
        amount = Decimal(value) if isinstance(value, (Decimal, int)) else Decimal(str(value).strip())
    except InvalidOperation:
        raise _bad_field(body, key) from None
    if not amount.is_finite():
        raise _bad_field(body, key)
    return amount


def _text(body: dict, key: str, default: str = "") -> str:
    """A response string; null or absent becomes `default` (legacy defect 29: null refundAddress)."""
    value = body.get(key)
    return default if value is None else str(value)


def _optional_text(body: dict, key: str) -> str | None:
    """A response string where absence means something (no hash yet, no rate id): None or non-empty."""
    value = body.get(key)
    return None if value is None or value == "" else str(value)


def _required_text(body: dict, key: str) -> str:
    """A response string we cannot work without."""
    value = _optional_text(body, key)
    if value is None or not value.strip():
        raise _bad_field(body, key)
    return value
