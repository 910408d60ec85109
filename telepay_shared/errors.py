"""Typed errors of the payment pipeline and the HTTP status each maps to.

Cloud Tasks retries every non-2xx answer, so the status is a retry decision: a permanent
problem (bad input, bad token, a rejected exchange) answers 4xx and is dropped, a transient one
(database down, ChangeNOW unavailable) answers 5xx or 429 and is retried. The web layer maps
these classes to responses in exactly one place (telepay_shared.web).
"""
from __future__ import annotations


class TelePayError(Exception):
    """Base of every error the pipeline raises on purpose."""

    http_status = 500
    code = "internal_error"

    def __init__(self, message: str = "", **details):
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details


class PermanentError(TelePayError):
    """Retrying the same request cannot succeed: answer 4xx so Cloud Tasks drops it."""

    http_status = 400
    code = "bad_request"


class BadRequest(PermanentError):
    http_status = 400
    code = "bad_request"


class Unauthorized(PermanentError):
    http_status = 401
    code = "unauthorized"


class Forbidden(PermanentError):
    http_status = 403
    code = "forbidden"


class NotFound(PermanentError):
    http_status = 404
    code = "not_found"


class Conflict(PermanentError):
    http_status = 409
    code = "conflict"


class PayloadTooLarge(PermanentError):
    http_status = 413
    code = "payload_too_large"


class TransientError(TelePayError):
    """Retrying later may succeed: answer 5xx so Cloud Tasks redelivers."""

    http_status = 503
    code = "unavailable"


class RateLimited(TransientError):
    http_status = 429
    code = "rate_limited"

    def __init__(self, message: str = "", retry_after_s: float | None = None, **details):
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class TokenRejected(Unauthorized):
    """An inter-service token failed verification. `reason` is one of REASONS."""

    code = "token_rejected"
    REASONS = ("bad_signature", "expired", "future", "malformed", "wrong_length", "unknown_hop")

    def __init__(self, reason: str, message: str = "", **details):
        if reason not in self.REASONS:
            raise ValueError(f"unknown TokenRejected reason {reason!r}")
        super().__init__(message or reason, **details)
        self.reason = reason


class ConfigError(Exception):
    """The service's declared configuration is missing or malformed; raised at start-up only."""


class ChangeNowUnavailable(TransientError):
    """ChangeNOW did not answer usefully (5xx, timeout, connection error): Cloud Tasks retries later."""

    code = "changenow_unavailable"


class ChangeNowBadResponse(ChangeNowUnavailable):
    """ChangeNOW answered 2xx with a body we cannot use (not JSON, or no id/payinAddress/status)."""

    code = "changenow_bad_response"


class ChangeNowAuthFailed(TransientError):
    """ChangeNOW refused our API key (401/403); transient on purpose so tasks survive until the secret is fixed."""

    code = "changenow_auth_failed"


class ChangeNowRateLimited(RateLimited):
    """ChangeNOW kept answering 429 within our wait budget; `retry_after_s` is its last Retry-After."""

    code = "changenow_rate_limited"


class ChangeNowRejected(PermanentError):
    """ChangeNOW refused the request itself (bad params, inactive pair, amount out of range)."""

    code = "changenow_rejected"

    def __init__(self, message: str = "", changenow_error: str = "", changenow_message: str = "", **details):
        super().__init__(message, **details)
        self.changenow_error = changenow_error
        self.changenow_message = changenow_message


class ChangeNowNotFound(NotFound):
    """ChangeNOW does not know the exchange id."""

    code = "changenow_not_found"


class TaskEnqueueFailed(TransientError):
    """Cloud Tasks did not accept a task for a reason that may pass (unavailable, quota, timeout)."""

    code = "task_enqueue_failed"


class DatabaseUnavailable(TransientError):
    """The database cannot be reached or no pooled connection came free in time; retry later."""

    code = "database_unavailable"


class DuplicateRecord(Conflict):
    """A write hit a unique constraint; `constraint` names it so callers can tell which key repeated."""

    code = "duplicate_record"

    def __init__(self, message: str = "", constraint: str | None = None, **details):
        super().__init__(message, constraint=constraint, **details)
        self.constraint = constraint
