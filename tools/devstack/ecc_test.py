"""FastECCBackend is eth_keys' native backend, faster: the same signatures, recoveries, verdicts and
refusals on random keys and hashes; installed, eth_account signs and the chain recovers with it."""
from __future__ import annotations

import importlib.util
import logging
import sys
from types import SimpleNamespace

import pytest
from eth_account import Account
from eth_keys import backends as ecc_backends
from eth_keys import keys
from eth_keys.backends import NativeECCBackend
from eth_keys.constants import SECPK1_N as N
from eth_keys.constants import SECPK1_P as P
from eth_keys.exceptions import BadSignature
from hypothesis import given, settings
from hypothesis import strategies as st

from telepay_shared.testing.evm import ETHER, LocalChain
from tools.devstack import ecc
from tools.devstack.ecc import FastECCBackend

FAST, NATIVE = FastECCBackend(), NativeECCBackend()
# Native arithmetic costs milliseconds per operation, more on a busy machine: no per-example deadline.
settings.register_profile("ecc", deadline=None, max_examples=150)
settings.load_profile("ecc")

private_keys = st.integers(1, N - 1).map(lambda d: keys.PrivateKey(d.to_bytes(32, "big"), backend=NATIVE))
hashes = st.binary(min_size=32, max_size=32)
# r and s at and around every bound a backend checks, and anywhere in 256 bits.
edges = st.sampled_from([0, 1, N - 1, N, N + 1, P - 1, P, P + 1, 2**256 - 1]) | st.integers(0, 2**256 - 1)


def outcome(operation, *args):
    """What an operation gives: ("ok", result) or ("raised", the exception's type)."""
    try:
        return "ok", operation(*args)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return "raised", type(error)


def raw_signature(v: int, r: int, s: int) -> SimpleNamespace:
    """A signature as a backend reads it (vrs, rs), without eth_keys' range checks: what each backend
    itself refuses."""
    return SimpleNamespace(vrs=(v, r, s), rs=(r, s))


@given(private_keys, hashes)
def test_signatures_are_natives_byte_for_byte(private_key, message_hash):
    """v in {0, 1}, r and low s are native's, recoverable or not."""
    signature = FAST.ecdsa_sign(message_hash, private_key)
    assert signature.to_bytes() == NATIVE.ecdsa_sign(message_hash, private_key).to_bytes()
    assert signature.v in (0, 1) and 2 * signature.s < N
    assert (FAST.ecdsa_sign_non_recoverable(message_hash, private_key).to_bytes()
            == NATIVE.ecdsa_sign_non_recoverable(message_hash, private_key).to_bytes())


@given(private_keys, hashes)
def test_recovery_finds_natives_public_key(private_key, message_hash):
    """The public key recovered from a signature is the signer's, as native recovers it."""
    signature = NATIVE.ecdsa_sign(message_hash, private_key)
    recovered = FAST.ecdsa_recover(message_hash, signature)
    assert recovered.to_bytes() == NATIVE.ecdsa_recover(message_hash, signature).to_bytes()
    assert recovered == private_key.public_key


@given(private_keys)
def test_public_keys_are_natives(private_key):
    """A private key's public key, and its compressed form both ways."""
    public_key = FAST.private_key_to_public_key(private_key)
    assert public_key.to_bytes() == NATIVE.private_key_to_public_key(private_key).to_bytes()
    compressed = FAST.compress_public_key_bytes(public_key.to_bytes())
    assert compressed == private_key.public_key.to_compressed_bytes()
    assert FAST.decompress_public_key_bytes(compressed) == public_key.to_bytes()


@given(st.sampled_from([0, N, N + 1, 2**256 - 1]) | st.integers(0, 2**256 - 1))
def test_out_of_range_private_keys_are_treated_as_native_treats_them(number):
    """Below eth_keys' own checks: 0 maps to (0, 0), n and above are refused with native's exception."""
    private_key = SimpleNamespace(to_bytes=lambda: number.to_bytes(32, "big"))
    fast = outcome(lambda: FAST.private_key_to_public_key(private_key).to_bytes())
    assert fast == outcome(lambda: NATIVE.private_key_to_public_key(private_key).to_bytes())
    assert (fast[0] == "raised") == (number >= N)


@given(private_keys, hashes, st.sampled_from(["nothing", "hash", "r", "s", "key", "key bit"]),
       st.integers(0, 511),
       private_keys)
