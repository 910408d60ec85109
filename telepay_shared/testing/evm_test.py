"""The in-process test chain: wallet, tokens, mining control and the JSON-RPC endpoint over HTTP."""
from __future__ import annotations

import hashlib
import http.client
import json

import pytest
import requests
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3RPCError

from telepay_shared.testing.evm import CONTRACTS_DIR, ETHER, LocalChain, Token, token_artefact

TRANSFER_GAS = 100_000


@pytest.fixture(scope="module")
def chain():
    return LocalChain()


def signed_transfer(chain: LocalChain, w3: Web3, to: str, *, value=0, data="0x", gas=21000, nonce=None):
    """A host-wallet EIP-1559 transaction signed offline, as GCHostPay3 signs its transfers."""
    base_fee = w3.eth.get_block("latest")["baseFeePerGas"]
    return chain.host.sign_transaction({
        "to": to, "value": value, "data": data, "gas": gas, "type": 2, "chainId": w3.eth.chain_id,
        "maxFeePerGas": 2 * base_fee + 10**9, "maxPriorityFeePerGas": 10**9,
        "nonce": w3.eth.get_transaction_count(chain.host_address, "pending") if nonce is None else nonce,
    })


def transfer_data(chain: LocalChain, token: Token, to: str, units: int) -> str:
    return chain.contract(token).encode_abi("transfer", args=[to, units])


def test_committed_artefact_was_compiled_from_the_committed_source():
    source = (CONTRACTS_DIR / "TestToken.sol").read_bytes()
    artefact = token_artefact()
    assert artefact["sourceSha256"] == hashlib.sha256(source).hexdigest(), "run tools/compile-contracts"
    assert artefact["bytecode"].startswith("0x6") and {"transfer", "balanceOf", "decimals"} <= {
        item.get("name") for item in artefact["abi"]}


def test_host_wallet_is_funded_and_tokens_have_their_decimals(chain):
    assert chain.chain_id != 1
    assert chain.eth_balance(chain.host_address) == 100 * ETHER
    assert Web3.is_checksum_address(chain.host_address)
    for token, decimals in ((chain.usdt, 6), (chain.dai, 18)):
        assert token.decimals == decimals
        assert chain.contract(token).functions.decimals().call() == decimals
        assert chain.token_balance(token, chain.host_address) == 1_000_000 * 10**decimals


def test_token_units_are_exact_and_refuse_excess_decimals():
    usdt = Token("USDT", "0x" + "11" * 20, 6)
    assert usdt.units("12.345678") == 12_345_678 and usdt.units(3) == 3_000_000
    with pytest.raises(ValueError):
        usdt.units("0.0000001")


def test_a_transfer_to_a_blocked_address_is_mined_and_reverts(chain):
    payin = "0x" + "ab" * 20
    to = Web3.to_checksum_address(payin)
    chain.set_blocked(chain.usdt, to)
    signed = signed_transfer(chain, chain.w3, chain.usdt.address, data=transfer_data(chain, chain.usdt, to, 5),
                             gas=TRANSFER_GAS)
    receipt = chain.w3.eth.get_transaction_receipt(chain.w3.eth.send_raw_transaction(signed.raw_transaction))
    assert receipt["status"] == 0
    assert chain.token_balance(chain.usdt, to) == 0
    chain.set_blocked(chain.usdt, to, False)


def test_paused_mining_keeps_the_transaction_pending_until_mined():
    chain = LocalChain(with_tokens=False)
    payin = Web3.to_checksum_address("0x" + "cd" * 20)
    with chain.mining_paused():
        tx_hash = chain.w3.eth.send_raw_transaction(signed_transfer(chain, chain.w3, payin, value=7).raw_transaction)
        with pytest.raises(TransactionNotFound):
            chain.w3.eth.get_transaction_receipt(tx_hash)
        assert chain.w3.eth.get_transaction(tx_hash)["blockNumber"] is None  # the node knows it
        chain.mine()
        assert chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
    assert chain.eth_balance(payin) == 7


