"""Flask web layer of every service: app factory, the one error mapping, request helpers,
inbound authentication, Cloud Logging JSON logs and the gunicorn entry point.

Errors (legacy §11.23 turned every intended 4xx into 500): handlers registered by
``create_app`` answer ``{"status": "error", "error": <code>, "message": ..., **details}`` with
the TelePayError's http_status, werkzeug's own status for routing/size errors, and 500
``internal_error`` (traceback logged, never echoed) for anything unexpected.

Inbound authentication, switched per service by configuration (``AuthPolicy.from_config``):

    TP_AUTH_MODE            oidc          Authorization: Bearer <Google-signed ID token>, as Cloud
                                          Tasks and Cloud Scheduler send with an OIDC service
                                          account. The default: the target of every new deployment.
                            hmac          an HMAC hex digest of the raw body in a header (legacy
                                          senders, e.g. X-Webhook-Signature on GCWebhook1 -> GCSplit1).
                            oidc_or_hmac  either passes: for a hop while its senders are migrated.
                            none          no transport check: only behind Cloud Run IAM
                                          (--no-allow-unauthenticated checks the token itself) or
                                          locally; any token inside the body is still verified.
    TP_OIDC_AUDIENCES       csv of accepted `aud` values (the URL the tasks are created with)
    TP_OIDC_ALLOWED_EMAILS  csv of service accounts allowed to call
    TP_OIDC_CERTS_URL       where the signing certificates are fetched (default Google's,
                            https://www.googleapis.com/oauth2/v1/certs): only the local stack and
                            tests point it at a local issuer (telepay_shared.testing.oidc); any other
                            value is logged as a WARNING when the policy is built. The issuer
                            (https://accounts.google.com), audience, caller and expiry checks stay.

Gunicorn on Cloud Run (``serve``): bind 0.0.0.0:$PORT, 1 worker (Cloud Run scales by instances
and one process keeps memory flat on 1 vCPU), 8 threads (handlers wait on Cloud SQL, Cloud Tasks
and ChangeNOW, so threads overlap on one CPU), timeout 0 (Cloud Run enforces the request
timeout; gunicorn's would kill slow but valid requests), graceful_timeout 8 s (Cloud Run kills
10 s after SIGTERM). The werkzeug server runs only when explicitly asked (``dev_server=True``
or TP_DEV_SERVER=1), on 127.0.0.1, for local debugging.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping

import flask
import google.auth.exceptions
import google.oauth2.id_token
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from telepay_shared import tokens
from telepay_shared.config import Config, Redactor, Secret
from telepay_shared.errors import (
    BadRequest, ConfigError, PayloadTooLarge, RateLimited, TelePayError, TokenRejected,
    TransientError, Unauthorized,
)

log = logging.getLogger(__name__)

LOG_IDS = ("unique_id", "cn_api_id", "payout_key", "batch_conversion_id", "batch_id")
AUTH_MODES = ("oidc", "hmac", "oidc_or_hmac", "none")
DEFAULT_RETRY_AFTER_S = 60  # the queues' fixed 60 s backoff (spec §5)
OIDC_CLOCK_SKEW_S = 10
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"  # what verify_oauth2_token reads
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CERTS_CACHE_TTL_S = 3600  # Google publishes signing keys well before it uses them
CLOUD_RUN_GUNICORN = {
    "worker_class": "gthread",
    "workers": 1,
    "threads": 8,
    "timeout": 0,
    "graceful_timeout": 8,
    # Cloud Run's front end is the only peer, so its X-Forwarded-* headers are trusted.
    "forwarded_allow_ips": "*",
    "control_socket_disable": True,  # gunicorn >= 25.1 only; no runtime control on Cloud Run
}
_CLOUD_TASKS_HEADERS = {
    "X-CloudTasks-TaskName": "task_name",
    "X-CloudTasks-QueueName": "queue_name",
    "X-CloudTasks-TaskRetryCount": "task_retry_count",
    "X-CloudTasks-TaskExecutionCount": "task_execution_count",
    "X-CloudTasks-TaskETA": "task_eta",
}
_TRACE_RE = re.compile(r"([0-9a-fA-F]{1,32})(?:/([0-9]{1,20}))?(?:;o=([01]))?")
_RESERVED_BODY_KEYS = ("status", "error", "message")
_HTTP_ERROR_CODES = {413: PayloadTooLarge.code, 429: RateLimited.code}


# ---------------------------------------------------------------- app factory and errors


class ServiceApp(flask.Flask):
    """A service's Flask app. `auth` is its inbound authentication policy (TP_AUTH_MODE, read when
    first used, so a service without transport-authenticated routes declares none of it)."""

    hmac_secret: bytes | str | Secret | None = None

    @functools.cached_property
    def auth(self) -> AuthPolicy:
        """The policy every `@app.auth.required` route enforces."""
        return AuthPolicy.from_config(self.extensions["telepay"]["config"], hmac_secret=self.hmac_secret)

    def token_task(self, rule: str, hop, *, clock: Callable[[], float] | None = None) -> Callable:
        """Registers `rule` as an authenticated POST whose JSON body carries one hop's token.

        The view is called as view(fields, raw_token) only after the caller (`auth`), the body and
        the token's signature and time window have all been checked, so no business rule ever
        sees an unauthenticated request; `clock` replaces the time the token window is judged at."""
        keys = self.extensions["telepay"]["config"]

        def register(view: Callable[[dict, str], Any]) -> Callable:
            @functools.wraps(view)
            def receive():
                fields, token = read_token(hop, keys, now=None if clock is None else clock())
                return view(fields, token)

            self.post(rule)(self.auth.required(receive))
            return view

        return register


def create_app(
    name: str,
    config: Config | None = None,
    *,
    health_checks: Mapping[str, Callable[[], Any]] | None = None,
    max_body_bytes: int = 64 * 1024,
    hmac_secret: bytes | str | Secret | None = None,
) -> ServiceApp:
    """Builds a service's Flask app with /health, the error mapping, request logging context and
    `app.auth` (hmac_secret: the key of the X-Webhook-Signature header, for TP_AUTH_MODE hmac)."""
    if config is not None:  # every secret the service loaded is redacted from every log line
        configure_logging(name, config.secrets())
    app = ServiceApp(name, static_folder=None)
    app.hmac_secret = hmac_secret
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.extensions["telepay"] = {"service": name, "config": config}
    app.json.sort_keys = False  # keep status, error, message first
    app.before_request(_start_request)
    app.register_error_handler(TelePayError, _telepay_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    checks = dict(health_checks or {})
    app.add_url_rule("/health", "health", lambda: _health(name, checks), methods=["GET"])
    return app


def _start_request() -> None:
    """Refuses oversized bodies up front and collects the ids every log line should carry."""
    limit = flask.current_app.config["MAX_CONTENT_LENGTH"]
    if limit is not None and (flask.request.content_length or 0) > limit:
        raise RequestEntityTooLarge(f"request body is larger than {limit} bytes")
    headers = flask.request.headers
    context = {key: headers[h] for h, key in _CLOUD_TASKS_HEADERS.items() if h in headers}
    trace = _TRACE_RE.match(headers.get("X-Cloud-Trace-Context", ""))
    if trace:
        context.update(trace_id=trace[1], span_id=trace[2], trace_sampled=trace[3] == "1")
    flask.g.telepay_log_context = context


def bind_log_context(**ids: Any) -> None:
    """Adds ids (unique_id, payment_id, ...) to every log line for the rest of this request."""
    if flask.has_request_context():
        flask.g.setdefault("telepay_log_context", {}).update(ids)


def _error_response(status: int, code: str, message: str, details=None, headers=None) -> flask.Response:
    """Builds the one JSON error shape every failure answers with."""
    # Details may hold any object; a serialization error here would escape every handler.
    extra = {k: _jsonable(v, str) for k, v in (details or {}).items() if k not in _RESERVED_BODY_KEYS}
    response = flask.jsonify({"status": "error", "error": code, "message": message, **extra})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _telepay_error(exc: TelePayError) -> flask.Response:
    """Maps a typed pipeline error to its status: 4xx cannot succeed, 5xx/429 will on a retry."""
    details = dict(exc.details)
    if isinstance(exc, TokenRejected):
        details.setdefault("reason", exc.reason)
    headers = {}
    if isinstance(exc, RateLimited):
        retry_after = DEFAULT_RETRY_AFTER_S if exc.retry_after_s is None else exc.retry_after_s
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
    level = logging.ERROR if exc.http_status >= 500 else logging.WARNING
    log.log(level, "request failed: %s: %s", exc.code, exc.message, extra={"http_status": exc.http_status})
    return _error_response(exc.http_status, exc.code, exc.message, details, headers)


def _http_error(exc: HTTPException) -> flask.Response:
    """Maps werkzeug's errors (404, 405, 413, ...) to the same JSON shape."""
    code = _HTTP_ERROR_CODES.get(exc.code) or re.sub(r"[^a-z0-9]+", "_", exc.name.lower()).strip("_")
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    log.warning("request failed: %s", code, extra={"http_status": exc.code})
    return _error_response(exc.code, code, exc.description or exc.name, headers=headers)


