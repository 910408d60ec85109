"""A real Ethereum chain inside the test process, for the host-wallet service (GCHostPay3) and the stack.

`LocalChain` is eth-tester on py-evm (a real EVM: signatures, nonces, gas, balances, receipts)
behind web3 v8's `EthereumTesterProvider`. It comes with:

* a host wallet: a key generated for this chain only (never a real key), funded with ETH;
* two test ERC-20s deployed from shared/testing/contracts/TestToken.json (`tools/compile-contracts`
  builds it from TestToken.sol): `usdt` with 6 decimals and `dai` with 18, both minted to the host
  wallet; `deploy_token` adds more (e.g. a USDC-like one);
* mining control: transactions are mined as they arrive; inside `mining_paused()` they wait in
  the pool (a broadcast transfer not yet confirmed) until `mine()`;
* `serve_json_rpc(port)`: the same chain over HTTP JSON-RPC on 127.0.0.1, so a service in another
  process can use it through ETHEREUM_RPC_URL (web3's HTTPProvider works against it);
* over JSON-RPC, a raw transaction whose nonce is ahead of its sender's next one waits, as in a real
  node's "queued" pool (geth), until the transactions before it arrive, and is then mined in nonce
  order; eth-tester alone refuses it. Concurrent senders that sign in nonce order do not always
  broadcast in that order, and a real node accepts that.

Chain id: eth-tester's 131277322940537, deliberately not mainnet's 1. Note that eth-tester's
"pending" transaction count does not include transactions waiting in its pool.

    python -m telepay_shared.testing.evm --port 8545   # serve a fresh chain; prints its accounts as JSON
"""
from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_tester import EthereumTester, PyEVMBackend
from eth_utils import keccak
from web3 import EthereumTesterProvider, Web3

CONTRACTS_DIR = Path(__file__).resolve().parent.parent.parent / "testing" / "contracts"
TOKEN_ARTEFACT = CONTRACTS_DIR / "TestToken.json"
LOOPBACK = "127.0.0.1"
ETHER = 10**18
DEFAULT_HOST_ETH = 100 * ETHER
DEFAULT_HOST_TOKENS = 1_000_000  # whole tokens minted to the host wallet per test token

# JSON-RPC "server error" code that geth uses for transaction rejections.
_SERVER_ERROR = -32000
_NONCE_REFUSED = re.compile(r"Expected (\d+), but got (\d+)")  # eth-tester's "Invalid transaction nonce"


@dataclass(frozen=True)
class Token:
    """A test ERC-20 deployed on a LocalChain."""

    symbol: str
    address: str  # checksummed
    decimals: int

    def units(self, whole: int | str) -> int:
        """Base units of an amount given in whole tokens (an int, or a decimal string)."""
        integer, _, fraction = str(whole).partition(".")
        if len(fraction) > self.decimals:
            raise ValueError(f"{whole} has more than {self.decimals} decimals")
        return int(integer + fraction.ljust(self.decimals, "0"))


def token_artefact() -> dict:
    """The compiled TestToken (ABI, bytecode and the sha256 of the source it was built from)."""
    return json.loads(TOKEN_ARTEFACT.read_text())


