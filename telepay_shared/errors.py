"""Typed errors of the payment pipeline and the HTTP status each maps to.

Cloud Tasks retries every non-2xx answer until the queue's retry configuration gives up, so a
permanent problem (bad input, bad token, a rejected exchange) answers 4xx before anything is
written, which makes its retries harmless and leaves it in the failed tasks; a transient one
(database down, ChangeNOW unavailable) answers 5xx or 429 and its retry succeeds. The web layer maps
these classes to responses in exactly one place (telepay_shared.web).
"""
from __future__ import annotations


class TelePayError(Exception):
    """Base of every error the pipeline raises on purpose.

    A subclass declares its answer in its class line, `class Gone(PermanentError, status=410,
    code="gone")`; what it leaves out it inherits.
    """

    http_status = 500
    code = "internal_error"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.http_status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str = "", **details):
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details


class PermanentError(TelePayError, status=400, code="bad_request"):
    """Retrying the same request cannot succeed: answer 4xx, having changed nothing."""


class BadRequest(PermanentError, status=400, code="bad_request"):
    """The request is malformed or fails validation."""


class Unauthorized(PermanentError, status=401, code="unauthorized"):
    """The caller did not prove who it is."""


class Forbidden(PermanentError, status=403, code="forbidden"):
    """The caller is known but may not do this."""


class NotFound(PermanentError, status=404, code="not_found"):
    """What the request names does not exist."""


class Conflict(PermanentError, status=409, code="conflict"):
    """The request contradicts what is already recorded."""


class PayloadTooLarge(PermanentError, status=413, code="payload_too_large"):
    """The request body is larger than the endpoint accepts."""


class TransientError(TelePayError, status=503, code="unavailable"):
    """Retrying later may succeed: answer 5xx so Cloud Tasks redelivers."""


class RateLimited(TransientError, status=429, code="rate_limited"):
    """Too many requests; `retry_after_s`, when known, says how long to wait."""

    def __init__(self, message: str = "", retry_after_s: float | None = None, **details):
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class TokenRejected(Unauthorized, code="token_rejected"):
    """An inter-service token failed verification. `reason` is one of REASONS."""

    REASONS = ("bad_signature", "expired", "future", "malformed", "wrong_length", "unknown_hop")

    def __init__(self, reason: str, message: str = "", **details):
        if reason not in self.REASONS:
            raise ValueError(f"unknown TokenRejected reason {reason!r}")
        super().__init__(message or reason, **details)
        self.reason = reason


class ConfigError(Exception):
    """The service's declared configuration is missing or malformed; raised at start-up only."""


class ChangeNowUnavailable(TransientError, code="changenow_unavailable"):
    """ChangeNOW did not answer usefully (5xx, timeout, connection error): Cloud Tasks retries later."""


class ChangeNowBadResponse(ChangeNowUnavailable, code="changenow_bad_response"):
    """ChangeNOW answered 2xx with a body we cannot use (not JSON, or no id/payinAddress/status)."""


class ChangeNowAuthFailed(TransientError, code="changenow_auth_failed"):
    """ChangeNOW refused our API key (401/403); transient on purpose so tasks survive until the secret is fixed."""


class ChangeNowRateLimited(RateLimited, code="changenow_rate_limited"):
    """ChangeNOW kept answering 429 within our wait budget; `retry_after_s` is its last Retry-After."""


class ChangeNowRejected(PermanentError, code="changenow_rejected"):
    """ChangeNOW refused the request itself (bad params, inactive pair, amount out of range)."""

    def __init__(self, message: str = "", changenow_error: str = "", changenow_message: str = "", **details):
        super().__init__(message, **details)
        self.changenow_error = changenow_error
        self.changenow_message = changenow_message


class ChangeNowNotFound(NotFound, code="changenow_not_found"):
    """ChangeNOW does not know the exchange id."""


class TaskEnqueueFailed(TransientError, code="task_enqueue_failed"):
    """Cloud Tasks did not accept a task for a reason that may pass (unavailable, quota, timeout)."""


class DatabaseUnavailable(TransientError, code="database_unavailable"):
    """The database cannot be reached or no pooled connection came free in time; retry later."""


class DuplicateRecord(Conflict, code="duplicate_record"):
    """A write hit a unique constraint; `constraint` names it so callers can tell which key repeated."""

    def __init__(self, message: str = "", constraint: str | None = None, **details):
        super().__init__(message, constraint=constraint, **details)
        self.constraint = constraint
