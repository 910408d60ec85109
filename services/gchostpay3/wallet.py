"""The host wallet: the only code that holds the private key, signs, and talks to the Ethereum node (web3 v8).

Signing is local (eth-account); the node only sees signed bytes. Nothing here decides anything:
node failures surface as web3/requests exceptions for rules.classify to name. What cannot change
while the process runs is asked of the node once: the chain id, each token's decimals.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account
from eth_keys import backends as ecc_backends
from eth_keys import keys
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3TypeError
from web3.types import RPCEndpoint

from telepay_shared import errors

from services.gchostpay3 import rules
from services.gchostpay3.rules import Fees, Transfer

# The two ERC-20 functions the wallet uses (every ERC-20 has them; USDT's transfer returns nothing,
# which does not matter: success is read from the receipt, never from a return value).
ERC20_ABI = [
    {"name": "transfer", "type": "function", "stateMutability": "nonpayable",
     "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}], "outputs": []},
    {"name": "balanceOf", "type": "function", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]},
    {"name": "decimals", "type": "function", "stateMutability": "view",
     "inputs": [], "outputs": [{"name": "", "type": "uint8"}]},
]
FEE_PERCENTILES = [25, 50, 75]
RECEIPT_POLL_S = 0.25
# A fee quote serves the payouts of the next FEES_REUSED_S: a block lasts 12 s and the caps allow twice the
# base fee, so a quote this fresh pays as surely as a new one, and a burst of payouts asks the node once.
FEES_REUSED_S = 2.0


@dataclass(frozen=True)
class SignedTransfer:
    """A signed transaction, as committed before it is broadcast."""

    nonce: int
    tx_hash: str  # 0x-hex, 66 characters
    raw: str  # 0x-hex of the signed bytes


@dataclass(frozen=True)
class Receipt:
    """What the pipeline keeps of a mined transaction's receipt."""

    status: int  # 1 success, 0 reverted
    gas_used: int
    block_number: int


def node_redactor(config) -> Callable[[str], str]:
    """Hide every configured secret, and the parts of ETHEREUM_RPC_URL that carry a provider's API key.

    Node errors quote the request path ("Max retries exceeded with url: /v3/<key>"), not the whole
    URL that the configuration's own redaction knows.
    """
    url = config.ETHEREUM_RPC_URL.reveal()
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    fragments = sorted({f for f in (url, path, parts.query, parts.password, parts.username) if f and len(f) > 1},
                       key=len, reverse=True)

    def redact(text: str) -> str:
        for fragment in fragments:
            text = text.replace(fragment, "***")
        return config.redact(text)

    return redact


