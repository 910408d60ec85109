"""The Telegram Bot API stand-in answers as the public contract says, over real HTTP."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from telepay_shared.standins.telegram import DEFAULT_TOKEN, TelegramStandIn, main

CHANNEL, USER = -1003268562225, 6271402111


@pytest.fixture
def telegram():
    with TelegramStandIn(hang_s=2.0) as standin:
        yield standin


def call(telegram, method, token=DEFAULT_TOKEN, **params):
    """POST a JSON call and return (status, body)."""
    answer = requests.post(f"{telegram.url}/bot{token}/{method}", json=params, timeout=5)
    return answer.status_code, answer.json()


def test_get_me_names_the_bot_of_the_token(telegram):
    status, body = call(telegram, "getMe")
    assert status == 200 and body["ok"] is True
    assert body["result"]["id"] == 123456789 and body["result"]["is_bot"] is True


def test_invite_link_is_single_use_with_expiry(telegram):
    expire = int(time.time()) + 3600
    status, body = call(telegram, "createChatInviteLink", chat_id=CHANNEL, expire_date=expire, member_limit=1)
    assert status == 200
    link = body["result"]
    assert link["invite_link"].startswith("https://t.me/+")
    assert (link["expire_date"], link["member_limit"], link["is_revoked"]) == (expire, 1, False)
    assert telegram.invite_links[link["invite_link"]]["chat_id"] == CHANNEL


def test_each_call_creates_a_new_link_and_revoke_marks_it(telegram):
    first = call(telegram, "createChatInviteLink", chat_id=CHANNEL)[1]["result"]["invite_link"]
    second = call(telegram, "createChatInviteLink", chat_id=CHANNEL)[1]["result"]["invite_link"]
    assert first != second
    status, body = call(telegram, "revokeChatInviteLink", chat_id=CHANNEL, invite_link=first)
    assert status == 200 and body["result"]["is_revoked"] is True
    assert call(telegram, "revokeChatInviteLink", chat_id=CHANNEL, invite_link="https://t.me/+nope")[0] == 400


@pytest.mark.parametrize("params, description", [
    ({"chat_id": CHANNEL, "member_limit": 0}, "Bad Request: MEMBER_LIMIT_INVALID"),
    ({"chat_id": CHANNEL, "member_limit": 100000}, "Bad Request: MEMBER_LIMIT_INVALID"),
    ({"chat_id": CHANNEL, "member_limit": 1, "creates_join_request": True},
     "Bad Request: can't combine member limit with join requests"),
    ({"chat_id": CHANNEL, "expire_date": "soon"}, "Bad Request: invalid expire_date specified"),
    ({"chat_id": USER}, "Bad Request: can't invite members to a private chat"),
    ({"chat_id": "@somechannel"}, "Bad Request: chat not found"),
])
def test_invite_link_parameters_are_checked(telegram, params, description):
    status, body = call(telegram, "createChatInviteLink", **params)
    assert (status, body) == (400, {"ok": False, "error_code": 400, "description": description})


def test_channel_without_admin_rights_or_unknown_refuses_links(telegram):
    telegram.set_chat(CHANNEL, bot_is_admin=False)
    assert call(telegram, "createChatInviteLink", chat_id=CHANNEL)[1]["description"] == \
        "Bad Request: not enough rights to manage chat invite links"
    telegram.set_chat(CHANNEL, exists=False)
    assert call(telegram, "createChatInviteLink", chat_id=CHANNEL)[1]["description"] == "Bad Request: chat not found"
    assert telegram.invite_links == {}


def test_send_message_returns_the_message_and_records_it(telegram):
    status, body = call(telegram, "sendMessage", chat_id=USER, text="hello", link_preview_options={"is_disabled": True})
    assert status == 200
    message = body["result"]
    assert (message["message_id"], message["chat"], message["text"]) == (1, {"id": USER, "type": "private"}, "hello")
    assert call(telegram, "sendMessage", chat_id=USER, text="again")[1]["result"]["message_id"] == 2
    sent = telegram.messages_to(USER)
    assert [m["text"] for m in sent] == ["hello", "again"]
    assert [m["link_preview_disabled"] for m in sent] == [True, False]


def test_send_message_takes_query_and_form_parameters_too(telegram):
    by_query = requests.get(f"{telegram.url}/bot{DEFAULT_TOKEN}/sendMessage",
                            params={"chat_id": USER, "text": "q", "disable_web_page_preview": "true"}, timeout=5)
    by_form = requests.post(f"{telegram.url}/bot{DEFAULT_TOKEN}/sendMessage", data={"chat_id": USER, "text": "f"},
                            timeout=5)
    assert by_query.json()["ok"] and by_form.json()["ok"]
    assert [(m["text"], m["link_preview_disabled"]) for m in telegram.messages_to(USER)] == [("q", True), ("f", False)]


@pytest.mark.parametrize("setup, params, status, description", [
    ({"blocked_bot": True}, {"text": "hi"}, 403, "Forbidden: bot was blocked by the user"),
    ({"exists": False}, {"text": "hi"}, 400, "Bad Request: chat not found"),
    ({}, {"text": "  "}, 400, "Bad Request: message text is empty"),
    ({}, {}, 400, "Bad Request: message text is empty"),
    ({}, {"text": "x" * 4097}, 400, "Bad Request: message is too long"),
])
def test_send_message_refusals(telegram, setup, params, status, description):
    telegram.set_chat(USER, **setup)
    answer = call(telegram, "sendMessage", chat_id=USER, **params)
    assert answer == (status, {"ok": False, "error_code": status, "description": description})
    assert telegram.messages == []


def test_unknown_token_is_unauthorized_and_unknown_method_not_found(telegram):
    assert call(telegram, "getMe", token="42:wrong") == (
        401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    assert call(telegram, "sendPigeon") == (404, {"ok": False, "error_code": 404, "description": "Not Found"})
    assert [r["token_ok"] for r in telegram.requests_seen] == [False, True]


def test_flood_control_answers_429_with_retry_after_then_recovers(telegram):
    telegram.inject_fault("sendMessage", "rate_limit", 1, retry_after=7)
    status, body = call(telegram, "sendMessage", chat_id=USER, text="hi")
    assert status == 429
    assert body == {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7",
                    "parameters": {"retry_after": 7}}
    assert call(telegram, "sendMessage", chat_id=USER, text="hi")[0] == 200


def test_server_error_and_reply_faults(telegram):
    telegram.inject_fault("createChatInviteLink", "server_error", 1)
    telegram.inject_fault("createChatInviteLink", "reply", 1, status=400, body={"ok": False, "error_code": 400,
                                                                                 "description": "Bad Request: x"})
    assert call(telegram, "createChatInviteLink", chat_id=CHANNEL)[0] == 502
    assert call(telegram, "createChatInviteLink", chat_id=CHANNEL)[1]["description"] == "Bad Request: x"
    assert call(telegram, "createChatInviteLink", chat_id=CHANNEL)[0] == 200
    with pytest.raises(ValueError):
        telegram.inject_fault("createChatInviteLink", "reply")
    with pytest.raises(ValueError):
        telegram.inject_fault("kickEveryone", "rate_limit")


def test_hang_outlasts_a_client_timeout(telegram):
    telegram.inject_fault("getMe", "hang", 1, hang_s=2.0)
    with pytest.raises(requests.Timeout):
        requests.get(f"{telegram.url}/bot{DEFAULT_TOKEN}/getMe", timeout=0.5)


def test_control_routes_for_a_dev_stack(telegram):
    base = f"{telegram.url}/_standin"
    assert requests.post(f"{base}/chats/{USER}", json={"blocked_bot": True}, timeout=5).json()["ok"]
    assert call(telegram, "sendMessage", chat_id=USER, text="hi")[0] == 403
    assert requests.post(f"{base}/faults", json={"method": "getMe", "kind": "rate_limit"}, timeout=5).json()["ok"]
    assert call(telegram, "getMe")[0] == 429
    assert requests.post(f"{base}/faults", json={"method": "nope", "kind": "x"}, timeout=5).status_code == 400
    call(telegram, "sendMessage", chat_id=CHANNEL, text="to the channel")
    listed = requests.get(f"{base}/messages", params={"chat_id": CHANNEL}, timeout=5).json()["result"]
    assert [m["text"] for m in listed] == ["to the channel"]


def test_malformed_tokens_are_refused_at_construction():
    with pytest.raises(ValueError):
        TelegramStandIn(tokens=("no-colon",))


def test_main_serves_on_the_given_port(monkeypatch):
    served = threading.Event()
    monkeypatch.setattr(TelegramStandIn, "serve_forever", lambda self: served.set() or None)
    monkeypatch.setenv("TELEGRAM_BOT_SECRET_NAME", "42:from-env")
    captured = {}
    original_init = TelegramStandIn.__init__

    def spy_init(self, **kwargs):
        captured.update(kwargs)
        original_init(self, **kwargs)

    monkeypatch.setattr(TelegramStandIn, "__init__", spy_init)
    assert main(["--port", "0"]) == 0
    assert served.is_set() and captured["tokens"] == ("42:from-env",) and captured["port"] == 0