class LocalChain:
    """An in-process EVM chain with a funded host wallet and test tokens (module docstring)."""

    def __init__(self, *, host_eth_wei: int = DEFAULT_HOST_ETH, with_tokens: bool = True):
        self.tester = EthereumTester(PyEVMBackend())
        self.w3 = Web3(EthereumTesterProvider(self.tester))
        self.lock = threading.RLock()  # eth-tester is not thread-safe; the JSON-RPC server shares it
        self.funder = self.w3.eth.accounts[0]  # pre-funded and unlocked by eth-tester
        self.host = Account.create()
        self._artefact = token_artefact()
        self._mining_paused = False
        self._queued: dict[tuple[bytes, int], str] = {}  # (sender, nonce) -> raw transaction waiting for its turn
        if host_eth_wei:
            self.send_eth(self.host.address, host_eth_wei)
        self.usdt = self.deploy_token("USDT", 6) if with_tokens else None
        self.dai = self.deploy_token("DAI", 18) if with_tokens else None

    # ------------------------------------------------------------------ accounts and balances

    @property
    def chain_id(self) -> int:
        """The chain id the node reports."""
        return self.w3.eth.chain_id

    @property
    def host_address(self) -> str:
        """Checksummed address of the host wallet."""
        return self.host.address

    @property
    def host_private_key(self) -> str:
        """The host wallet's throwaway private key, 0x-hex, as HOST_WALLET_PRIVATE_KEY takes it."""
        return self.host.key.to_0x_hex()

    def eth_balance(self, address: str) -> int:
        """Wei held by an address in the latest block."""
        return self.w3.eth.get_balance(Web3.to_checksum_address(address))

    def nonce(self, address: str) -> int:
        """Transactions mined from an address (its next nonce in the latest block)."""
        return self.w3.eth.get_transaction_count(Web3.to_checksum_address(address), "latest")

    def send_eth(self, to: str, wei: int) -> dict:
        """Send wei from the pre-funded account and return the receipt."""
        tx_hash = self.w3.eth.send_transaction({"from": self.funder, "to": Web3.to_checksum_address(to), "value": wei})
        return self.w3.eth.get_transaction_receipt(tx_hash)

    def drain_host_eth(self, keep_wei: int = 0) -> None:
        """Move the host wallet's ETH (all but keep_wei and the gas) back to the funder."""
        gas_price = 2 * self.w3.eth.get_block("latest")["baseFeePerGas"]
        value = self.eth_balance(self.host_address) - keep_wei - 21000 * gas_price
        signed = self.host.sign_transaction({
            "to": self.funder, "value": value, "gas": 21000, "maxFeePerGas": gas_price,
            "maxPriorityFeePerGas": 0, "nonce": self.w3.eth.get_transaction_count(self.host_address, "pending"),
            "chainId": self.chain_id, "type": 2,
        })
        self.w3.eth.send_raw_transaction(signed.raw_transaction)

    # ------------------------------------------------------------------ tokens

    def deploy_token(self, symbol: str, decimals: int, *, mint_whole: int = DEFAULT_HOST_TOKENS) -> Token:
        """Deploy a TestToken and mint mint_whole tokens to the host wallet."""
        factory = self.w3.eth.contract(abi=self._artefact["abi"], bytecode=self._artefact["bytecode"])
        tx_hash = factory.constructor(f"Test {symbol}", symbol, decimals).transact({"from": self.funder})
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)
        token = Token(symbol, receipt["contractAddress"], decimals)
        if mint_whole:
            self.mint(token, self.host_address, mint_whole * 10**decimals)
        return token

    def contract(self, token: Token):
        """A web3 contract object for the token."""
        return self.w3.eth.contract(address=token.address, abi=self._artefact["abi"])

    def mint(self, token: Token, to: str, units: int) -> None:
        """Mint base units of the token to an address."""
        self.contract(token).functions.mint(Web3.to_checksum_address(to), units).transact({"from": self.funder})

    def token_balance(self, token: Token, address: str) -> int:
        """Base units of the token held by an address."""
        return self.contract(token).functions.balanceOf(Web3.to_checksum_address(address)).call()

    def set_blocked(self, token: Token, address: str, blocked: bool = True) -> None:
        """Make every transfer to or from the address revert (USDT-style blacklist)."""
        self.contract(token).functions.setBlocked(Web3.to_checksum_address(address), blocked).transact(
            {"from": self.funder})

    # ------------------------------------------------------------------ mining

    @contextmanager
    def mining_paused(self) -> Iterator[LocalChain]:
        """Keep broadcast transactions in the pool until mine() (or the block ends, which mines them)."""
        self.tester.disable_auto_mine_transactions()
        self._mining_paused = True
        try:
            yield self
        finally:
            self._mining_paused = False
            self.tester.enable_auto_mine_transactions()  # mines whatever is still pending

    def mine(self, blocks: int = 1) -> None:
        """Mine blocks now, including every pending transaction."""
        self.tester.mine_blocks(blocks)

    # ------------------------------------------------------------------ JSON-RPC over HTTP

    def rpc(self, method: str, params: list) -> Any:
        """Answer one JSON-RPC call from the chain, with results in JSON-RPC's hex form."""
        with self.lock:
            if method == "eth_sendRawTransaction" and params and isinstance(params[0], str):
                return self._send_raw(params[0])
            return self._call(method, params)

    def _call(self, method: str, params: list) -> Any:
        """One call to eth-tester (under the lock)."""
        response = self.w3.provider.request_func(self.w3, self.w3.middleware_onion)(method, params)
        if "error" in response:
            raise RpcError(response["error"].get("code", _SERVER_ERROR), response["error"].get("message", ""))
        return to_json_rpc(response.get("result"))

    def _send_raw(self, raw: str) -> str:
        """Take a raw transaction as a node does: one ahead of its sender's nonce waits (module docstring)."""
        try:
            tx_hash = self._call("eth_sendRawTransaction", [raw])
        except Exception as exc:
            refused = _NONCE_REFUSED.search(str(exc))
            if refused is None or int(refused[2]) <= int(refused[1]):
                raise  # not a nonce ahead (a nonce already used is refused, as geth refuses it)
            return self._queue(raw)
        if self._queued:
            self._release_queued(raw)
        return tx_hash

    def _decode(self, raw: str):
        """The signed transaction in raw (its sender recovered by py-evm)."""
        builder = self.tester.backend.chain.get_vm().get_transaction_builder()
        return builder.decode(bytes.fromhex(raw.removeprefix("0x")))

    def _queue(self, raw: str) -> str:
        """Keep a transaction whose nonce is ahead until the gap before it is filled; its hash."""
        transaction = self._decode(raw)
        key = (transaction.sender, transaction.nonce)
        if key in self._queued:
            # geth's answers: the same bytes again, or another transaction for a nonce already taken.
            raise RpcError(_SERVER_ERROR, "already known" if self._queued[key] == raw
                           else "replacement transaction underpriced")
        self._queued[key] = raw
        return "0x" + keccak(bytes.fromhex(raw.removeprefix("0x"))).hex()

    def _release_queued(self, sent: str) -> None:
        """After a transaction is mined, mine the sender's queued transactions that now follow on."""
        transaction = self._decode(sent)
        sender, nonce = transaction.sender, transaction.nonce + 1
        while (raw := self._queued.pop((sender, nonce), None)) is not None:
            try:
                self._call("eth_sendRawTransaction", [raw])
            except Exception:  # noqa: BLE001 - a node drops a queued transaction that turns out invalid
                return
            nonce += 1

    def serve_json_rpc(self, port: int = 0) -> JsonRpcServer:
        """Serve this chain over HTTP JSON-RPC on 127.0.0.1:port (0: a free port) in a daemon thread."""
        return JsonRpcServer(self, port).start()