def test_web3_http_provider_sends_a_transaction_through_the_json_rpc_server():
    chain = LocalChain()
    payin = Web3.to_checksum_address("0x" + "ef" * 20)
    with chain.serve_json_rpc() as server:
        remote = Web3(Web3.HTTPProvider(server.url, request_kwargs={"timeout": 10}))
        assert remote.is_connected() and remote.eth.chain_id == chain.chain_id
        signed = signed_transfer(chain, remote, payin, value=ETHER // 1000)
        tx_hash = remote.eth.send_raw_transaction(signed.raw_transaction)
        receipt = remote.eth.wait_for_transaction_receipt(tx_hash, timeout=5)
        assert (receipt["status"], receipt["gasUsed"], receipt["transactionHash"]) == (1, 21000, signed.hash)
        assert remote.eth.get_balance(payin) == ETHER // 1000 == chain.eth_balance(payin)
        assert remote.eth.get_transaction_count(chain.host_address) == 1
        # A token transfer and a contract call over HTTP too.
        data = transfer_data(chain, chain.dai, payin, 25 * 10**17)
        remote.eth.send_raw_transaction(signed_transfer(chain, remote, chain.dai.address, data=data,
                                                        gas=TRANSFER_GAS).raw_transaction)
        token = remote.eth.contract(address=chain.dai.address, abi=token_artefact()["abi"])
        assert token.functions.balanceOf(payin).call() == 25 * 10**17
        fee_history = remote.eth.fee_history(1, "latest", [50])
        assert fee_history["baseFeePerGas"][-1] > 0
        # The node's rejection of a replayed transaction reaches the client as a JSON-RPC error.
        with pytest.raises(Web3RPCError, match="nonce"):
            remote.eth.send_raw_transaction(signed.raw_transaction)
        with pytest.raises(TransactionNotFound):
            remote.eth.get_transaction_receipt("0x" + "00" * 32)


def test_a_transaction_ahead_of_its_nonce_waits_for_the_ones_before_it_as_in_a_node_pool():
    """Signed in nonce order, broadcast out of order: a node queues the later one until the gap is filled."""
    chain = LocalChain(with_tokens=False)
    payins = [Web3.to_checksum_address("0x" + f"{n:02x}" * 20) for n in (0x11, 0x22, 0x33)]
    with chain.serve_json_rpc() as server:
        remote = Web3(Web3.HTTPProvider(server.url, request_kwargs={"timeout": 10}))
        signed = [signed_transfer(chain, remote, payin, value=1000 + n, nonce=n) for n, payin in enumerate(payins)]
        later = [remote.eth.send_raw_transaction(signed[n].raw_transaction) for n in (2, 1)]
        assert later == [signed[2].hash, signed[1].hash]  # accepted, as a node answers, with their hashes
        assert chain.nonce(chain.host_address) == 0 and chain.eth_balance(payins[2]) == 0  # waiting, not mined
        with pytest.raises(TransactionNotFound):
            remote.eth.get_transaction_receipt(signed[2].hash)
        with pytest.raises(Web3RPCError, match="already known"):  # the same bytes again
            remote.eth.send_raw_transaction(signed[2].raw_transaction)
        other = signed_transfer(chain, remote, payins[0], value=5, nonce=2)
        with pytest.raises(Web3RPCError, match="replacement transaction underpriced"):
            remote.eth.send_raw_transaction(other.raw_transaction)
        remote.eth.send_raw_transaction(signed[0].raw_transaction)  # the gap is filled: all three are mined
        assert chain.nonce(chain.host_address) == 3
        assert [chain.eth_balance(payin) for payin in payins] == [1000, 1001, 1002]
        assert [remote.eth.get_transaction_receipt(s.hash)["status"] for s in signed] == [1, 1, 1]
        with pytest.raises(Web3RPCError, match="nonce"):  # a nonce already used is still refused
            remote.eth.send_raw_transaction(other.raw_transaction)


def test_json_rpc_server_answers_batches_and_malformed_requests():
    chain = LocalChain(with_tokens=False)
    with chain.serve_json_rpc() as server:
        batch = requests.post(server.url, json=[
            {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            {"jsonrpc": "2.0", "id": 2, "method": "eth_noSuchMethod", "params": []},
        ], timeout=5).json()
        assert batch[0] == {"jsonrpc": "2.0", "id": 1, "result": hex(chain.chain_id)}
        assert batch[1]["id"] == 2 and "Unknown RPC Endpoint" in batch[1]["error"]["message"]
        assert requests.post(server.url, data=b"{", timeout=5).json()["error"]["code"] == -32700
        assert requests.post(server.url, json={"id": 3}, timeout=5).json()["error"]["code"] == -32600


def test_json_rpc_server_answers_many_calls_on_one_kept_alive_connection():
    """A node keeps the connection (a connect and a server thread per call cost the stack dearly)."""
    chain = LocalChain(with_tokens=False)
    with chain.serve_json_rpc() as server:
        connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=5)
        for call_id in range(3):
            connection.request("POST", "/", body=json.dumps({"jsonrpc": "2.0", "id": call_id, "method": "eth_chainId"}),
                               headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            assert answer.getheader("Connection") != "close"
            assert json.loads(answer.read()) == {"jsonrpc": "2.0", "id": call_id, "result": hex(chain.chain_id)}
        connection.close()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
