"""The Bot API client against the Telegram stand-in: the calls it makes and how each failure maps."""
from __future__ import annotations

import time

import pytest

from telepay_shared.standins.telegram import TelegramStandIn
from telepay_shared.testing.tasks_emulator import DeliveryRecorder, free_port

from services.gcwebhook2.telegram import (
    TELEGRAM_API_URL, TelegramBot, TelegramRateLimited, TelegramRejected, TelegramUnavailable,
)

TOKEN = "5550001:gcwebhook2-test-token"
CHANNEL, USER = -1003268562225, 6271402111


@pytest.fixture
def telegram():
    with TelegramStandIn(tokens=(TOKEN,), hang_s=2.0) as standin:
        yield standin


@pytest.fixture
def bot(telegram):
    return TelegramBot(TOKEN, telegram.url, timeout_s=1.0)


def test_invite_link_is_single_use_and_expiring(bot, telegram):
    expire = int(time.time()) + 3600
    link = bot.create_invite_link(CHANNEL, expire)
    stored = telegram.invite_links[link]
    assert (stored["chat_id"], stored["expire_date"], stored["member_limit"]) == (CHANNEL, expire, 1)


def test_message_is_sent_without_link_preview(bot, telegram):
    assert bot.send_message(USER, "hello") == 1
    [message] = telegram.messages_to(USER)
    assert (message["text"], message["link_preview_disabled"]) == ("hello", True)


def test_flood_control_is_rate_limited_with_telegrams_delay(bot, telegram):
    telegram.inject_fault("sendMessage", "rate_limit", retry_after=17)
    with pytest.raises(TelegramRateLimited) as caught:
        bot.send_message(USER, "hello")
    assert (caught.value.http_status, caught.value.retry_after_s) == (429, 17)


def test_refusals_are_permanent(bot, telegram):
    telegram.set_chat(USER, blocked_bot=True)
    with pytest.raises(TelegramRejected) as caught:
        bot.send_message(USER, "hello")
    assert (caught.value.http_status, caught.value.error_code) == (400, 403)
    assert caught.value.description == "Forbidden: bot was blocked by the user"


@pytest.mark.parametrize("fault", [{"kind": "server_error"}, {"kind": "hang"},
                                   {"kind": "reply", "status": 500, "body": {"ok": False, "error_code": 500}}])
def test_outages_are_transient(bot, telegram, fault):
    telegram.inject_fault("createChatInviteLink", **fault)
    with pytest.raises(TelegramUnavailable):
        bot.create_invite_link(CHANNEL, int(time.time()) + 3600)


def test_unknown_token_is_transient_and_never_quoted(telegram):
    with pytest.raises(TelegramUnavailable) as caught:
        TelegramBot("999:wrong-token", telegram.url).send_message(USER, "hello")
    assert "401" in caught.value.message and "wrong-token" not in caught.value.message


def test_unreachable_and_unreadable_telegram_are_transient():
    unreachable = TelegramBot(TOKEN, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TelegramUnavailable, match="unreachable") as caught:
        unreachable.send_message(USER, "hello")
    assert TOKEN not in caught.value.message
    with DeliveryRecorder() as not_telegram, pytest.raises(TelegramUnavailable, match="unreadable"):
        TelegramBot(TOKEN, not_telegram.url("")).send_message(USER, "hello")


def test_an_answer_without_a_link_is_transient(bot, telegram):
    telegram.inject_fault("createChatInviteLink", "reply", status=200, body={"ok": True, "result": {}})
    with pytest.raises(TelegramUnavailable, match="no invite_link"):
        bot.create_invite_link(CHANNEL, int(time.time()))


def test_default_api_is_telegrams():
    class Config(dict):
        TELEGRAM_BOT_SECRET_NAME = type("Secret", (), {"reveal": lambda self: TOKEN})()

        def get(self, name, default=None):
            return None

    assert TelegramBot.from_config(Config())._base == f"{TELEGRAM_API_URL}/bot{TOKEN}/"
