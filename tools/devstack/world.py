"""The world around the pipeline, for the local stack: one process per part, each durable across restarts.

    python -m tools.devstack.world tasks     --port P [--poll-s S] [--concurrency N] [--secrets FILE]
    python -m tools.devstack.world chain     --port P --state DIR                              (chain.py)
    python -m tools.devstack.world changenow --port P --state FILE --api-key K --chain-info FILE
                                             [--no-payouts]                                     (settlement.py)
    python -m tools.devstack.world telegram  --port P --state FILE --token T
    python -m tools.devstack.world coingecko --port P
    python -m tools.devstack.world oidc      --port P --secrets FILE

* tasks: the patched gcloud-tasks-emulator of telepay_shared.testing.tasks_emulator (reused names
  answer ALREADY_EXISTS, like Cloud Tasks), with its gRPC API on 127.0.0.1 only and Cloud Tasks'
  immediate, concurrent dispatch over kept connections (emulator.py); --poll-s is how often
  delayed tasks are looked at.
  With --secrets (the stack's secrets.json), a task created with an OIDC token is delivered with
  `Authorization: Bearer <ID token>` signed by the stack's OIDC_SIGNING_KEY, as Cloud Tasks attaches
  Google's. It keeps no state: the stack drains it on down.
* oidc: Google's certs endpoint (GET /oauth2/v1/certs: {kid: PEM certificate}) for that key, which
  the services are given as TP_OIDC_CERTS_URL (telepay_shared.testing.oidc).
* telegram: the Telegram Bot API stand-in, its sent messages and invite links kept across restarts.
* coingecko: /api/v3/simple/price at the ChangeNOW stand-in's USD prices, so the USD value
  np-webhook computes matches the swap rates.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import types
from decimal import Decimal
from pathlib import Path

import flask
from werkzeug.serving import make_server

from tools.devstack.persist import SavedState, TrackedDefaultDict, TrackedDict, wait_for_termination

LOOPBACK = "127.0.0.1"
# CoinGecko coin ids of the tickers the ChangeNOW stand-in prices.
COIN_IDS = {"ethereum": "eth", "tether": "usdt", "usd-coin": "usdc", "dai": "dai", "chainlink": "link",
            "bitcoin": "btc", "litecoin": "ltc", "solana": "sol", "tron": "trx"}

log = logging.getLogger("devstack.world")


# ---------------------------------------------------------------------------- Cloud Tasks emulator

def _grpc_on_loopback(server_module) -> None:
    """The emulator binds its gRPC API to [::]:port (every interface); keep it to 127.0.0.1."""
    real_server = server_module.grpc.server

    def loopback_server(*args, **kwargs):
        grpc_server = real_server(*args, **kwargs)
        add_port = grpc_server.add_insecure_port
        grpc_server.add_insecure_port = lambda address: add_port(address.replace("[::]", LOOPBACK))
        return grpc_server

    server_module.grpc = types.SimpleNamespace(**{**vars(server_module.grpc), "server": loopback_server})


def serve_tasks(args: argparse.Namespace) -> None:
    """Run the patched Cloud Tasks emulator until terminated."""
    from gcloud_tasks_emulator import server

    from telepay_shared.testing.tasks_emulator import install_cloud_tasks_fidelity
    from tools.devstack.emulator import deliver_over_kept_connections, dispatch_concurrently

    install_cloud_tasks_fidelity(server)
    deliver_over_kept_connections(server)  # first: the OIDC tokens wrap it
    if args.secrets:
        from telepay_shared.testing.tasks_emulator import install_oidc_tokens

        install_oidc_tokens(server, stack_issuer(args.secrets))
    _grpc_on_loopback(server)
    dispatch_concurrently(server, args.concurrency)
    server._LOOP_SLEEP_TIME = args.poll_s
    emulator = server.create_server(LOOPBACK, args.port, max_retries=-1)
    emulator.start()
    try:
        wait_for_termination()
    finally:
        emulator.stop()


def stack_issuer(secrets_file: str):
    """The stack's stand-in for Google's ID-token issuer, from its secrets.json."""
    from telepay_shared.testing.oidc import OidcIssuer
    from tools.devstack.wiring import OIDC_KEY_NAME

    return OidcIssuer.from_pem(json.loads(Path(secrets_file).read_text())[OIDC_KEY_NAME])


def serve_oidc(args: argparse.Namespace) -> None:
    """Serve the issuer's certificates in Google's format until terminated."""
    from telepay_shared.testing.oidc import CertsServer

    with CertsServer(stack_issuer(args.secrets), port=args.port):
        wait_for_termination()


# ---------------------------------------------------------------------------- Telegram and CoinGecko

def serve_telegram(args: argparse.Namespace) -> None:
    """Serve the Telegram Bot API stand-in with its sent messages kept across restarts."""
    from telepay_shared.standins.telegram import TelegramStandIn

    standin = TelegramStandIn(tokens=(args.token,), host=LOOPBACK, port=args.port)
    standin.invite_links, standin._message_ids = TrackedDict(), TrackedDefaultDict(int)
    state = SavedState(Path(args.state), standin._lock, {
        "messages": standin.messages, "invite_links": standin.invite_links, "message_ids": standin._message_ids})
    state.load()
    state.compact()
    standin.start()
    state.save_periodically()
    try:
        wait_for_termination()
    finally:
        standin.stop()
        state.compact()


def coingecko_prices() -> dict[str, Decimal]:
    """USD price per CoinGecko coin id: the ChangeNOW stand-in's own prices."""
    from telepay_shared.standins.changenow import DEFAULT_PRICES_USD

    return {coin: DEFAULT_PRICES_USD[ticker] for coin, ticker in COIN_IDS.items()}


