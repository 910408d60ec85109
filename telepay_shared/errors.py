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