def _unexpected_error(exc: Exception) -> flask.Response:
    """Logs the traceback and answers a bare 500 so no internals reach the caller."""
    log.exception("unhandled error in %s %s", flask.request.method, flask.request.path)
    return _error_response(500, "internal_error", "internal error")


def _health(service: str, checks: Mapping[str, Callable[[], Any]]) -> tuple[flask.Response, int]:
    """Runs every health check: a check fails by raising or returning False."""
    results = {name: _run_check(name, check) for name, check in checks.items()}
    healthy = all(result == "ok" for result in results.values())
    body = {"status": "healthy" if healthy else "degraded", "service": service, "checks": results}
    return flask.jsonify(body), 200 if healthy else 503


def _run_check(name: str, check: Callable[[], Any]) -> str:
    """Runs one health check, logging (never answering) why it failed."""
    try:
        passed = check() is not False
    except Exception:
        log.warning("health check %s failed", name, exc_info=True)
        return "fail"
    return "ok" if passed else "fail"


# ---------------------------------------------------------------- request bodies


def json_body(request: flask.Request | None = None) -> dict:
    """Returns the JSON object body (fractions as Decimal); BadRequest says what is wrong."""
    request = request or flask.request
    if not request.is_json:
        raise BadRequest("expected Content-Type: application/json")
    try:
        body = json.loads(request.get_data(cache=True), parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(f"JSON body must be an object, not {_json_kind(body)}")
    return body


def _refuse_constant(name: str) -> None:
    """Refuses NaN and Infinity, which are not JSON and not amounts."""
    raise ValueError(name)


def _json_kind(value: Any) -> str:
    """Names a JSON value's kind for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {list: "an array", str: "a string"}.get(type(value), "a number")


def require_fields(body: Mapping[str, Any], *names: str) -> tuple:
    """Returns the named values; BadRequest lists every absent, null or blank one."""
    missing = [n for n in names if body.get(n) is None or (isinstance(body[n], str) and not body[n].strip())]
    if missing:
        raise BadRequest(f"missing required fields: {', '.join(missing)}", missing=missing)
    return tuple(body[n] for n in names)


def read_token(hop, keys: Mapping[str, Any], *, now: float | None = None, field: str = "token") -> tuple[dict, str]:
    """Decodes the JSON body's token as `hop` and binds its payout ids to the log; returns (fields, raw token)."""
    token = require_fields(json_body(), field)[0]
    fields = tokens.decode(hop, token, keys, now=now)
    bind_log_context(**{name: fields[name] for name in LOG_IDS if fields.get(name) is not None})
    return fields, token


# ---------------------------------------------------------------- inbound authentication


def _key_bytes(secret: bytes | str | Secret) -> bytes:
    """Turns a key given as bytes, text or Secret into bytes."""
    value = secret.reveal() if isinstance(secret, Secret) else secret
    return value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")


def verify_hmac_header(
    secret: bytes | str | Secret, header_name: str, algorithm: str = "sha256", *, request=None
) -> None:
    """Checks header_name holds the hex HMAC of the raw body (constant time); else Unauthorized."""
    request = request or flask.request
    key = _key_bytes(secret)
    if not key:
        raise ValueError("the HMAC key is empty; refusing to skip the check")  # legacy §11.2
    signature = request.headers.get(header_name, "").strip().lower()
    if not signature:
        raise Unauthorized(f"missing {header_name} header")
    expected = hmac.new(key, request.get_data(cache=True), algorithm).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise Unauthorized(f"{header_name} does not match the request body")


def sign_body(
    raw: bytes, secret: bytes | str | Secret, header_name: str = "X-Webhook-Signature", algorithm: str = "sha256"
) -> dict[str, str]:
    """The header verify_hmac_header accepts for raw: header_name -> hex HMAC of the exact bytes sent."""
    key = _key_bytes(secret)
    if not key:
        raise ValueError("the HMAC key is empty; refusing to sign with it")
    return {header_name: hmac.new(key, raw, algorithm).hexdigest()}


class CachedCertsTransport:
    """google-auth transport that keeps successful GETs (Google's signing certs) for ttl_s."""

    def __init__(self, inner=None, ttl_s: float = CERTS_CACHE_TTL_S, clock=time.monotonic):
        self._inner, self._ttl_s, self._clock = inner, ttl_s, clock
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, url, method="GET", body=None, headers=None, timeout=10, **kwargs):
        if method != "GET":
            return self._transport()(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self._lock:
            expires, response = self._cache.get(url, (0.0, None))
            if expires > self._clock():
                return response
        response = self._transport()(url, method="GET", headers=headers, timeout=timeout, **kwargs)
        if response.status == 200:
            with self._lock:
                self._cache[url] = (self._clock() + self._ttl_s, response)
        return response

    def _transport(self):
        """Creates the real HTTP transport on first use."""
        if self._inner is None:
            import google.auth.transport.requests

            self._inner = google.auth.transport.requests.Request()
        return self._inner


_GOOGLE_CERTS = CachedCertsTransport()


def verify_oidc_token(
    audiences: Iterable[str], allowed_emails: Iterable[str], *, request=None, certs_transport=None,
    certs_url: str = GOOGLE_CERTS_URL,
) -> dict:
    """Verifies the Bearer ID token (signature by a key of certs_url, expiry, issuer, audience, caller);
    returns its claims."""
    request = request or flask.request
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing Authorization: Bearer identity token")
    try:
        # verify_oauth2_token with the certs URL configurable: the same checks, then its issuer check.
        claims = google.oauth2.id_token.verify_token(
            token, certs_transport or _GOOGLE_CERTS, audience=list(audiences), certs_url=certs_url,
            clock_skew_in_seconds=OIDC_CLOCK_SKEW_S,
        )
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise google.auth.exceptions.GoogleAuthError(f"wrong issuer {str(claims.get('iss'))[:100]!r}")
    except google.auth.exceptions.TransportError:
        raise TransientError("Google signing certificates are unavailable") from None
    except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
        # google-auth may quote a malformed token in its message; never log it.
        log.warning("identity token rejected: %s", str(exc).replace(token, "<token>")[:300])
        raise Unauthorized("identity token rejected") from None
    if claims.get("email_verified") is not True or claims.get("email") not in set(allowed_emails):
        log.warning("identity token from a caller not allowed: %s", claims.get("email"))
        raise Unauthorized("caller is not allowed")
    return claims


@dataclass(frozen=True)
class AuthPolicy:
    """How a service authenticates inbound requests; see TP_AUTH_MODE in the module docstring."""

    mode: str = "oidc"
    audiences: tuple[str, ...] = ()
    allowed_emails: tuple[str, ...] = ()
    hmac_secret: bytes | str | Secret | None = field(default=None, repr=False)
    hmac_header: str = "X-Webhook-Signature"
    hmac_algorithm: str = "sha256"
    certs_transport: Callable | None = field(default=None, repr=False, compare=False)
    certs_url: str = GOOGLE_CERTS_URL

    def __post_init__(self):
        uses_oidc, uses_hmac = "oidc" in self.mode, "hmac" in self.mode
        problems = [
            (self.mode in AUTH_MODES, f"TP_AUTH_MODE must be one of {', '.join(AUTH_MODES)}"),
            (not uses_oidc or bool(self.audiences), "oidc needs TP_OIDC_AUDIENCES"),
            (not uses_oidc or bool(self.allowed_emails), "oidc needs TP_OIDC_ALLOWED_EMAILS"),
            (not uses_hmac or bool(_key_bytes(self.hmac_secret)), "hmac needs a signing key"),
            (self.hmac_algorithm in hashlib.algorithms_guaranteed, "unknown HMAC algorithm"),
        ]
        failed = [message for ok, message in problems if not ok]
        if failed:
            raise ConfigError("inbound authentication is misconfigured: " + "; ".join(failed))
        if uses_oidc and self.certs_url != GOOGLE_CERTS_URL:
            log.warning("identity tokens are verified with the certificates of %s, not Google's: "
                        "for the local stack and tests only", self.certs_url)

    @classmethod
    def from_config(cls, config: Config, *, hmac_secret=None, **options) -> AuthPolicy:
        """Reads TP_AUTH_MODE (default oidc), TP_OIDC_AUDIENCES, TP_OIDC_ALLOWED_EMAILS and TP_OIDC_CERTS_URL."""
        return cls(
            mode=config.get("TP_AUTH_MODE", "oidc"),
            audiences=tuple(config.get("TP_OIDC_AUDIENCES", ())),
            allowed_emails=tuple(config.get("TP_OIDC_ALLOWED_EMAILS", ())),
            certs_url=config.get("TP_OIDC_CERTS_URL") or GOOGLE_CERTS_URL,
            hmac_secret=hmac_secret,
            **options,
        )

    def required(self, view: Callable) -> Callable:
        """Decorates a view so it runs only for an authenticated request."""

        @functools.wraps(view)
        def authenticated_view(*args, **kwargs):
            authenticate(flask.request, self)
            return view(*args, **kwargs)

        return authenticated_view


def _oidc_caller(request, policy: AuthPolicy) -> dict:
    """Authenticates by Google ID token."""
    claims = verify_oidc_token(
        policy.audiences, policy.allowed_emails, request=request, certs_transport=policy.certs_transport,
        certs_url=policy.certs_url,
    )
    return {"auth": "oidc", "caller": claims["email"]}


def _hmac_caller(request, policy: AuthPolicy) -> dict:
    """Authenticates by HMAC header."""
    verify_hmac_header(policy.hmac_secret, policy.hmac_header, policy.hmac_algorithm, request=request)
    return {"auth": "hmac"}


_AUTH_METHODS = {"oidc": (_oidc_caller,), "hmac": (_hmac_caller,), "oidc_or_hmac": (_oidc_caller, _hmac_caller)}


def authenticate(request, policy: AuthPolicy) -> dict:
    """Returns who called ({"auth": ..., "caller": ...}) or raises Unauthorized with every reason."""
    reasons = []
    for method in _AUTH_METHODS.get(policy.mode, ()):
        try:
            caller = method(request, policy)
            break
        except Unauthorized as exc:
            reasons.append(exc.message)
    else:
        if reasons:
            raise Unauthorized("; ".join(reasons))
        caller = {"auth": "none"}
    bind_log_context(**caller)
    return caller


# ---------------------------------------------------------------- structured logging

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SEVERITIES = ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO"), (10, "DEBUG"))


def _jsonable(value: Any, redact: Callable[[str], str]) -> Any:
    """Converts a log value to JSON types, redacting secrets inside every string."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, redact) for v in value]
    return redact(str(value))


class CloudLoggingFormatter(logging.Formatter):
    """Formats a record as one Cloud Logging JSON line, with request ids and secrets redacted."""

    def __init__(self, service: str, redact: Callable[[str], str], project_id: str | None = None):
        super().__init__()
        self.service, self.redact, self.project_id = service, redact, project_id

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "severity": next((name for level, name in _SEVERITIES if record.levelno >= level), "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "service": self.service,
            "logger": record.name,
            "logging.googleapis.com/sourceLocation": {
                "file": record.pathname, "line": record.lineno, "function": record.funcName,
            },
        }
        if record.exc_info:
            payload["stack_trace"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = record.stack_info
        for key, value in {**self._context_fields(), **vars(record)}.items():
            if key not in _RECORD_FIELDS:
                payload.setdefault(key, value)
        return json.dumps(_jsonable(payload, self.redact))

    def _context_fields(self) -> dict:
        """Returns the current request's log ids, its trace in Cloud Logging's own fields."""
        context = dict(flask.g.get("telepay_log_context", {})) if flask.has_request_context() else {}
        trace, span = context.pop("trace_id", None), context.pop("span_id", None)
        sampled = context.pop("trace_sampled", False)
        if trace:
            project = self.project_id
            context["logging.googleapis.com/trace"] = f"projects/{project}/traces/{trace}" if project else trace
            context["logging.googleapis.com/trace_sampled"] = sampled
        if trace and span:
            context["logging.googleapis.com/spanId"] = span
        return context


def configure_logging(
    service_name: str,
    secrets_to_redact: Iterable[Secret | str] = (),
    *,
    project_id: str | None = None,
    level: int | str = logging.INFO,
    stream=None,
) -> logging.Handler:
    """Sends every log record to stdout as Cloud Logging JSON; replaces a previous call's handler."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "telepay_json", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.telepay_json = True
    project_id = project_id or os.environ.get("GOOGLE_CLOUD_PROJECT")
    handler.setFormatter(CloudLoggingFormatter(service_name, Redactor(secrets_to_redact), project_id))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# ---------------------------------------------------------------- serving


def _port(environ: Mapping[str, str]) -> int:
    """Reads $PORT (default 8080), as Cloud Run sets it."""
    text = environ.get("PORT", "").strip() or "8080"
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError("PORT: malformed (expected an integer between 1 and 65535)")
    return int(text)


def gunicorn_options(environ: Mapping[str, str] = os.environ, **overrides) -> dict:
    """Returns the Cloud Run gunicorn settings (module docstring) bound to $TP_BIND_HOST:$PORT.

    Cloud Run needs 0.0.0.0 (the default); the local stack binds 127.0.0.1 so nothing it runs is
    reachable from outside the machine."""
    host = environ.get("TP_BIND_HOST", "").strip() or "0.0.0.0"
    return {**CLOUD_RUN_GUNICORN, "bind": f"{host}:{_port(environ)}", **overrides}


def serve(
    app_factory: Callable[[], flask.Flask],
    *,
    service_name: str | None = None,
    dev_server: bool | None = None,
    environ: Mapping[str, str] = os.environ,
    **overrides,
) -> None:
    """Runs app_factory's app under gunicorn (werkzeug only when dev_server or TP_DEV_SERVER=1)."""
    if service_name:
        configure_logging(service_name)  # gunicorn's own messages; the factory may reconfigure
    if dev_server is None:
        dev_server = environ.get("TP_DEV_SERVER", "").strip().lower() in ("1", "true")
    if dev_server:
        app_factory().run(host="127.0.0.1", port=_port(environ), debug=False, use_reloader=False)
        return
    _gunicorn_application(app_factory, gunicorn_options(environ, **overrides)).run()


def _gunicorn_application(app_factory: Callable[[], flask.Flask], options: dict):
    """Builds a gunicorn application that loads app_factory() in each worker."""
    from gunicorn import glogging
    from gunicorn.app.base import BaseApplication

    class JsonLogger(glogging.Logger):
        """Hands gunicorn's records to the root JSON handler instead of its text handlers."""

        def setup(self, cfg):
            super().setup(cfg)
            for gunicorn_log in (self.error_log, self.access_log):
                for handler in list(gunicorn_log.handlers):
                    gunicorn_log.removeHandler(handler)
                gunicorn_log.propagate = True

    class FactoryApplication(BaseApplication):
        """Gunicorn application whose workers call the service's app factory."""

        def load_config(self):
            for key, value in {**options, "logger_class": JsonLogger}.items():
                if key in self.cfg.settings or key != "control_socket_disable":
                    self.cfg.set(key, value)

        def load(self):
            return app_factory()

    return FactoryApplication()