class RpcError(Exception):
    """A JSON-RPC error object: code and message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def to_json_rpc(value: Any) -> Any:
    """Turn eth-tester's Python values into JSON-RPC's encoding: quantities and bytes as 0x-hex."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {key: to_json_rpc(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_rpc(item) for item in value]
    return str(value)


class _RpcHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection to the chain: POSTed JSON-RPC calls, answered on the same connection.

    Keep-alive matters: werkzeug's server closes every connection, so each call paid a TCP
    connect and a new server thread, on both sides, several times per payment. On a kept-alive
    connection the answer must leave in one piece: headers and body written apart wait for the
    client's delayed ACK (Nagle), 40 ms per call. So the answer is buffered (flushed whole after each
    request) and Nagle is off.
    """

    protocol_version = "HTTP/1.1"
    wbufsize = -1  # buffered: headers and body leave together at the flush that ends each request
    disable_nagle_algorithm = True
    server: _RpcHttpServer

    def do_POST(self) -> None:
        """A JSON-RPC call or a batch of them; the answer carries its length, so the connection stays open."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = json.dumps(self.server.rpc_server.answer_body(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        """No access-log line per call."""


class _RpcHttpServer(ThreadingHTTPServer):
    """A thread per connection (a long poll holds only its own), daemon threads, the port reusable at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, rpc_server: JsonRpcServer):
        super().__init__((LOOPBACK, port), _RpcHandler)
        self.rpc_server = rpc_server


class JsonRpcServer:
    """A LocalChain behind HTTP JSON-RPC 2.0 (single and batch calls) on the loopback interface."""

    def __init__(self, chain: LocalChain, port: int = 0):
        self.chain = chain
        self._server = _RpcHttpServer(port, self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to give web3's HTTPProvider (ETHEREUM_RPC_URL)."""
        return f"http://{LOOPBACK}:{self._server.server_port}"

    def start(self) -> JsonRpcServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> JsonRpcServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def answer_body(self, body: bytes) -> Any:
        """The response to one HTTP body: a call or a batch of them."""
        try:
            payload = json.loads(body)
        except ValueError:
            return _rpc_error(None, -32700, "parse error")
        return [self._answer(call) for call in payload] if isinstance(payload, list) else self._answer(payload)

    def _answer(self, call: Any) -> dict:
        """The response object for one call; chain rejections become JSON-RPC errors, as a node sends them."""
        if not isinstance(call, dict) or not isinstance(call.get("method"), str):
            return _rpc_error(None, -32600, "invalid request")
        try:
            result = self.chain.rpc(call["method"], list(call.get("params") or []))
        except RpcError as exc:
            return _rpc_error(call.get("id"), exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - every chain rejection is answered, as a node does
            return _rpc_error(call.get("id"), _SERVER_ERROR, str(exc) or type(exc).__name__)
        return {"jsonrpc": "2.0", "id": call.get("id"), "result": result}


def _rpc_error(call_id: Any, code: int, message: str) -> dict:
    """A JSON-RPC 2.0 error response."""
    return {"jsonrpc": "2.0", "id": call_id, "error": {"code": code, "message": message}}


def main(argv: list[str] | None = None) -> int:
    """Serve a fresh LocalChain until interrupted; print its endpoint, host wallet and tokens as JSON."""
    parser = argparse.ArgumentParser(description="an in-process test chain over HTTP JSON-RPC (test keys only)")
    parser.add_argument("--port", type=int, default=8545)
    args = parser.parse_args(argv)
    chain = LocalChain()
    server = chain.serve_json_rpc(args.port)
    print(json.dumps({
        "rpc_url": server.url, "chain_id": chain.chain_id, "host_address": chain.host_address,
        "host_private_key": chain.host_private_key,
        "tokens": {t.symbol: {"address": t.address, "decimals": t.decimals} for t in (chain.usdt, chain.dai)},
    }), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