def test_verify_agrees_with_native_on_valid_and_tampered_signatures(private_key, message_hash, tampered, bit,
                                                                   other_key):
    """A signature verifies for its own hash and key only (not for a point off the curve either); native
    says the same every time."""
    v, r, s = NATIVE.ecdsa_sign(message_hash, private_key).vrs
    public_key = private_key.public_key
    if tampered == "hash":
        message_hash = (int.from_bytes(message_hash, "big") ^ 1 << bit % 256).to_bytes(32, "big")
    elif tampered == "r":
        r ^= 1 << bit % 256
    elif tampered == "s":
        s ^= 1 << bit % 256
    elif tampered == "key" and other_key != private_key:
        public_key = other_key.public_key
    elif tampered == "key bit":  # x or y changed: almost surely no longer a point of the curve
        public_key = keys.PublicKey((int.from_bytes(public_key.to_bytes(), "big") ^ 1 << bit).to_bytes(64, "big"))
    else:
        tampered = "nothing"
    signature = raw_signature(v, r, s)
    verdict = FAST.ecdsa_verify(message_hash, signature, public_key)
    assert verdict == NATIVE.ecdsa_verify(message_hash, signature, public_key)
    assert verdict == (tampered == "nothing")


@given(st.integers(-3, 40), edges, edges, hashes, private_keys)
def test_invalid_signatures_are_refused_as_native_refuses_them(v, r, s, message_hash, private_key):
    """Any v, r and s: recovery gives native's key or raises native's exception; verify, native's verdict."""
    signature = raw_signature(v, r, s)
    recovered = outcome(lambda: FAST.ecdsa_recover(message_hash, signature).to_bytes())
    assert recovered == outcome(lambda: NATIVE.ecdsa_recover(message_hash, signature).to_bytes())
    if v not in (0, 1) or r % N == 0 or s % N == 0:
        assert recovered[0] == "raised"
    public_key = private_key.public_key
    verdict = FAST.ecdsa_verify(message_hash, signature, public_key)
    assert verdict == NATIVE.ecdsa_verify(message_hash, signature, public_key)
    assert not verdict or (r % N and s % N)


@given(private_keys, st.integers(1, N - 1))
def test_a_signature_that_recovers_to_no_key_is_refused_as_native_refuses_it(nonce_key, s):
    """R = k*G with a hash z = s*k: s*R - z*G is the point at infinity, no public key."""
    k = int.from_bytes(nonce_key.to_bytes(), "big")
    x, y = (int.from_bytes(half, "big") for half in (nonce_key.public_key.to_bytes()[:32],
                                                      nonce_key.public_key.to_bytes()[32:]))
    message_hash = (s * k % N).to_bytes(32, "big")
    signature = raw_signature(y % 2, x, s)
    refused = outcome(FAST.ecdsa_recover, message_hash, signature)
    assert refused == outcome(NATIVE.ecdsa_recover, message_hash, signature) == ("raised", BadSignature)


@given(private_keys, hashes, st.sampled_from([0, N, 2**256 - 1]), st.sampled_from(["r", "s"]))
def test_eth_keys_refuses_what_its_checks_refuse_with_either_backend(private_key, message_hash, bad, which):
    """Through eth_keys' API an r or s of 0 is the backend's to refuse, n or more eth_keys' own: same
    exception types with either backend."""
    v, r, s = NATIVE.ecdsa_sign(message_hash, private_key).vrs
    vrs = (v, bad, s) if which == "r" else (v, r, bad)

    def recover(backend):
        return keys.Signature(vrs=vrs, backend=backend).recover_public_key_from_msg_hash(message_hash)

    assert outcome(recover, FAST)[0] == "raised"
    assert outcome(recover, FAST) == outcome(recover, NATIVE)


@pytest.fixture
def process_backend(monkeypatch):
    """eth_keys' process-wide choice as a test found it, put back after the test; decided afresh."""
    monkeypatch.setattr(ecc_backends, "get_backend", ecc_backends.get_backend)
    monkeypatch.setattr(ecc_backends, "is_coincurve_available", ecc_backends.is_coincurve_available)
    ecc.decide_ecc_backend_once.cache_clear()
    yield
    ecc.decide_ecc_backend_once.cache_clear()


