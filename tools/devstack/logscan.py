"""The local stack's logs hold no secret: a scan of <stack folder>/logs/*.log for every secret the stack gave out.

    find_secrets(stack.path("logs"), stack_secrets(stack))  ->  ["gchostpay3.log: secret HOST_WALLET_PRIVATE_KEY
                                                                  (hex form)", ...]  (empty: none found)

The secrets are secrets.json's (signing keys, IPN secret, ChangeNOW key, bot token, the OIDC signing
key) and the chain's host wallet key; each is looked for in every form a log could carry it in
(telepay_shared.testing.secretscan: raw, hex, base64, a PEM's lines). A finding names the file, the
secret and the form, never the value. The e2e tests call it at the end; so can the fault soak.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from telepay_shared.testing.secretscan import SecretScan

CHAIN_SECRETS = {"HOST_WALLET_PRIVATE_KEY": "host_private_key"}  # the funder's key is eth-tester's public one


def stack_secrets(stack) -> dict[str, str]:
    """Name -> value of every secret a tools.devstack.stack.Stack configures its parts with."""
    found = dict(stack.secrets)
    if stack.path("chain", "info.json").exists():
        info = stack.chain_info()
        found.update({name: info[key] for name, key in CHAIN_SECRETS.items() if info.get(key)})
    return found


def find_secrets(folder: Path, secrets: Mapping[str, str]) -> list[str]:
    """Every (file, secret, form) found in folder/*.log, as text naming the file, the secret and the form."""
    scan = SecretScan(dict(secrets))
    for log in sorted(Path(folder).glob("*.log")):
        scan.find(log.read_text(errors="replace"), log.name)
    return [str(finding) for finding in scan.findings]