class Wallet:
    """The host wallet on one Ethereum node."""

    def __init__(self, w3: Web3, private_key: str, address: str):
        try:
            # The signing backend is chosen once: eth_keys otherwise looks for coincurve again at every
            # signature, a failed import (a stat of every sys.path folder) that costs about as much as
            # the signature when it is absent. The key object is what sign() hands eth-account: given
            # the key's bytes (LocalAccount.sign_transaction does that), it builds a new key object
            # without this backend and looks again.
            key = keys.PrivateKey(HexBytes(private_key), backend=ecc_backends.get_backend())
            account = Account.from_key(key)
        except Exception:  # the message could quote the key
            raise errors.ConfigError("HOST_WALLET_PRIVATE_KEY is not a valid private key") from None
        if account.address.lower() != address.strip().lower():
            raise errors.ConfigError("HOST_WALLET_PRIVATE_KEY does not belong to HOST_WALLET_ETH_ADDRESS")
        self._key = key
        self.address = account.address
        self.w3 = w3
        self._chain_id: int | None = None
        self._decimals: dict[str, int] = {}
        self._tokens: dict[str, Any] = {}
        self._batches = True  # until the provider says it has no JSON-RPC batches
        self._fees: tuple[float, Fees] | None = None  # (when asked, the quote)
        self.clock = time.monotonic

    @classmethod
    def from_config(cls, config, w3: Web3 | None = None) -> Wallet:
        """The wallet the configuration names, on ETHEREUM_RPC_URL unless a web3 instance is given."""
        if w3 is None:
            # eth_chainId is the one answer kept: a node never changes it. No middleware: the wallet only
            # reads, signs locally and sends raw bytes, so ENS names, gas strategies and web3's per-call
            # chain-id validation of eth_call (two more round trips per ERC-20 read) buy nothing, and
            # they cost a third of every call's CPU.
            provider = Web3.HTTPProvider(config.ETHEREUM_RPC_URL.reveal(),
                                         request_kwargs={"timeout": float(config.ETHEREUM_RPC_TIMEOUT_S)},
                                         cache_allowed_requests=True, cacheable_requests={RPCEndpoint("eth_chainId")})
            w3 = Web3(provider, middleware=[])
        return cls(w3, config.HOST_WALLET_PRIVATE_KEY.reveal(), config.HOST_WALLET_ETH_ADDRESS)

    def __repr__(self) -> str:
        return f"Wallet({self.address})"

    # ------------------------------------------------------------------ reading the chain

    def chain_id(self) -> int:
        """The chain id the node serves (never assumed to be mainnet's 1), asked once: a node never changes it."""
        if self._chain_id is None:
            self._chain_id = self.w3.eth.chain_id
        return self._chain_id

    def pending_nonce(self) -> int:
        """The node's next nonce for the wallet, counting transactions in its pool."""
        return self.w3.eth.get_transaction_count(self.address, "pending")

    def eth_balance(self) -> int:
        """Wei the wallet holds."""
        return self.w3.eth.get_balance(self.address, "pending")

    def balance_and_nonce(self) -> tuple[int, int]:
        """eth_balance() and pending_nonce() in one JSON-RPC batch: one round trip, not two, while the
        wallet lock is held. A provider without batches (web3's in-process tester) is asked twice."""
        if self._batches:
            try:
                with self.w3.batch_requests() as batch:
                    batch.add(self.w3.eth.get_balance(self.address, "pending"))
                    batch.add(self.w3.eth.get_transaction_count(self.address, "pending"))
                    balance, nonce = batch.execute()
                return int(balance), int(nonce)
            except Web3TypeError as unsupported:
                if "not supported" not in str(unsupported):
                    raise
                self._batches = False
        return self.eth_balance(), self.pending_nonce()

    def token_balance(self, contract: str) -> int:
        """Base units of an ERC-20 the wallet holds."""
        return self._token(contract).functions.balanceOf(self.address).call()

    def token_decimals(self, contract: str) -> int:
        """The decimals an ERC-20 contract reports, asked once per contract (a deployed token's decimals are fixed)."""
        if contract not in self._decimals:
            self._decimals[contract] = self._token(contract).functions.decimals().call()
        return self._decimals[contract]

    def fees(self) -> Fees:
        """EIP-1559 caps from the latest fee history, else from the gas price (spec §7.5); a quote at most
        FEES_REUSED_S old is reused."""
        if self._fees is not None and self.clock() - self._fees[0] < FEES_REUSED_S:
            return self._fees[1]
        asked = self.clock()
        fees = self._fees_now()
        self._fees = (asked, fees)
        return fees

    def _fees_now(self) -> Fees:
        """The caps from the node now."""
        base_fee = median_tip = None
        try:
            history = self.w3.eth.fee_history(1, "latest", FEE_PERCENTILES)
            base_fee = history["baseFeePerGas"][-1]
            rewards = history.get("reward") or []
            median_tip = rewards[-1][1] if rewards and len(rewards[-1]) > 1 else None
        except Exception:  # a node without eth_feeHistory: legacy's gas-price path
            return rules.eip1559_fees(None, None, self.w3.eth.gas_price)
        return rules.eip1559_fees(base_fee, median_tip, None)

    def receipt(self, tx_hash: str) -> Receipt | None:
        """The receipt of a mined transaction, or None while it is not mined."""
        try:
            found = self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None
        if found is None or found.get("blockNumber") is None:
            return None
        return Receipt(int(found["status"]), int(found["gasUsed"]), int(found["blockNumber"]))

    def knows(self, tx_hash: str) -> bool:
        """Whether the node has the transaction (in its pool or mined)."""
        try:
            return self.w3.eth.get_transaction(HexBytes(tx_hash)) is not None
        except TransactionNotFound:
            return False

    def wait_for_receipt(self, tx_hash: str, timeout_s: float) -> Receipt | None:
        """Poll for the receipt for at most timeout_s; None if the transaction is still unmined."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.receipt(tx_hash)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(RECEIPT_POLL_S, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------ signing and sending

    def sign(self, transfer: Transfer, *, nonce: int, fees: Fees, chain_id: int) -> SignedTransfer:
        """Sign the EIP-1559 transfer locally: ETH to the deposit address, or the ERC-20's transfer()."""
        if transfer.asset.contract:
            to, value = transfer.asset.contract, 0
            data = self._token(transfer.asset.contract).encode_abi("transfer", args=[transfer.payin, transfer.units])
        else:
            to, value, data = transfer.payin, transfer.units, "0x"
        signed = Account.sign_transaction({
            "type": 2, "chainId": chain_id, "nonce": nonce, "to": to, "value": value, "data": data,
            "gas": transfer.asset.gas_limit, "maxFeePerGas": fees.max_fee, "maxPriorityFeePerGas": fees.priority_fee,
        }, self._key)
        return SignedTransfer(nonce, signed.hash.to_0x_hex(), signed.raw_transaction.to_0x_hex())

    def broadcast(self, raw: str) -> None:
        """Hand the signed bytes to the node; the node may already have them (not an error)."""
        try:
            self.w3.eth.send_raw_transaction(HexBytes(raw))
        except Exception as exc:
            if not rules.already_known(exc):
                raise

    def _token(self, contract: str):
        """A web3 contract object for an ERC-20, built once per contract (web3 parses the ABI for each)."""
        if contract not in self._tokens:
            self._tokens[contract] = self.w3.eth.contract(address=contract, abi=ERC20_ABI)
        return self._tokens[contract]