def serve_coingecko(args: argparse.Namespace) -> None:
    """Answer CoinGecko's GET /api/v3/simple/price?ids=...&vs_currencies=usd until terminated."""
    prices = coingecko_prices()
    app = flask.Flask("coingecko-standin")

    @app.get("/api/v3/simple/price")
    def simple_price():
        ids = ",".join(flask.request.args.getlist("ids")).split(",")
        return {coin: {"usd": float(prices[coin])} for coin in ids if coin in prices}  # numbers, as CoinGecko

    server = make_server(LOOPBACK, args.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for_termination()
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """Run one part of the world until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tools.devstack.world")
    parts = parser.add_subparsers(dest="part", required=True)
    for name in ("tasks", "chain", "changenow", "telegram", "coingecko", "oidc"):
        part = parts.add_parser(name)
        part.add_argument("--port", type=int, required=True)
    parts.choices["tasks"].add_argument("--poll-s", type=float, default=0.05)
    parts.choices["tasks"].add_argument("--concurrency", type=int, default=10)
    parts.choices["tasks"].add_argument("--secrets", help="secrets.json holding OIDC_SIGNING_KEY: tasks get ID tokens")
    parts.choices["chain"].add_argument("--state", required=True)
    required = {"changenow": ("--state", "--api-key", "--chain-info"), "telegram": ("--state", "--token"),
                "oidc": ("--secrets",)}
    for name, options in required.items():
        for option in options:
            parts.choices[name].add_argument(option, required=True)
    parts.choices["changenow"].add_argument("--no-payouts", action="store_true",
                                            help="finish exchanges without sending the payout on the chain")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would drown the logs
    logging.getLogger("gcloud-tasks-emulator").setLevel(logging.WARNING)  # four lines per task, likewise
    from tools.devstack.chain import serve_chain
    from tools.devstack.settlement import serve_changenow

    {"tasks": serve_tasks, "chain": serve_chain, "changenow": serve_changenow, "telegram": serve_telegram,
     "coingecko": serve_coingecko, "oidc": serve_oidc}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
