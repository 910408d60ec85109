"""The ChangeNOW stand-in, and what ChangeNOW itself does once an exchange's deposit lands.

It watches the chain for deposits (ETH, or a test token's Transfer) to the payin address of a
waiting exchange, credits the deposit, pays amountTo to the payout address on the chain (ETH from
the chain's funder, or a minted test token; other currencies, or every payout with --no-payouts,
are off-chain) and marks the exchange finished. Exchanges and the watcher's position survive
restarts (persist.SavedState); a deposit mined while the stand-in was down is settled at start.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from tools.devstack.chain import TRANSFERS_METHOD, WAIT_METHOD
from tools.devstack.chainrpc import ChainRpc
from tools.devstack.ecc import decide_ecc_backend_once, use_openssl_keccak_once
from tools.devstack.persist import SavedState, TrackedDict, wait_for_termination

LOOPBACK = "127.0.0.1"
MINT_SELECTOR = function_signature_to_4byte_selector("mint(address,uint256)")  # TestToken.sol's: payouts are minted

log = logging.getLogger("devstack.changenow")


class Settlement:
    """ChangeNOW's side of an exchange: see the deposit on the chain, pay out, finish (module docstring).

    Payouts come from the chain's pre-funded account, signed here (its key is eth-tester's first
    well-known test key) and sent raw: the chain signing for us cost it twice the time.
    """

    PAYOUT_FEES = {"maxFeePerGas": 100 * 10**9, "maxPriorityFeePerGas": 10**9}  # over any dev-chain base fee

    WAIT_S = 1.0  # the longest a watch for a new block lasts: how late a stop can be noticed

    def __init__(self, standin, chain_info: dict, next_block: int | None, pay_out: bool = True,
                 on_settled=lambda: None):
        from eth_account import Account

        self.standin = standin
        self.rpc = ChainRpc(chain_info["rpc_url"], timeout_s=30)
        self.funder = Account.from_key(chain_info["funder_private_key"])
        self.chain_id = chain_info["chain_id"]
        self.nonce = self._pending_nonce()
        self.tokens = {symbol: (to_checksum_address(t["address"]), t["decimals"])
                       for symbol, t in chain_info["tokens"].items()}
        self.by_address = {address.lower(): symbol for symbol, (address, _) in self.tokens.items()}
        self.next_block = int(self._call("eth_blockNumber", []), 16) + 1 if next_block is None else next_block
        self.pays_out = pay_out
        self.stopping = threading.Event()
        # Called once the blocks' exchanges are settled and next_block is past them: the stand-in
        # saves then, so a crash right after a payout does not settle (and pay) the deposit again.
        self.on_settled = on_settled
        self.waiting = WaitingExchanges(standin)

    def run(self) -> None:
        """Look at every new block, in order, as soon as it is mined, until stopped; errors are logged
        and the blocks retried."""
        while not self.stopping.is_set():
            try:
                head = self._call(WAIT_METHOD, [self.next_block - 1, self.WAIT_S])
                if head >= self.next_block:
                    settled = self._settle_blocks(self.next_block, head)
                    self.next_block = head + 1
                    if settled:
                        self.on_settled()
            except Exception:
                log.exception("deposit watcher failed; retrying")
                self.stopping.wait(1.0)

    def _settle_blocks(self, first: int, last: int) -> int:
        """Settle every exchange whose deposit landed in blocks first..last; how many were."""
        deposits = [transfer for transfer in self._transfers(first, last) if transfer[1] is not None]
        if not deposits:
            return 0
        waiting = self.waiting.current()
        settled = 0
        for address, currency, amount in deposits:
            exchange_id = waiting.get((address, currency))
            if exchange_id is not None:
                self._settle(exchange_id, amount)
                settled += 1
        return settled

    def _transfers(self, first: int, last: int) -> list[tuple[str, str | None, Decimal]]:
        """(to, currency or None when not ours, amount) of every successful transfer in the blocks."""
        found = []
        for transfer in self._call(TRANSFERS_METHOD, [first, last]):
            symbol = "eth" if transfer["token"] is None else self.by_address.get(transfer["token"])
            decimals = 18 if symbol == "eth" else self.tokens[symbol][1] if symbol else 0
            if transfer["status"] == 1:
                amount = Decimal(int(transfer["value"], 16)).scaleb(-decimals).normalize()
                found.append((transfer["to"], symbol, amount))
        return found

    def _call(self, method: str, params: list):
        """One JSON-RPC call to the chain (the dev chain's own methods too, chain.py)."""
        return self.rpc.call(method, params)

    def _pending_nonce(self) -> int:
        """The funder's next nonce, as the chain counts it."""
        return int(self._call("eth_getTransactionCount", [self.funder.address, "pending"]), 16)

    def _settle(self, exchange_id: str, amount: Decimal) -> None:
        """Credit the deposit, pay amountTo out, then finish the exchange with the payout's hash.

        A payout that fails puts the exchange back as it was, so the block is looked at again.
        """
        with self.standin._lock:
            before = dict(self.standin.exchanges[exchange_id])
        record = self.standin.receive_deposit(exchange_id, amount)
        try:
            payout_hash = self._pay_out(record["toCurrency"], record["toNetwork"], record["payoutAddress"],
                                        record["amountTo"])
        except Exception:
            with self.standin._lock:
                self.standin.exchanges[exchange_id] = before
            raise
        self.standin.advance(exchange_id, "finished")
        if payout_hash:
            with self.standin._lock:
                self.standin.exchanges[exchange_id]["payoutHash"] = payout_hash
        log.info("exchange %s: deposit %s %s, paid %s %s", exchange_id, amount, record["fromCurrency"],
                 record["amountTo"], record["toCurrency"])

    def _pay_out(self, currency: str, network: str, address: str, amount: Decimal) -> str | None:
        """Send the payout on the chain when it is ETH or a test token on the eth network; its hash."""
        if not self.pays_out or network != "eth" or amount <= 0 or (currency != "eth" and currency not in self.tokens):
            return None
        to = to_checksum_address(address)
        if currency == "eth":
            return self._send({"to": to, "value": _base_units(amount, 18), "gas": 21000})
        token, decimals = self.tokens[currency]
        # ABI-encoded here: web3's contract encoder re-reads the whole ABI for every call.
        data = MINT_SELECTOR + abi_encode(["address", "uint256"], [to, _base_units(amount, decimals)])
        return self._send({"to": token, "value": 0, "gas": 100_000, "data": data})

    def _send(self, transaction: dict) -> str:
        """Sign with the funder's key and broadcast; a refused transaction re-reads the nonce."""
        signed = self.funder.sign_transaction({**transaction, **self.PAYOUT_FEES, "nonce": self.nonce,
                                               "chainId": self.chain_id, "type": 2})
        try:
            tx_hash = self._call("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])
        except Exception:
            self.nonce = self._pending_nonce()
            raise
        self.nonce += 1
        return tx_hash


class WaitingExchanges:
    """The stand-in's exchanges still waiting for their deposit, by (payin address, currency).

    Kept between blocks rather than rebuilt from every exchange at each one: a long-lived stack
    holds tens of thousands, and reading them all for every block with a deposit cost more than the
    settling. Exchanges are only ever added (a dict keeps their order), so the ones created since
    the last look are the newest, read back to the first one already seen; a kept one is dropped
    once it is no longer waiting. (An exchange put back to waiting after a failed payout never left:
    the settlement that failed runs in the one thread that looks.) Records are read without a
    lookup by key, which would mark them changed for the stand-in's journal (persist.TrackedDict).
    """

    def __init__(self, standin):
        self.standin = standin
        self._seen: set[str] = set()
        self._waiting: dict[tuple[str, str], str] = {}

    def current(self) -> dict[tuple[str, str], str]:
        """(payin address lowercased, currency) -> exchange id, for every exchange waiting now."""
        exchanges = self.standin.exchanges
        with self.standin._lock:
            for exchange_id, record in reversed(exchanges.items()):
                if exchange_id in self._seen:
                    break
                self._seen.add(exchange_id)
                if record["status"] == "waiting":
                    self._waiting[(record["payinAddress"].lower(), record["fromCurrency"])] = exchange_id
            for key, exchange_id in list(self._waiting.items()):
                if dict.get(exchanges, exchange_id, {}).get("status") != "waiting":
                    del self._waiting[key]
            return dict(self._waiting)


def _base_units(amount: Decimal, decimals: int) -> int:
    """An amount in whole units as integer base units, rounded down (never pay more than amountTo)."""
    return int(amount.scaleb(decimals).to_integral_value(ROUND_DOWN))


def serve_changenow(args: argparse.Namespace) -> None:
    """Serve the ChangeNOW stand-in and settle its exchanges from the chain."""
    from telepay_shared.standins.changenow import ChangeNowStandIn

    decide_ecc_backend_once()  # the watcher signs every payout: fastecdsa's arithmetic (ecc.py)
    use_openssl_keccak_once()  # and hashes it: OpenSSL's Keccak-256 (ecc.py)
    standin = ChangeNowStandIn(api_key=args.api_key, host=LOOPBACK, port=args.port)
    chain_info = json.loads(Path(args.chain_info).read_text())
    standin.exchanges = TrackedDict()
    settlement = None
    state = SavedState(Path(args.state), standin._lock, {"exchanges": standin.exchanges},
                       lambda: {"next_block": settlement.next_block})
    saved = state.load()
    settlement = Settlement(standin, chain_info, saved.get("next_block"), pay_out=not args.no_payouts,
                            on_settled=state.save)
    state.compact()
    standin.start()
    watcher = threading.Thread(target=settlement.run, name="deposit-watcher", daemon=True)
    watcher.start()
    state.save_periodically()
    log.info("ChangeNOW stand-in on %s, %d exchanges, watching from block %d", standin.url,
             len(standin.exchanges), settlement.next_block)
    try:
        wait_for_termination()
    finally:
        settlement.stopping.set()  # let a settlement in progress end: a half-settled exchange is not saved
        watcher.join(timeout=30)
        standin.stop()
        state.compact()
