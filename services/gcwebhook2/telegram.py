"""The Telegram Bot API calls of an invite, over plain HTTPS (spec §7.4; legacy used python-telegram-bot).

Answers are mapped to the pipeline's errors: flood control (429) is RateLimited with Telegram's
retry_after; a refusal of the request itself (400, 403) is TelegramRejected; anything else (5xx,
an unknown or revoked token, a timeout, an unreadable answer) is TelegramUnavailable, transient,
so Cloud Tasks delivers the invite again. The token is part of every URL, so no message here
ever quotes a URL or a requests exception.
"""
from __future__ import annotations

import json

import requests

from telepay_shared import errors
from telepay_shared.config import Config

TELEGRAM_API_URL = "https://api.telegram.org"
TIMEOUT_S = 10


class TelegramUnavailable(errors.TransientError, code="telegram_unavailable"):
    """Telegram did not serve the call (5xx, timeout, bad token); Cloud Tasks retries."""


class TelegramRateLimited(errors.RateLimited, code="telegram_rate_limited"):
    """Telegram's flood control; retry_after_s is its parameters.retry_after."""


class TelegramRejected(errors.PermanentError, code="telegram_rejected"):
    """Telegram refused the call itself (400 Bad Request, 403 Forbidden); repeating it cannot succeed."""

    def __init__(self, method: str, error_code: int, description: str):
        super().__init__(f"{method}: {error_code} {description}", telegram_error_code=error_code)
        self.method, self.error_code, self.description = method, error_code, description


class TelegramBot:
    """One bot's Bot API client: https://api.telegram.org/bot<token>/<method> with JSON parameters."""

    def __init__(self, token: str, api_url: str = TELEGRAM_API_URL, timeout_s: float = TIMEOUT_S,
                 session: requests.Session | None = None):
        self._base = f"{api_url.rstrip('/')}/bot{token}/"
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    @classmethod
    def from_config(cls, config: Config) -> "TelegramBot":
        """The bot whose token TELEGRAM_BOT_SECRET_NAME holds, at TELEGRAM_API_URL (Telegram by default)."""
        return cls(config.TELEGRAM_BOT_SECRET_NAME.reveal(), config.get("TELEGRAM_API_URL") or TELEGRAM_API_URL)

    def create_invite_link(self, chat_id: int, expire_date: int, member_limit: int = 1) -> str:
        """A new invite link to the chat, valid until expire_date (unix time) for member_limit joins."""
        link = self.call("createChatInviteLink", chat_id=chat_id, expire_date=expire_date, member_limit=member_limit)
        if not isinstance(link, dict) or not isinstance(link.get("invite_link"), str):
            raise TelegramUnavailable("createChatInviteLink answered no invite_link")
        return link["invite_link"]

    def send_message(self, chat_id: int, text: str) -> int:
        """Send a text message without link preview; returns its message_id."""
        message = self.call("sendMessage", chat_id=chat_id, text=text, link_preview_options={"is_disabled": True})
        return message.get("message_id") if isinstance(message, dict) else None

    def call(self, method: str, **params):
        """Call one Bot API method and return its result, or raise the matching pipeline error."""
        try:
            answer = self.session.post(self._base + method, json=params, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise TelegramUnavailable(f"{method}: Telegram unreachable ({type(exc).__name__})") from None
        try:
            body = json.loads(answer.content)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "ok" not in body:
            raise TelegramUnavailable(f"{method}: unreadable answer (HTTP {answer.status_code})")
        if body["ok"] is True:
            return body.get("result")
        raise _failure(method, body, answer.status_code)


def _failure(method: str, body: dict, http_status: int) -> errors.TelePayError:
    """The pipeline error for a Bot API error object."""
    error_code = body.get("error_code") if isinstance(body.get("error_code"), int) else http_status
    description = str(body.get("description") or "")[:300]
    if error_code == 429:
        retry_after = (body.get("parameters") or {}).get("retry_after")
        return TelegramRateLimited(f"{method}: {description}",
                                   retry_after_s=retry_after if isinstance(retry_after, (int, float)) else None)
    if error_code in (400, 403):
        return TelegramRejected(method, error_code, description)
    return TelegramUnavailable(f"{method}: {error_code} {description}")
