"""The stack's chain: telepay_shared.testing.evm's LocalChain over JSON-RPC, durable across restarts.

Every state-changing call is appended to a journal before it is answered; a clean stop writes a
snapshot of the chain database and empties the journal; a start restores the snapshot, then
replays the journal (what a crash left). The host key and the token contracts are kept, so
addresses never change. Additions to eth-tester: transactions are found through py-evm's hash
index (eth-tester scans every block), and each signature is recovered once (`_recover_once`); for
the ChangeNOW stand-in's deposit watcher,
`devstack_waitForBlock` answers as soon as a new block is mined (no polling, no delay) and
`devstack_transfers` hands over the transfers of a block range without eth-tester's costly formatting.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import pickle
import threading
import time
from pathlib import Path
from typing import Any

from eth.db.atomic import AtomicDB
from eth.db.backends.memory import MemoryDB
from eth.exceptions import TransactionNotFound as NotIndexed
from eth_account import Account
from eth_keys.datatypes import Signature
from eth_tester.backends.pyevm import main as pyevm_backend
from eth_tester.exceptions import TransactionNotFound

from telepay_shared.testing.evm import LocalChain, Token
from tools.devstack.ecc import decide_ecc_backend_once, use_openssl_keccak_once
from tools.devstack.persist import wait_for_termination, write_atomically

# Methods that change chain state: journaled, in order, so a replay rebuilds the same chain.
JOURNALED_METHODS = ("eth_sendRawTransaction", "eth_sendTransaction")
TRANSFER_EVENT = 0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef  # Transfer(address,address,uint256)
# The dev chain's own JSON-RPC methods, for the ChangeNOW stand-in's deposit watcher (settlement.py).
TRANSFERS_METHOD = "devstack_transfers"  # [first, last] -> the transfers mined in those blocks
WAIT_METHOD = "devstack_waitForBlock"  # [after, timeout_s] -> the head, once past `after` (a long poll)
MAX_WAIT_S = 30.0
RECOVERED_KEYS_KEPT = 1 << 16  # senders of the most recent transactions, each recovered once (~1 ms apiece)

log = logging.getLogger("devstack.chain")


def _index_transaction_lookups() -> None:
    """Find transactions through py-evm's hash index instead of eth-tester's scan of every block.

    eth-tester's receipt and transaction lookups walk the chain from its head (its own TODO says
    so): on a chain of a few hundred blocks each takes ~0.1 s, a miss walks it all, and the chain
    answers one call at a time, so the scans alone capped the stack at a payment or two a second.
    """

    def lookup(chain, transaction_hash):
        pending = chain.get_block()
        for index, transaction in enumerate(pending.transactions):
            if transaction.hash == transaction_hash:
                return pending, transaction, index
        try:
            number, index = chain.chaindb.get_transaction_index(transaction_hash)
        except NotIndexed:
            raise TransactionNotFound(f"No transaction found for transaction hash: {transaction_hash.hex()}") from None
        block = chain.get_canonical_block_by_number(number)
        return block, block.transactions[index], index

    pyevm_backend._get_transaction_by_hash = lookup


def _recover_once() -> None:
    """Recover each signature's public key once: eth-tester formats every receipt and transaction it
    answers with its sender, recovered again from the signature each time (~1 ms with ecc.py's
    backend, ~5 ms in pure Python), and GCHostPay3 polls receipts. Recovery is a pure function of the
    signature and the signed hash, so a remembered answer is the same answer.
    """
    recover = Signature.recover_public_key_from_msg_hash
    if hasattr(recover, "cache_info"):
        return

    @functools.lru_cache(maxsize=RECOVERED_KEYS_KEPT)
    def recovered(signature: bytes, message_hash: bytes):
        return recover(Signature(signature), message_hash)

    def recover_public_key_from_msg_hash(self: Signature, message_hash: bytes):
        return recovered(self.to_bytes(), bytes(message_hash))

    recover_public_key_from_msg_hash.cache_info = recovered.cache_info
    Signature.recover_public_key_from_msg_hash = recover_public_key_from_msg_hash


class DurableChain(LocalChain):
    """A LocalChain restored from, and saved to, a folder (module docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder
        accounts, snapshot = folder / "accounts.json", folder / "chain.pickle"
        if snapshot.exists() and accounts.exists():
            super().__init__(host_eth_wei=0, with_tokens=False)
            saved = json.loads(accounts.read_text())
            self.host = Account.from_key(saved["host_private_key"])
            self.usdt, self.dai = (Token(**saved["tokens"][symbol]) for symbol in ("USDT", "DAI"))
            backend = self.tester.backend
            backend.chain = type(backend.chain)(AtomicDB(MemoryDB(pickle.loads(snapshot.read_bytes()))))
        else:
            super().__init__()
            write_atomically(accounts, json.dumps({
                "host_private_key": self.host_private_key,
                "tokens": {t.symbol: vars(t) for t in (self.usdt, self.dai)},
            }).encode())
            self.save_snapshot()
        self._replay_journal()
        self.journal = open(folder / "journal.jsonl", "a", encoding="utf-8")
        self.mined = threading.Condition()  # notified whenever a journaled call may have mined a block
        self.head = self._head()
        self._transaction_builder = self.tester.backend.chain.get_vm().get_transaction_builder()
        self.calls: dict[str, list] = {}  # method -> [count, seconds]: where the chain's time goes

    def _replay_journal(self) -> None:
        """Re-apply the calls journaled since the snapshot (a crash, not a clean stop, left them)."""
        path = self.folder / "journal.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        for number, (method, params) in enumerate(calls, 1):
            super().rpc(method, params)
            if number % 500 == 0:
                log.info("replayed %d of %d journaled calls", number, len(calls))
        if calls:
            log.info("replayed %d journaled calls", len(calls))

    def rpc(self, method: str, params: list) -> Any:
        """Answer a call; a state change is journaled before the answer leaves."""
        if method == WAIT_METHOD:
            return self.wait_for_block(*params)
        if method == "eth_sendRawTransaction" and params:
            self._recover_sender_early(params[0])
        with self.lock:
            started = time.perf_counter()
            result = self.transfers(*params) if method == TRANSFERS_METHOD else super().rpc(method, params)
            count, seconds = self.calls.get(method, (0, 0.0))
            self.calls[method] = (count + 1, seconds + time.perf_counter() - started)
            if method in JOURNALED_METHODS or method.startswith("evm_"):
                self.journal.write(json.dumps([method, params]) + "\n")
                self.journal.flush()
                with self.mined:
                    self.head = self._head()
                    self.mined.notify_all()
            return result

    def _recover_sender_early(self, raw: str) -> None:
        """Recover a raw transaction's sender before the chain lock is taken (_recover_once remembers it).

        The chain answers one call at a time; the recovery is most of what validating a transaction
        costs and needs no chain state, so done here it no longer holds up every other caller. The
        decoder is the chain's own (its one fork, Prague, never changes). A malformed transaction is
        left for the chain to refuse, under the lock, as it always did.
        """
        try:
            self._transaction_builder.decode(bytes.fromhex(raw.removeprefix("0x"))).sender
        except Exception:  # noqa: BLE001 - refused, with the node's own message, by the chain itself
            pass

    def _head(self) -> int:
        """The number of the latest mined block."""
        return self.tester.backend.chain.get_canonical_head().block_number

    def wait_for_block(self, after: int, timeout_s: float) -> int:
        """The head block number as soon as it is past `after`, or when timeout_s has passed."""
        with self.mined:
            self.mined.wait_for(lambda: self.head > after, timeout=min(float(timeout_s), MAX_WAIT_S))
            return self.head

    def transfers(self, first: int, last: int) -> list[dict]:
        """Every ETH and token transfer mined in blocks first..last, read from the chain's own records.

        What a deposit watcher gets from eth_getBlockByNumber and eth_getLogs, for a fraction of
        their cost (eth-tester formats whole blocks and scans for logs), with each transfer's status.
        """
        chain = self.tester.backend.chain
        found = []
        for number in range(first, last + 1):
            block = chain.get_canonical_block_by_number(number)
            for tx, receipt in zip(block.transactions, block.get_receipts(chain.chaindb)):
                status = 1 if receipt.state_root == b"\x01" else 0  # post-Byzantium receipts: 1 is success
                if tx.value and tx.to:
                    found.append({"to": "0x" + tx.to.hex(), "value": hex(tx.value), "token": None, "status": status})
                found += [{"to": "0x" + entry.topics[2].to_bytes(32, "big")[-20:].hex(),
                           "value": hex(int.from_bytes(entry.data, "big")), "token": "0x" + entry.address.hex(),
                           "status": status}
                          for entry in receipt.logs if len(entry.topics) == 3 and entry.topics[0] == TRANSFER_EVENT]
        return found

    def save_snapshot(self) -> None:
        """Write the whole chain database, then empty the journal it makes redundant."""
        with self.lock:
            store = self.tester.backend.chain.chaindb.db.wrapped_db.kv_store
            write_atomically(self.folder / "chain.pickle", pickle.dumps(dict(store)))
            (self.folder / "journal.jsonl").write_text("")



def serve_chain(args: argparse.Namespace) -> None:
    """Serve the durable chain over JSON-RPC and publish its accounts in info.json."""
    folder = Path(args.state)
    folder.mkdir(parents=True, exist_ok=True)
    _index_transaction_lookups()
    decide_ecc_backend_once()  # fastecdsa's arithmetic for every sender recovery (ecc.py)
    use_openssl_keccak_once()  # OpenSSL's Keccak-256 for every trie node py-evm hashes (ecc.py)
    _recover_once()
    chain = DurableChain(folder)
    server = chain.serve_json_rpc(args.port)
    write_atomically(folder / "info.json", json.dumps({
        "rpc_url": server.url, "chain_id": chain.chain_id, "funder": chain.funder,
        "funder_private_key": chain.tester.backend.account_keys[0].to_hex(),  # eth-tester's well-known test key
        "host_address": chain.host_address, "host_private_key": chain.host_private_key,
        "tokens": {t.symbol.lower(): {"address": t.address, "decimals": t.decimals} for t in (chain.usdt, chain.dai)},
    }).encode())
    log.info("chain serving on %s, block %d", server.url, chain.w3.eth.block_number)
    threading.Thread(target=_log_call_times, args=(chain,), name="call-times", daemon=True).start()
    try:
        wait_for_termination()
    finally:
        # The snapshot first: calls that still arrive are journaled after it, so whatever stops the
        # server next (or a SIGKILL while it does) loses nothing.
        started = time.monotonic()
        chain.save_snapshot()
        log.info("snapshot written in %.1f s", time.monotonic() - started)
        server.stop()


def _log_call_times(chain, every_s: float = 30.0) -> None:
    """Log, while the chain is busy, which JSON-RPC methods took its time (it answers one call at a time)."""
    last: dict = {}
    while True:
        time.sleep(every_s)
        totals = {method: tuple(numbers) for method, numbers in chain.calls.items()}
        if totals != last:
            busiest = sorted(totals.items(), key=lambda item: -item[1][1])[:8]
            log.info("JSON-RPC time so far: %s", ", ".join(f"{m} {n}x {s:.1f}s" for m, (n, s) in busiest))
            last = totals
