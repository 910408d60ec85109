"""A local stand-in for the Telegram Bot API, for tests and the dev stack only.

It follows the public contract (https://core.telegram.org/bots/api): requests go to
`<base>/bot<token>/<method>` by GET or POST with parameters in the query string, a JSON body or a
form; every answer is JSON, `{"ok": true, "result": ...}` or `{"ok": false, "error_code": N,
"description": "..."}`, with the HTTP status equal to error_code; flood control answers 429 with
`"parameters": {"retry_after": seconds}`. Served methods: getMe, createChatInviteLink,
revokeChatInviteLink and sendMessage, with the checks Telegram makes on the parameters the
pipeline uses. Unknown tokens answer 401 Unauthorized, unknown methods 404 Not Found.

Chats: negative ids are channels in which the bot is an administrator, positive ids users who
have started the bot, unless a test says otherwise with set_chat() (chat not found, no admin
rights, bot blocked by the user). Fault injection (inject_fault) makes the next N calls of a
method answer 429, 5xx, hang, or any given reply; a dev stack uses the /_standin/ routes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request

from telepay_shared.standins.server import StandInServer

DEFAULT_TOKEN = "123456789:standin-telegram-bot-token"
METHODS = ("getMe", "createChatInviteLink", "revokeChatInviteLink", "sendMessage")
FAULT_KINDS = ("rate_limit", "server_error", "hang", "reply")
MAX_MESSAGE_CHARS = 4096
MAX_MEMBER_LIMIT = 99999


@dataclass(eq=False)
class BotApiError(Exception):
    """A Bot API error answer: error_code (also the HTTP status) and description."""

    error_code: int
    description: str
    parameters: dict | None = None

    def __str__(self) -> str:
        return f"{self.error_code} {self.description}"


@dataclass
class Chat:
    """What the stand-in knows about a chat: whether it exists and how the bot stands in it."""

    chat_id: int
    exists: bool = True
    bot_is_admin: bool = True
    blocked_bot: bool = False


@dataclass
class Fault:
    """One scripted answer: a status and body, or a hang before answering normally."""

    status: int = 200
    body: dict = field(default_factory=dict)
    hang_s: float = 0.0


class TelegramStandIn(StandInServer):
    """Telegram Bot API stand-in served by waitress on 127.0.0.1 (ephemeral port by default)."""

    def __init__(self, tokens: tuple[str, ...] = (DEFAULT_TOKEN,), host: str = "127.0.0.1", port: int = 0,
                 hang_s: float = 5.0):
        malformed = [t for t in tokens if not re.fullmatch(r"[0-9]+:[A-Za-z0-9_-]+", t)]
        if malformed:
            raise ValueError("a bot token looks like <bot id>:<secret>")
        super().__init__(host, port, hang_s)
        self.tokens = frozenset(tokens)
        self.requests_seen: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.invite_links: dict[str, dict[str, Any]] = {}
        self._chats: dict[int, Chat] = {}
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._message_ids = defaultdict(int)
        self.app = self._create_app()

    # ---- controls for tests and the dev stack ----------------------------------------------

    def set_chat(self, chat_id: int, *, exists: bool = True, bot_is_admin: bool = True,
                 blocked_bot: bool = False) -> None:
        """Say how a chat behaves: missing, a channel without admin rights, a user who blocked the bot."""
        with self._lock:
            self._chats[int(chat_id)] = Chat(int(chat_id), exists, bot_is_admin, blocked_bot)

    def inject_fault(self, method: str, kind: str, count: int = 1, *, retry_after: int = 1,
                     status: int | None = None, body: dict | None = None, hang_s: float | None = None) -> None:
        """Make the next `count` calls of `method` (one of METHODS) misbehave as `kind` (FAULT_KINDS)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        fault = self._make_fault(kind, retry_after, status, body, hang_s)
        with self._lock:
            self._faults[method].extend(fault for _ in range(count))

    def _make_fault(self, kind, retry_after, status, body, hang_s) -> Fault:
        """Build the scripted answer for one fault kind."""
        if kind == "rate_limit":
            return Fault(429, _error_body(BotApiError(
                429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})))
        if kind == "server_error":
            return Fault(status or 502, _error_body(BotApiError(status or 502, "Bad Gateway")))
        if kind == "hang":
            return Fault(hang_s=self.hang_s if hang_s is None else hang_s)
        if kind == "reply" and status:
            return Fault(status, body if body is not None else {})
        raise ValueError(f"unknown fault kind {kind!r} (reply needs a status)")

    def messages_to(self, chat_id: int) -> list[dict[str, Any]]:
        """The messages sent to one chat, oldest first."""
        with self._lock:
            return [m for m in self.messages if m["chat"]["id"] == int(chat_id)]

    # ---- Bot API rules ------------------------------------------------------------------------

    def _chat(self, params: dict[str, Any]) -> Chat:
        """The chat named by chat_id; unknown ids follow the sign convention of the module docstring."""
        raw = params.get("chat_id")
        try:
            chat_id = int(str(raw).strip())
        except ValueError:
            # Telegram resolves @usernames; the pipeline only sends numeric ids.
            raise BotApiError(400, "Bad Request: chat not found") from None
        chat = self._chats.get(chat_id) or Chat(chat_id)
        if not chat.exists:
            raise BotApiError(400, "Bad Request: chat not found")
        return chat

    def get_me(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """getMe: the bot's own User."""
        return _bot_user(bot_id)

    def create_chat_invite_link(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """createChatInviteLink: a new link for a channel in which the bot may invite users."""
        chat = self._chat(params)
        if chat.chat_id > 0:
            raise BotApiError(400, "Bad Request: can't invite members to a private chat")
        if not chat.bot_is_admin:
            raise BotApiError(400, "Bad Request: not enough rights to manage chat invite links")
        link = {
            "invite_link": "https://t.me/+" + secrets.token_urlsafe(12)[:16],
            "creator": _bot_user(bot_id),
            "creates_join_request": _flag(params.get("creates_join_request")),
            "is_primary": False,
            "is_revoked": False,
        }
        if params.get("name"):
            link["name"] = str(params["name"])[:32]
        if params.get("expire_date") not in (None, ""):
            link["expire_date"] = _integer(params["expire_date"], "expire_date")
        if params.get("member_limit") not in (None, ""):
            limit = _integer(params["member_limit"], "member_limit")
            if not 1 <= limit <= MAX_MEMBER_LIMIT:
                raise BotApiError(400, "Bad Request: MEMBER_LIMIT_INVALID")
            if link["creates_join_request"]:
                raise BotApiError(400, "Bad Request: can't combine member limit with join requests")
            link["member_limit"] = limit
        with self._lock:
            self.invite_links[link["invite_link"]] = {**link, "chat_id": chat.chat_id}
        return link

    def revoke_chat_invite_link(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """revokeChatInviteLink: mark a link the bot created as revoked."""
        chat = self._chat(params)
        with self._lock:
            stored = self.invite_links.get(str(params.get("invite_link") or ""))
            if stored is None or stored["chat_id"] != chat.chat_id:
                raise BotApiError(400, "Bad Request: INVITE_HASH_EXPIRED")
            stored["is_revoked"] = True
            return {key: value for key, value in stored.items() if key != "chat_id"}

    def send_message(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        """sendMessage: a text message to a user who has not blocked the bot, or to a channel."""
        chat = self._chat(params)
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BotApiError(400, "Bad Request: message text is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            raise BotApiError(400, "Bad Request: message is too long")
        if chat.blocked_bot:
            raise BotApiError(403, "Forbidden: bot was blocked by the user")
        if chat.chat_id < 0 and not chat.bot_is_admin:
            raise BotApiError(403, "Forbidden: bot is not a member of the channel chat")
        kind = "private" if chat.chat_id > 0 else "channel"
        with self._lock:
            self._message_ids[chat.chat_id] += 1
            message = {
                "message_id": self._message_ids[chat.chat_id],
                "from": _bot_user(bot_id),
                "chat": {"id": chat.chat_id, "type": kind},
                "date": int(time.time()),
                "text": text,
                "link_preview_disabled": _preview_disabled(params),  # stand-in only: what the bot asked for
            }
            self.messages.append(message)
        return {key: value for key, value in message.items() if key != "link_preview_disabled"}

    # ---- HTTP --------------------------------------------------------------------------------

    def _create_app(self) -> Flask:
        """The Flask app: /bot<token>/<method> plus /_standin/ control routes."""
        app = Flask(__name__)
        app.add_url_rule("/bot<path:token>/<method>", "bot_api", self._bot_api_view, methods=["GET", "POST"])
        app.add_url_rule("/_standin/faults", "faults", self._faults_view, methods=["POST"])
        app.add_url_rule("/_standin/chats/<int(signed=True):chat_id>", "chat", self._chat_view, methods=["POST"])
        app.add_url_rule("/_standin/messages", "messages", self._messages_view, methods=["GET"])
        return app

    def _bot_api_view(self, token: str, method: str) -> Response:
        """Authenticate the token, play any scripted fault, then run the method."""
        params = _request_params()
        with self._lock:
            self.requests_seen.append({"method": method, "params": params, "token_ok": token in self.tokens})
            faults = self._faults.get(method)
            fault = faults.popleft() if faults else None
        try:
            if token not in self.tokens:
                raise BotApiError(401, "Unauthorized")
            handler = self._handlers().get(method)
            if handler is None:
                raise BotApiError(404, "Not Found")
            if fault is not None and fault.hang_s:
                self._released.wait(fault.hang_s)
            elif fault is not None:
                return _json_response(fault.status, fault.body)
            return _json_response(200, {"ok": True, "result": handler(int(token.split(":")[0]), params)})
        except BotApiError as exc:
            return _json_response(exc.error_code, _error_body(exc))

    def _handlers(self) -> dict:
        """Bot API method name to its implementation."""
        return {"getMe": self.get_me, "createChatInviteLink": self.create_chat_invite_link,
                "revokeChatInviteLink": self.revoke_chat_invite_link, "sendMessage": self.send_message}

    def _faults_view(self) -> Response:
        """POST /_standin/faults {"method", "kind", "count"?, "retry_after"?, "status"?, "body"?, "hang_s"?}."""
        spec = dict(_request_params())
        try:
            self.inject_fault(spec.pop("method", ""), spec.pop("kind", ""), int(spec.pop("count", 1)), **spec)
        except (TypeError, ValueError) as exc:
            return _json_response(400, {"ok": False, "error_code": 400, "description": str(exc)})
        return _json_response(200, {"ok": True, "result": True})

    def _chat_view(self, chat_id: int) -> Response:
        """POST /_standin/chats/<id> {"exists"?, "bot_is_admin"?, "blocked_bot"?}."""
        spec = _request_params()
        self.set_chat(chat_id, **{key: _flag(spec[key]) for key in ("exists", "bot_is_admin", "blocked_bot")
                                  if key in spec})
        return _json_response(200, {"ok": True, "result": True})

    def _messages_view(self) -> Response:
        """GET /_standin/messages[?chat_id=]: what the bot has sent (a dev stack looks up invite links here)."""
        chat_id = request.args.get("chat_id")
        with self._lock:
            sent = [m for m in self.messages if chat_id is None or str(m["chat"]["id"]) == chat_id]
        return _json_response(200, {"ok": True, "result": sent})


def _bot_user(bot_id: int) -> dict[str, Any]:
    """The bot's User object."""
    return {"id": bot_id, "is_bot": True, "first_name": "TelePay stand-in", "username": "telepay_standin_bot",
            "can_join_groups": False, "can_read_all_group_messages": False, "supports_inline_queries": False}


def _request_params() -> dict[str, Any]:
    """Parameters from the query string, a form or a JSON object body, as Telegram accepts them."""
    params: dict[str, Any] = request.args.to_dict()
    if request.form:
        params.update(request.form.to_dict())
    raw = request.get_data(cache=True)
    if raw and request.is_json:
        try:
            body = json.loads(raw)
        except ValueError:
            raise BotApiError(400, "Bad Request: can't parse JSON object") from None
        if isinstance(body, dict):
            params.update(body)
    return params


def _integer(value: Any, name: str) -> int:
    """An Integer parameter, refusing what Telegram cannot parse."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise BotApiError(400, f"Bad Request: invalid {name} specified") from None


def _flag(value: Any) -> bool:
    """A Boolean parameter given as JSON true/false or as text."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _preview_disabled(params: dict[str, Any]) -> bool:
    """Whether link previews were turned off, by link_preview_options or the older parameter."""
    options = params.get("link_preview_options")
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            options = None
    if isinstance(options, dict) and "is_disabled" in options:
        return _flag(options["is_disabled"])
    return _flag(params.get("disable_web_page_preview", False))


def _error_body(exc: BotApiError) -> dict[str, Any]:
    """The Bot API error object."""
    body = {"ok": False, "error_code": exc.error_code, "description": exc.description}
    if exc.parameters:
        body["parameters"] = exc.parameters
    return body


def _json_response(status: int, body: Any) -> Response:
    """A JSON response."""
    return Response(json.dumps(body), status, mimetype="application/json")


def main(argv: list[str] | None = None) -> int:
    """Serve the stand-in on a fixed port for the local dev stack."""
    parser = argparse.ArgumentParser(description="Telegram Bot API stand-in (local development only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--token", action="append",
                        help="bot token to accept (repeatable; default $TELEGRAM_BOT_SECRET_NAME or a fixed test token)")
    args = parser.parse_args(argv)
    tokens = tuple(args.token or [os.environ.get("TELEGRAM_BOT_SECRET_NAME", "").strip() or DEFAULT_TOKEN])
    standin = TelegramStandIn(tokens=tokens, host=args.host, port=args.port)
    return standin.serve_until_interrupted("Telegram Bot API stand-in")


if __name__ == "__main__":
    raise SystemExit(main())
