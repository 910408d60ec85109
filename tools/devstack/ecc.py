"""A faster eth_keys ECC backend, and a faster Keccak-256, for the local stack's chain and ChangeNOW
stand-in (issue 5).

Without coincurve (no wheel for CPython 3.14) eth_keys does its secp256k1 arithmetic in pure Python:
~4 ms per sender recovery on the chain and ~1.4 ms per payout signature in the stand-in, for every
payment. `FastECCBackend` is eth_keys' own native backend (eth_keys/backends/native/ecdsa.py) with
each point multiplication and addition done by fastecdsa's compiled secp256k1 instead. Everything
else is the native backend's own code (its deterministic nonce, modular inverse and byte encodings)
or a copy of its formulas (low s, y parity, the checks that refuse a signature, with the same
exceptions), so signatures, recoveries and refusals are the native backend's, byte for byte
(ecc_test.py compares them). Dev-only: the services keep eth_keys' default backend.
"""
from __future__ import annotations

import functools
import hashlib
import logging

from eth_keys import backends as ecc_backends
from eth_keys.backends.base import BaseECCBackend
from eth_keys.backends.native import ecdsa as native
from eth_keys.backends.native.jacobian import inv
from eth_keys.constants import SECPK1_B, SECPK1_N, SECPK1_P
from eth_keys.datatypes import BaseSignature, NonRecoverableSignature, PrivateKey, PublicKey, Signature
from eth_keys.exceptions import BadSignature

try:
    from fastecdsa.curve import secp256k1
    from fastecdsa.point import Point
except ImportError:  # the processes still work, on eth_keys' pure-Python backend (decide_ecc_backend_once)
    secp256k1 = Point = None

N, P = SECPK1_N, SECPK1_P

log = logging.getLogger("devstack.ecc")


def _affine(point) -> tuple[int, int]:
    """A point's x and y; the point at infinity is (0, 0), as native's from_jacobian makes it
    (fastecdsa's has y = 1)."""
    return (0, 0) if point.z == 0 else (point.x, point.y)


def _sign(msg_hash: bytes, private_key_bytes: bytes) -> tuple[int, int, int]:
    """native.ecdsa_raw_sign: the same k, r = x of k*G (not reduced mod n), low s, v the parity of y
    (flipped with s)."""
    z = int.from_bytes(msg_hash, "big")
    k = native.deterministic_generate_k((z % N).to_bytes(32, "big"), private_key_bytes)
    r, y = _affine(k * secp256k1.G)
    s_raw = inv(k, N) * (z + r * int.from_bytes(private_key_bytes, "big")) % N
    high = s_raw * 2 >= N
    return (y % 2) ^ high, r, N - s_raw if high else s_raw


def _verify(msg_hash: bytes, rs: tuple[int, int], public_key_bytes: bytes) -> bool:
    """native.ecdsa_raw_verify; a public key off the curve verifies nothing (fastecdsa refuses to make
    it a point; native computes with it anyway)."""
    r, s = rs
    try:
        public_key = Point(*native.decode_public_key(public_key_bytes), secp256k1)
    except ValueError:
        return False
    w = inv(s, N)  # 0 for s = 0, as native: then the sum below is the point at infinity, x = 0
    u1, u2 = int.from_bytes(msg_hash, "big") * w % N, r * w % N
    x, _ = _affine(u1 * secp256k1.G + u2 * public_key)
    return bool(r == x and (r % N) and (s % N))