def test_installed_eth_account_signs_and_the_chain_recovers_with_it(process_backend, monkeypatch, caplog):
    """Installed: eth_account's signature is native's byte for byte, and the chain accepts the
    transaction and recovers its sender with the fast backend."""
    with caplog.at_level(logging.INFO, logger="devstack.ecc"):
        assert ecc.decide_ecc_backend_once() == "FastECCBackend"
        ecc.decide_ecc_backend_once()
    assert [record.getMessage() for record in caplog.records] == ["eth_keys ECC backend: FastECCBackend"]
    chain = LocalChain(host_eth_wei=0, with_tokens=False)
    sender = Account.create()
    chain.send_eth(sender.address, ETHER)
    transaction = {"to": chain.funder, "value": 12345, "gas": 21000, "maxFeePerGas": 10**11,
                   "maxPriorityFeePerGas": 10**9, "nonce": 0, "chainId": chain.chain_id, "type": 2}
    signed = Account.sign_transaction(transaction, sender.key)
    assert isinstance(Account.from_key(sender.key)._key_obj.backend, FastECCBackend)
    natively = Account.sign_transaction(transaction, keys.PrivateKey(bytes(sender.key), backend=NATIVE))
    assert signed.raw_transaction == natively.raw_transaction

    recoveries = []
    recover = FastECCBackend.ecdsa_recover
    monkeypatch.setattr(FastECCBackend, "ecdsa_recover", lambda self, *args: recoveries.append(1) or recover(self, *args))
    tx_hash = chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    assert chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
    assert chain.w3.eth.get_transaction(tx_hash)["from"] == sender.address
    assert recoveries  # py-evm recovered the sender through the fast backend


def test_without_fastecdsa_the_default_backend_stays(process_backend, monkeypatch, caplog):
    """fastecdsa not importable: eth_keys' default backend, coincurve looked for once, said once."""
    for name in [name for name in sys.modules if name.split(".")[0] == "fastecdsa"] + ["fastecdsa"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    spec = importlib.util.spec_from_file_location("ecc_without_fastecdsa", ecc.__file__)
    without = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(without)
    default = ecc_backends.get_backend_class()  # NativeECCBackend: coincurve has no CPython 3.14 wheel
    with caplog.at_level(logging.INFO, logger="devstack.ecc"):
        assert without.decide_ecc_backend_once() == default.__name__
        without.decide_ecc_backend_once()
    assert [record.getMessage() for record in caplog.records] == [f"eth_keys ECC backend: {default.__name__}"]
    assert hasattr(ecc_backends.is_coincurve_available, "cache_info")
    private_key = keys.PrivateKey(b"\x07" * 32)
    assert type(private_key.backend) is default
    assert private_key.sign_msg_hash(b"\x01" * 32).to_bytes() == FAST.ecdsa_sign(b"\x01" * 32, private_key).to_bytes()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------- Keccak-256

from Crypto.Hash import keccak as cryptodome_keccak  # noqa: E402 - eth-hash's own backend, the reference


def reference_keccak(data: bytes) -> bytes:
    return cryptodome_keccak.new(data=data, digest_bits=256).digest()


@given(st.binary(max_size=600))
def test_openssl_keccak_gives_the_digests_of_eth_hashs_backend(data):
    fast = ecc.openssl_keccak()
    assert fast is not None  # the build environment's OpenSSL (3.6) has KECCAK-256
    assert fast(data) == reference_keccak(data)


def test_installed_every_keccak_user_gets_openssls(monkeypatch):
    from eth_hash.auto import keccak
    from eth_utils import keccak as eth_utils_keccak

    monkeypatch.setattr(keccak, "hasher", keccak.hasher)  # put back after the test
    assert ecc.use_openssl_keccak_once()
    assert keccak.hasher.func is ecc._keccak256
    for data in (b"", b"abc", bytes(range(256)) * 3):
        assert keccak(data) == eth_utils_keccak(data) == reference_keccak(data)
    with pytest.raises(TypeError):  # eth-hash's own input check stays in front
        keccak("not bytes")
    # A chain on it still hashes as Ethereum does: a transfer's hash is the signed bytes' keccak.
    chain = LocalChain(host_eth_wei=ETHER, with_tokens=False)
    signed = Account.from_key(chain.host_private_key).sign_transaction({
        "to": chain.funder, "value": 1, "gas": 21000, "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 0,
        "nonce": 0, "chainId": chain.chain_id, "type": 2})
    tx_hash = chain.rpc("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])
    assert tx_hash == "0x" + reference_keccak(bytes(signed.raw_transaction)).hex()
    assert chain.rpc("eth_getTransactionReceipt", [tx_hash])["status"] == "0x1"


def test_without_openssls_keccak_eth_hashs_backend_stays(monkeypatch):
    from eth_hash.auto import keccak

    def no_keccak(name, *args):
        raise ValueError(f"unsupported hash type {name}")

    monkeypatch.setattr(ecc.hashlib, "new", no_keccak)
    monkeypatch.setattr(keccak, "hasher", keccak.hasher)
    before = keccak.hasher
    assert ecc.openssl_keccak() is None
    assert not ecc.use_openssl_keccak_once()
    assert keccak.hasher is before
