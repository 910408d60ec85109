"""Operator alerts: a structured ERROR/CRITICAL log record, and a Slack message when configured.

Legacy GCHostPay3 read ALERTING_ENABLED with ``config.get(...).lower()``, which failed when the
variable was unset and left alerting silently off (spec §11 item 26). Here:

* every alert is one structured log record at ERROR or CRITICAL with an ``event_type``, the ids
  it concerns and ``alert: true`` (what a Cloud Logging alert policy matches on). It is written
  whatever the configuration says: it is the record an operator searches;
* ALERTING_ENABLED (default true; a service declares it as ``{"type": "bool", "default": "true"}``)
  switches the outbound notification only: when SLACK_ALERT_WEBHOOK is set, the alert is POSTed
  to that Slack incoming webhook (timeout 10 s). A failed POST is logged and never raised, so an
  alert can never turn a handled failure into a new one;
* secrets never leave the process: every secret of the service's configuration is redacted from
  the Slack text (the log formatter of telepay_shared.web redacts the log record), and a field
  whose value is a config ``Secret`` prints as '***'.

    alerter = Alerter.from_config("gchostpay3", config)
    alerter.alert("eth_payment_failed_permanently", "transfer reverted", unique_id=..., tx_hash=...)
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import requests

log = logging.getLogger(__name__)

SLACK_TIMEOUT_S = 10.0
SEVERITIES = {"ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
_LOG_RECORD_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class Alerter:
    """Raises operator alerts for one service (module docstring)."""

    def __init__(self, service: str, *, enabled: bool = True, slack_webhook: str | None = None,
                 secrets: Iterable[Any] = (), session: requests.Session | None = None,
                 timeout_s: float = SLACK_TIMEOUT_S):
        self.service = service
        self.enabled = enabled
        self._slack_webhook = slack_webhook or None
        self._secrets = sorted({_reveal(s) for s in secrets if _reveal(s)}, key=len, reverse=True)
        self._session = session or requests.Session()
        self._timeout_s = timeout_s

    @classmethod
    def from_config(cls, service: str, config, **options) -> Alerter:
        """Reads ALERTING_ENABLED (default true) and SLACK_ALERT_WEBHOOK (optional; a secret or a plain value)."""
        enabled = config.get("ALERTING_ENABLED", True)
        webhook = config.get("SLACK_ALERT_WEBHOOK")
        return cls(service, enabled=enabled is not False, slack_webhook=_reveal(webhook) if webhook else None,
                   secrets=config.secrets(), **options)

    @property
    def notifies(self) -> bool:
        """Whether alerts are also sent to Slack."""
        return self.enabled and self._slack_webhook is not None

    def alert(self, event_type: str, message: str, *, severity: str = "ERROR", notify: bool = True,
              **fields: Any) -> bool:
        """Log the alert; unless notify is False, also send it to Slack. Returns whether Slack accepted it."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        context = {_log_key(k): v for k, v in fields.items()}
        log.log(SEVERITIES[severity], "ALERT %s: %s", event_type, message,
                extra={"event_type": event_type, "alert": True, "alert_service": self.service, **context})
        if not (notify and self.notifies):
            return False
        return self._post_to_slack(event_type, message, severity, fields)

    def _post_to_slack(self, event_type: str, message: str, severity: str, fields: Mapping[str, Any]) -> bool:
        """POST the alert to the Slack webhook; failures are logged only."""
        lines = [f"*{severity}* `{self.service}` {event_type}", message]
        lines += [f"• {name}: `{_text(value)}`" for name, value in fields.items()]
        body = {"text": self._redact("\n".join(lines))}
        try:
            response = self._session.post(self._slack_webhook, json=body, timeout=self._timeout_s)
            response.raise_for_status()
        except requests.RequestException as exc:
            log.warning("alert %s not delivered to Slack: %s", event_type,
                        self._redact(f"{type(exc).__name__}: {exc}")[:300])
            return False
        return True

    def _redact(self, text: str) -> str:
        """Replace every configured secret (the webhook URL included) by '***'."""
        for secret in self._secrets + ([self._slack_webhook] if self._slack_webhook else []):
            text = text.replace(secret, "***")
        return text


def _reveal(value: Any) -> str:
    """The text of a config Secret or plain value."""
    return value.reveal() if hasattr(value, "reveal") else str(value)


def _text(value: Any) -> str:
    """A field value as Slack text (JSON for structures; a Secret prints '***')."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _log_key(name: str) -> str:
    """A field name that cannot collide with a LogRecord attribute (logging refuses those)."""
    return f"alert_{name}" if name in _LOG_RECORD_RESERVED else name
