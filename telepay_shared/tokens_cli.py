"""Command line for the inter-service tokens: mint or inspect a token of any hop.

    python -m telepay_shared.tokens_cli encode HOP --key SUCCESS_URL_SIGNING_KEY=... < fields.json
    python -m telepay_shared.tokens_cli decode HOP TOKEN --key SUCCESS_URL_SIGNING_KEY=... [--now 1795863061]

For JSON/HMAC hops (e.g. gcwebhook1->gcsplit1, nowpayments->np-webhook) encode prints and decode
takes the {"body", "signature"} JSON. TOKEN "-" reads it from stdin. Exit status: 0 success,
1 token rejected or fields refused, 2 usage or missing key.
"""
from __future__ import annotations

import argparse
import json
import sys

from telepay_shared import errors, tokens
from telepay_shared.hops import HOPS


class _UsageError(Exception):
    """Bad command line or input: exit status 2."""


def _parser() -> argparse.ArgumentParser:
    """Argument parser; options may come before or after the positionals."""
    parser = argparse.ArgumentParser(prog="tokens_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("encode", "decode"))
    parser.add_argument("hop", help="hop name, one of: " + ", ".join(HOPS))
    parser.add_argument("token", nargs="?", help="decode: the token ('-' reads stdin)")
    parser.add_argument("--key", action="append", default=[], metavar="NAME=VALUE",
                        help="signing secret by env var name, e.g. SUCCESS_URL_SIGNING_KEY=...; repeatable")
    parser.add_argument("--now", type=float, default=None, metavar="UNIX_SECONDS", help="clock (default: now)")
    return parser


def _keys(pairs: list[str]) -> dict[str, str]:
    """Parse repeated --key NAME=VALUE options."""
    keys = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise _UsageError(f"--key expects NAME=VALUE, got {name or pair!r}")
        keys[name] = value
    return keys


def _read_json(text: str, what: str):
    """Parse JSON input (floats stay floats: the wire carries f64)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"{what} is not valid JSON: {exc}") from None


def _encode(args, keys: dict) -> str:
    """Encode stdin's field object; JSON/HMAC hops print {"body", "signature"}."""
    fields = _read_json(sys.stdin.read(), "stdin")
    if not isinstance(fields, dict):
        raise _UsageError("stdin must hold a JSON object of fields")
    token = tokens.encode(args.hop, fields, keys, args.now)
    return json.dumps(token) if isinstance(token, dict) else token


def _decode(args, keys: dict) -> str:
    """Decode TOKEN and return its fields as JSON."""
    if args.token is None:
        raise _UsageError("decode needs a TOKEN argument ('-' reads stdin)")
    token = sys.stdin.read().strip() if args.token == "-" else args.token
    hop = HOPS.get(args.hop)
    if hop is not None and hop.signed_body:
        token = _read_json(token, "TOKEN")
    return json.dumps(tokens.decode(args.hop, token, keys, args.now))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        keys = _keys(args.key)
        print(_encode(args, keys) if args.command == "encode" else _decode(args, keys))
        return 0
    except errors.TokenRejected as exc:
        print(f"rejected: {exc.reason}", file=sys.stderr)
        return 1
    except errors.BadRequest as exc:
        print(f"refused: {exc.message}", file=sys.stderr)
        return 1
    except errors.ConfigError as exc:
        name = HOPS[args.hop].key if args.hop in HOPS else "NAME"
        print(f"{exc}: pass --key {name}=VALUE", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