def _recover(msg_hash: bytes, vrs: tuple[int, int, int]) -> bytes:
    """native.ecdsa_raw_recover: the same checks, in the same order, with the same exceptions."""
    v, r, s = vrs
    if v not in (0, 1):
        raise BadSignature(f"value of v, aka y-parity, was {v}, must be either 0 or 1")
    xcubedaxb = (r * r * r + SECPK1_B) % P  # the curve's a is 0
    beta = pow(xcubedaxb, (P + 1) // 4, P)
    y = beta if beta % 2 == v else P - beta  # native's `v % 2 ^ beta % 2` with its v + 27: v is y's parity
    if (xcubedaxb - y * y) % P != 0 or not (r % N) or not (s % N):
        raise BadSignature("Invalid signature")
    z = int.from_bytes(msg_hash, "big")
    point_r = Point(r % P, y, secp256k1)  # native computes mod p: an r >= p stands for r - p
    # Native's Q = r^-1 * (-z*G + s*R), distributed: the same point for two multiplications, not three.
    r_inv = inv(r, N)
    q = (N - z) * r_inv % N * secp256k1.G + s * r_inv % N * point_r
    if q.z == 0:
        raise BadSignature("InvalidSignature")
    return native.encode_raw_public_key(_affine(q))


def _public_key(private_key_bytes: bytes) -> bytes:
    """native.private_key_to_public_key."""
    d = int.from_bytes(private_key_bytes, "big")
    if d >= N:
        raise Exception("Invalid privkey")  # noqa: TRY002 - native's own exception, kept for callers
    return native.encode_raw_public_key(_affine(d * secp256k1.G))


class FastECCBackend(BaseECCBackend):
    """eth_keys' native backend with fastecdsa's point arithmetic (module docstring)."""

    def ecdsa_sign(self, msg_hash: bytes, private_key: PrivateKey) -> Signature:
        """A recoverable signature (v in {0, 1}, low s) of a 32-byte hash."""
        return Signature(vrs=_sign(msg_hash, private_key.to_bytes()), backend=self)

    def ecdsa_sign_non_recoverable(self, msg_hash: bytes, private_key: PrivateKey) -> NonRecoverableSignature:
        """The same signature without v."""
        _, r, s = _sign(msg_hash, private_key.to_bytes())
        return NonRecoverableSignature(rs=(r, s), backend=self)

    def ecdsa_verify(self, msg_hash: bytes, signature: BaseSignature, public_key: PublicKey) -> bool:
        """Whether the signature of the hash is the public key's."""
        return _verify(msg_hash, signature.rs, public_key.to_bytes())

    def ecdsa_recover(self, msg_hash: bytes, signature: Signature) -> PublicKey:
        """The public key that made the signature of the hash; BadSignature when none did."""
        return PublicKey(_recover(msg_hash, signature.vrs), backend=self)

    def private_key_to_public_key(self, private_key: PrivateKey) -> PublicKey:
        """The private key's public key."""
        return PublicKey(_public_key(private_key.to_bytes()), backend=self)

    def decompress_public_key_bytes(self, compressed_public_key_bytes: bytes) -> bytes:
        """native's: a modular square root, no point arithmetic."""
        return native.decompress_public_key(compressed_public_key_bytes)

    def compress_public_key_bytes(self, uncompressed_public_key_bytes: bytes) -> bytes:
        """native's: y's parity and x."""
        return native.compress_public_key(uncompressed_public_key_bytes)


@functools.cache
def decide_ecc_backend_once() -> str:
    """Choose once per process the backend of every eth_keys key operation; its name, logged once.

    eth_account's signing, py-evm's sender recovery and chain.py's _recover_once all get eth_keys'
    backend from eth_keys.backends.get_backend, afresh at every operation: with fastecdsa installed it
    answers FastECCBackend from now on. Without it, the default backend stays, but whether coincurve
    is installed is asked once: eth_keys asks at every operation, and without coincurve (none is built
    for CPython 3.14) the answer is a failed import that searches the whole, long import path (~2 ms
    per signature); whether a module is installed cannot change while the process runs.
    """
    if Point is None:
        ecc_backends.is_coincurve_available = functools.cache(ecc_backends.is_coincurve_available)
        backend = ecc_backends.get_backend()
    else:
        backend, choose = FastECCBackend(), ecc_backends.get_backend
        ecc_backends.get_backend = lambda import_path=None: backend if import_path is None else choose(import_path)
    name = type(backend).__name__
    log.info("eth_keys ECC backend: %s", name)
    return name


# ---------------------------------------------------------------------------- Keccak-256

EMPTY_KECCAK = bytes.fromhex("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")


def openssl_keccak() -> "functools.partial | None":
    """OpenSSL's Keccak-256 (OpenSSL 3.2 and later, through hashlib) as a bytes -> digest function,
    or None when this interpreter's OpenSSL has none (or gives a wrong digest)."""
    try:
        hasher = hashlib.new("KECCAK-256")
    except ValueError:
        return None
    hasher.update(b"")
    if hasher.digest() != EMPTY_KECCAK:
        return None
    return functools.partial(_keccak256, hashlib.new)


def _keccak256(new, data: bytes) -> bytes:
    return new("KECCAK-256", data).digest()


def use_openssl_keccak_once() -> bool:
    """Make eth-hash's keccak (py-evm's trie and state roots, addresses, transaction hashes) OpenSSL's.

    eth-hash's pycryptodome backend costs ~4 us a hash, mostly in creating its cffi object; OpenSSL's
    ~1 us. py-evm hashes every trie node it touches: the dev chain spent a sixth of its CPU there.
    Digests are the same bytes (ecc_test compares them); without OpenSSL's Keccak, nothing changes.
    Dev-only, as the rest of this module.
    """
    from eth_hash.auto import keccak

    fast = openssl_keccak()
    if fast is None:
        log.info("keccak: eth-hash's backend (this OpenSSL has no KECCAK-256)")
        return False
    keccak.hasher = fast  # what Keccak256.__call__ calls (eth_hash.main), once its backend is chosen
    log.info("keccak: OpenSSL's KECCAK-256")
    return True
