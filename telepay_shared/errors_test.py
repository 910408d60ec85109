"""Tests of telepay_shared.errors: each class's HTTP status and code, declared in its class line."""
import pytest

from telepay_shared import errors


@pytest.mark.parametrize("error_class, status, code", [
    (errors.TelePayError, 500, "internal_error"),
    (errors.PermanentError, 400, "bad_request"),
    (errors.BadRequest, 400, "bad_request"),
    (errors.Unauthorized, 401, "unauthorized"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.NotFound, 404, "not_found"),
    (errors.Conflict, 409, "conflict"),
    (errors.PayloadTooLarge, 413, "payload_too_large"),
    (errors.TransientError, 503, "unavailable"),
    (errors.RateLimited, 429, "rate_limited"),
    (errors.TokenRejected, 401, "token_rejected"),
    (errors.ChangeNowUnavailable, 503, "changenow_unavailable"),
    (errors.ChangeNowBadResponse, 503, "changenow_bad_response"),
    (errors.ChangeNowAuthFailed, 503, "changenow_auth_failed"),
    (errors.ChangeNowRateLimited, 429, "changenow_rate_limited"),
    (errors.ChangeNowRejected, 400, "changenow_rejected"),
    (errors.ChangeNowNotFound, 404, "changenow_not_found"),
    (errors.TaskEnqueueFailed, 503, "task_enqueue_failed"),
    (errors.DatabaseUnavailable, 503, "database_unavailable"),
    (errors.DuplicateRecord, 409, "duplicate_record"),
])
def test_each_error_answers_its_status_and_code(error_class, status, code):
    assert (error_class.http_status, error_class.code) == (status, code)
    raised = error_class("reason") if error_class is not errors.TokenRejected else error_class("expired")
    assert (raised.http_status, raised.code) == (status, code)


def test_permanent_errors_are_4xx_and_transient_ones_5xx_or_429():
    for error_class in vars(errors).values():
        if isinstance(error_class, type) and issubclass(error_class, errors.PermanentError):
            assert 400 <= error_class.http_status < 500 and error_class.http_status != 429
        elif isinstance(error_class, type) and issubclass(error_class, errors.TransientError):
            assert error_class.http_status >= 500 or error_class.http_status == 429


def test_a_subclass_inherits_what_its_class_line_leaves_out():
    class Gone(errors.PermanentError, status=410, code="gone"):
        """A test-only error."""

    class StillGone(Gone, code="still_gone"):
        """Keeps 410."""

    class Declared(errors.TransientError):
        """Attributes in the class body, as services may write them, still count."""

        http_status = 501
        code = "not_implemented"

    assert (Gone.http_status, Gone.code) == (410, "gone")
    assert (StillGone.http_status, StillGone.code) == (410, "still_gone")
    assert (Declared.http_status, Declared.code) == (501, "not_implemented")
    assert (errors.PermanentError.http_status, errors.PermanentError.code) == (400, "bad_request")


def test_message_defaults_to_the_code_and_details_are_kept():
    error = errors.DuplicateRecord(constraint="uq_payment", table="processed_payments")
    assert str(error) == error.message == "duplicate_record"
    assert error.constraint == "uq_payment"
    assert error.details == {"constraint": "uq_payment", "table": "processed_payments"}
    assert isinstance(error, errors.Conflict) and isinstance(error, errors.PermanentError)
