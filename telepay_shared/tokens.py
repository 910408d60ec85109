"""Inter-service token codec, byte-for-byte compatible with the legacy 10-26 services (spec §2, §3).

Every hop is a `Hop` declaration (telepay_shared.hops); one generic `encode`/`decode` pair serves
all of them (`decode_signed_body` is `decode` for a request body plus its signature header).
Decoding failures raise errors.TokenRejected only; a missing key raises errors.ConfigError and
fields the wire cannot carry raise errors.BadRequest. Wire formats:
* binary: fields ‖ sig16, URL-safe base64 without padding; decoder style A, B or C (spec §2.2);
* JSON + sig16 (the batch token): json.dumps bytes ‖ sig16, base64url, style B;
* JSON + hex HMAC header (GCWebhook1→GCSplit1, NowPayments IPN): {"body", "signature"}.

Deliberate deviations from legacy (each covered by tokens_test.py):
* u16-minute timestamps are placed in the 65536-minute cycle nearest the clock, so a token a few
  minutes ahead is judged against the future window instead of reading as 45 days old (defect
  31). Every token legacy accepts still lands on the same instant.
* fix16 truncation stops at a UTF-8 character boundary (legacy could split a character and then
  fail to decode its own token); ASCII values, all that legacy ever sends, are unchanged.
* base64 is decoded strictly: legacy's lenient decoder skipped foreign characters, ours rejects them.
* hops.py widens the past window of two HostPay hops (defect 32); see the comments there.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from telepay_shared import errors
from telepay_shared.errors import TokenRejected

# Field encodings (spec §2.1).
STR8, FIX16, ID48, U16, U32, U64, F64 = "str8", "fix16", "id48", "u16", "u32", "u64", "f64"
U16_MINUTES = "u16min"  # timestamp only: (unix_seconds // 60) mod 65536 packed as u16
# JSON value kinds of the JSON hops.
JSON_INT, JSON_FLOAT, JSON_STR = "int", "float", "str"
# Decoder styles (spec §2.2).
STRICT, LAST16, SIG_AT_OFFSET = "A", "B", "C"
# Wire formats.
BINARY, JSON_SIG16, JSON_HMAC_HEX = "binary", "json+sig16", "json+hmac-hex"

SIG_LEN = 16
MAX_TOKEN_CHARS = 16384  # far above the largest legal token; bounds the work an attacker can cause
MAX_BODY_BYTES = 1 << 20
TIMESTAMP = "timestamp"  # key of the decoded timestamp (unix seconds)


class _Sentinel:
    """Named marker value for declarations."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Sentinel("REQUIRED")  # Field.default of a field every token carries
NOW = _Sentinel("NOW")  # Field.default meaning "the decoder's clock", as legacy did

_TRANSFORMS = {"lower": str.lower, "increment": lambda n: n + 1, "str": str}
_FIXED_FORMATS = {FIX16: "16s", ID48: "6s", U16: "H", U32: "I", U64: "Q", F64: "d", U16_MINUTES: "H"}
_JSON_KINDS = (JSON_INT, JSON_FLOAT, JSON_STR)
_ID48_LIMIT = 1 << 47


@dataclass(frozen=True)
class Field:
    """One field of a hop, in wire order.

    transform: encoder-side rewrite legacy applies ("lower", "increment", "str").
    default: decoded value when a legacy decoder tolerates the field's absence (binary hops; the
      field is then read only when more bytes remain than the fixed tail after it, as legacy did,
      and the encoder omits it when given None or nothing).
    group: optional fields sharing a group are sent and read all together or not at all.
    const: value the encoder always writes and the decoder requires; not part of the field dict.
    key / aliases: JSON key written (default: name) and further JSON keys accepted when decoding.
    """

    name: str
    enc: str
    transform: str | None = None
    default: Any = REQUIRED
    group: str | None = None
    const: str | None = None
    key: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def optional(self) -> bool:
        """Whether legacy decoders tolerate the field's absence."""
        return self.default is not REQUIRED


class _Plan(NamedTuple):
    layout: tuple  # fields with the timestamp pseudo-field in place
    steps: tuple  # binary hops: (kind, names, struct, decode_info, encode_info) per run of fields
    names: frozenset  # keys the caller supplies
    required: int  # how many of them every token carries
    min_length: int


@dataclass(frozen=True)
class Hop:
    """Declaration of one inter-service hop: layout, key, clock window and decoder style."""

    name: str
    fields: tuple[Field, ...]
    key: str  # env var holding the signing secret
    style: str = STRICT
    timestamp: str | None = U32  # wire encoding of the timestamp, None when the hop has none
    window: tuple[int, int] | None = None  # (past_s, future_s) accepted around the clock; None = unchecked
    timestamp_at: int | None = None  # index in `fields` where the timestamp sits; None = after the last
    min_length: int | None = None  # legacy decoder's minimum raw length
    wire: str = BINARY
    digest: str = "sha256"  # HMAC hash (JSON_HMAC_HEX hops)
    sorted_json: bool = False  # body is compact sorted-key JSON and may be verified re-serialised
    # Optional str8 after the last field of a style-B (last-16) binary hop. Legacy decoders skip
    # such bytes (they are still signed), so our services can carry an idempotency key through
    # legacy layouts without breaking a legacy receiver; absent, the token is byte-exact legacy.
    trailer: str | None = None
    _plan: _Plan = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        object.__setattr__(self, "_plan", _compile(self))

    @property
    def signed_body(self) -> bool:
        """Whether the hop travels as a JSON body plus a hex signature header."""
        return self.wire == JSON_HMAC_HEX


# ---------------------------------------------------------------------------- declaration compiler

def _compile(hop: Hop) -> _Plan:
    """Validate a declaration and precompute its encode/decode steps."""
    if hop.wire not in (BINARY, JSON_SIG16, JSON_HMAC_HEX) or hop.style not in (STRICT, LAST16, SIG_AT_OFFSET):
        raise ValueError(f"{hop.name}: unknown wire {hop.wire!r} or style {hop.style!r}")
    if hop.wire == JSON_SIG16 and hop.style != LAST16:
        raise ValueError(f"{hop.name}: JSON + sig16 tokens are verified last-16 (style B)")
    layout = list(hop.fields)
    if hop.timestamp is not None:
        at = len(layout) if hop.timestamp_at is None else hop.timestamp_at
        layout.insert(at, Field(TIMESTAMP, hop.timestamp))
    allowed = _JSON_KINDS if hop.wire != BINARY else (STR8, *_FIXED_FORMATS)
    for f in layout:
        if f.enc not in allowed or (f.transform is not None and f.transform not in _TRANSFORMS):
            raise ValueError(f"{hop.name}.{f.name}: encoding {f.enc!r} / transform {f.transform!r} not allowed")
        if f.optional and hop.wire == JSON_HMAC_HEX and f.default is not None:
            raise ValueError(f"{hop.name}.{f.name}: optional JSON fields default to None (key absent)")
        if f.optional and hop.wire == JSON_SIG16:
            raise ValueError(f"{hop.name}.{f.name}: optional fields exist only on binary and signed-JSON hops")
        if f.group is not None and not f.optional:
            raise ValueError(f"{hop.name}.{f.name}: only optional fields form groups")
        if f.const is not None and (f.enc != STR8 or f.optional):
            raise ValueError(f"{hop.name}.{f.name}: only required str8 fields can be constant")
    if hop.trailer is not None and (hop.wire != BINARY or hop.style != LAST16):
        raise ValueError(f"{hop.name}: a trailer needs a binary last-16 (style B) hop")
    names = frozenset(f.name for f in layout if f.const is None and f.name != TIMESTAMP) | (
        {hop.trailer} if hop.trailer else set())
    required = sum(1 for f in layout if f.name in names and not f.optional)
    if hop.wire != BINARY:
        return _Plan(tuple(layout), (), names, required, SIG_LEN if hop.wire == JSON_SIG16 else 0)
    min_length = max(hop.min_length or 0, SIG_LEN if hop.style == LAST16 else 0)
    return _Plan(tuple(layout), _steps(hop, layout), names, required, min_length)


# Step kinds: a run of plain str8 fields, a run of plain fixed-size fields (one struct), or one
# optional/constant field handled individually.
_STRS, _FIXED, _SPECIAL = 0, 1, 2
_TS = _Sentinel("TS")  # encode-side marker: this slot takes the timestamp


def _steps(hop: Hop, layout: list) -> tuple:
    """Precompute the hop's steps; consecutive plain fields share one step."""
    steps, run = [], []

    def flush():
        if run and run[0].enc == STR8:
            transforms = tuple(_TRANSFORMS.get(f.transform) for f in run)
            steps.append((_STRS, tuple(f.name for f in run), None, None, transforms))
        elif run:
            fmt = struct.Struct(">" + "".join(_FIXED_FORMATS[f.enc] for f in run))
            fixups = (tuple(f.name for f in run if f.enc == FIX16), tuple(f.name for f in run if f.enc == ID48))
            fixups = fixups if any(fixups) else None
            steps.append((_FIXED, tuple(f.name for f in run), fmt, fixups, tuple(map(_converter, run))))
        run.clear()

    for i, f in enumerate(layout):
        if f.optional or f.const is not None:
            flush()
            fmt = None if f.enc == STR8 else struct.Struct(">" + _FIXED_FORMATS[f.enc])
            steps.append((_SPECIAL, f, fmt, _threshold(hop, layout, i), not _continues_group(layout, i)))
            continue
        if run and (run[0].enc == STR8) != (f.enc == STR8):
            flush()
        run.append(f)
    flush()
    return tuple(steps)


def _converter(f: Field):
    """Encode-side conversion of a fixed-size field's value before struct packing (None: as is)."""
    if f.name == TIMESTAMP:
        return _TS
    transform, enc = _TRANSFORMS.get(f.transform), {FIX16: _fix16_bytes, ID48: _pack_id48}.get(f.enc)
    if transform and enc:
        return lambda value: enc(transform(value))
    return transform or enc


def _threshold(hop: Hop, layout: list, i: int) -> int:
    """Bytes that must remain for an optional field to be read: 0 required, -1 follows its group."""
    f = layout[i]
    if not f.optional:
        return 0
    if _continues_group(layout, i):
        return -1
    tail = layout[i + 1:]
    if any(t.enc == STR8 and not t.optional for t in tail):
        raise ValueError(f"{hop.name}.{f.name}: an optional field must be followed by fixed-size fields only")
    # Legacy reads optional fields only when the bytes left exceed the fixed tail after them.
    group = [f, *(t for t in tail if t.group and t.group == f.group)]
    sig_in_buffer = SIG_LEN if hop.style != LAST16 else 0
    return sum(map(_min_size, group)) + sum(_min_size(t) for t in tail if not t.optional) + sig_in_buffer


def _min_size(f: Field) -> int:
    """Fewest bytes the field can occupy on the wire."""
    return 1 if f.enc == STR8 else struct.calcsize(">" + _FIXED_FORMATS[f.enc])


def _continues_group(layout: list, i: int) -> bool:
    """Whether layout[i] belongs to the same optional group as the field before it."""
    return i > 0 and layout[i].group is not None and layout[i].group == layout[i - 1].group


# ---------------------------------------------------------------------------- field codecs

_STR8_PREFIX = tuple(bytes((n,)) for n in range(256))


def _pack_str8(value: str) -> bytes:
    """Length byte plus UTF-8; legacy refuses strings over 255 bytes."""
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"is {len(data)} UTF-8 bytes, str8 holds at most 255")
    return _STR8_PREFIX[len(data)] + data


def _fix16_bytes(value: str) -> bytes:
    """At most 16 UTF-8 bytes, cut at a character boundary (see module docstring)."""
    data = value.encode()
    if len(data) > 16:
        data = data[:16].decode("utf-8", "ignore").encode()
    return data


def _pack_fix16(value: str) -> bytes:
    """First 16 UTF-8 bytes, NUL-padded."""
    return _fix16_bytes(value).ljust(16, b"\0")


def _pack_id48(value: int) -> bytes:
    """Six-byte big-endian two's complement."""
    if not -_ID48_LIMIT <= value < _ID48_LIMIT:
        raise ValueError(f"{value} does not fit id48 (±2^47)")
    return value.to_bytes(6, "big", signed=True)


def _unpack_id48(data: bytes) -> int:
    """Inverse of _pack_id48."""
    return int.from_bytes(data, "big", signed=True)


def _unpack_fix16(data: bytes) -> str:
    """Strip the NUL padding and decode."""
    return data.rstrip(b"\0").decode()


_PACKERS = {
    STR8: _pack_str8, FIX16: _pack_fix16, ID48: _pack_id48,
    **{enc: struct.Struct(">" + _FIXED_FORMATS[enc]).pack for enc in (U16, U32, U64, F64, U16_MINUTES)},
}
_FIXUPS = {FIX16: _unpack_fix16, ID48: _unpack_id48}


def _json_int(value):
    """JSON integer, bool excluded."""
    if type(value) is not int:
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value


def _json_float(value):
    """JSON number carried as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _json_str(value):
    """JSON string."""
    if type(value) is not str:
        raise TypeError(f"expected a str, got {type(value).__name__}")
    return value


_JSON_CHECKS = {JSON_INT: _json_int, JSON_FLOAT: _json_float, JSON_STR: _json_str}


# ---------------------------------------------------------------------------- keys, MACs, base64

_MAC_PADS: dict = {}
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _secret(keys, name: str) -> bytes:
    """The signing secret named by the hop, as bytes; a missing key is a configuration error.

    `keys` maps env var names to secrets: a plain dict, or a service's Config (whose secrets are
    config.Secret values, revealed only here)."""
    secret = keys.get(name) if keys is not None else None
    if hasattr(secret, "reveal"):
        secret = secret.reveal()
    if not secret or not isinstance(secret, (str, bytes, bytearray)):
        raise errors.ConfigError(f"signing key {name} is not configured")
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _mac(secret: bytes, digest: str, message) -> bytes:
    """HMAC (RFC 2104) of message, resuming cached keyed hash states: keying costs as much as hashing."""
    pads = _MAC_PADS.get((secret, digest))
    if pads is None:
        pads = _keyed_pads(secret, digest)
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.digest()


def _keyed_pads(secret: bytes, digest: str) -> tuple:
    """Inner and outer hash states after absorbing the padded key, as hmac.HMAC builds them."""
    inner, outer = hashlib.new(digest), hashlib.new(digest)
    block_key = hashlib.new(digest, secret).digest() if len(secret) > inner.block_size else secret
    block_key = block_key.ljust(inner.block_size, b"\0")
    inner.update(block_key.translate(_IPAD))
    outer.update(block_key.translate(_OPAD))
    if len(_MAC_PADS) >= 64:  # bounded: callers may pass arbitrary keys
        _MAC_PADS.clear()
    _MAC_PADS[(secret, digest)] = (inner, outer)
    return inner, outer


_B64_OUT = bytes.maketrans(b"+/", b"-_")
_B64_IN = bytes.maketrans(b"-_+/=", b"+/!!!")  # standard-alphabet characters become invalid
_B64_PADS = (b"", b"===", b"==", b"=")


def _b64encode(raw: bytes) -> str:
    """URL-safe base64 without padding."""
    return binascii.b2a_base64(raw, newline=False).translate(_B64_OUT).rstrip(b"=").decode("ascii")


def _b64decode(token) -> bytes:
    """Strict inverse of _b64encode; anything else raises."""
    if isinstance(token, str):
        data = token.encode("ascii")
    elif isinstance(token, (bytes, bytearray)):
        data = bytes(token)
    else:
        raise TypeError("token must be str")
    if len(data) > MAX_TOKEN_CHARS:
        raise _Short
    return binascii.a2b_base64(data.translate(_B64_IN) + _B64_PADS[len(data) & 3], strict_mode=True)


class _Short(Exception):
    """Internal: the token has fewer or more bytes than its layout."""


# ---------------------------------------------------------------------------- public API

def encode(hop: Hop | str, fields: Mapping[str, Any], keys: Mapping[str, str | bytes], now: float | None = None):
    """Encode `fields` for `hop` at clock `now`: a token str, or {"body", "signature"} for JSON/HMAC hops."""
    hop = _resolve(hop, errors.BadRequest)
    secret = _secret(keys, hop.key)
    now = int(time.time() if now is None else now)
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise errors.BadRequest(f"{hop.name}: fields must be a mapping", hop=hop.name)
    if hop.wire == BINARY:
        payload = _encode_binary(hop, fields, now)
    else:
        payload = _encode_json(hop, fields, now).encode()
    if hop.wire == JSON_HMAC_HEX:
        return {"body": payload.decode(), "signature": _mac(secret, hop.digest, payload).hex()}
    return _b64encode(payload + _mac(secret, hop.digest, payload)[:SIG_LEN])


def decode(hop: Hop | str, token, keys: Mapping[str, str | bytes], now: float | None = None) -> dict:
    """Verify and decode a token (for JSON/HMAC hops: {"body", "signature"}); raises TokenRejected."""
    hop = _resolve(hop, None)
    if hop.wire == JSON_HMAC_HEX:
        if not isinstance(token, Mapping):
            token = {}
        return decode_signed_body(hop, token.get("body"), token.get("signature"), keys, now)
    secret = _secret(keys, hop.key)
    now = int(time.time() if now is None else now)
    try:
        raw = _b64decode(token)
        if len(raw) < hop._plan.min_length:
            raise _Short
        if hop.style == LAST16:
            body = raw[:-SIG_LEN]
            if not hmac.compare_digest(_mac(secret, hop.digest, body)[:SIG_LEN], raw[-SIG_LEN:]):
                raise TokenRejected("bad_signature")
            if hop.wire == JSON_SIG16:
                out = _parse_json(hop, body)
            else:
                out, end = _parse_binary(hop, body, now)
                trailer = _read_trailer(body, end) if hop.trailer else None
                if trailer is not None:  # absent from legacy senders: the key is left out
                    out[hop.trailer] = trailer
        else:
            out, end = _parse_binary(hop, raw, now)
            if len(raw) - end != SIG_LEN and (hop.style == STRICT or len(raw) - end < SIG_LEN):
                raise _Short
            if not hmac.compare_digest(_mac(secret, hop.digest, raw[:end])[:SIG_LEN], raw[end:end + SIG_LEN]):
                raise TokenRejected("bad_signature")
    except Exception as exc:
        raise _rejection(hop, exc) from None
    return _check_clock(hop, out, now)


def decode_signed_body(hop: Hop | str, body, signature, keys: Mapping[str, str | bytes],
                       now: float | None = None) -> dict:
    """Verify a JSON body against its hex HMAC header (raw bytes, or sorted re-serialisation) and decode it."""
    hop = _resolve(hop, None)
    secret = _secret(keys, hop.key)
    now = int(time.time() if now is None else now)
    try:
        if isinstance(body, str):
            body = body.encode()
        if not isinstance(body, (bytes, bytearray)) or not isinstance(signature, str):
            raise TypeError("body must be bytes/str and signature str")
        if len(body) > MAX_BODY_BYTES:
            raise _Short
        claimed = signature.lower().encode("ascii")
        obj = None
        if not hmac.compare_digest(_mac(secret, hop.digest, body).hex().encode(), claimed):
            if not hop.sorted_json:
                raise TokenRejected("bad_signature")
            obj = json.loads(body)
            _verify_resorted(hop, secret, obj, claimed)
        out = _parse_json(hop, body, obj)
    except Exception as exc:
        raise _rejection(hop, exc) from None
    return _check_clock(hop, out, now)


# ---------------------------------------------------------------------------- internals

def _resolve(hop, error_class) -> Hop:
    """Accept a Hop or its name; unknown names raise error_class (TokenRejected when None)."""
    if isinstance(hop, Hop):
        return hop
    from telepay_shared.hops import HOPS  # hops imports this module

    found = HOPS.get(hop) if isinstance(hop, str) else None
    if found is None:
        if error_class is None:
            raise TokenRejected("unknown_hop", f"unknown hop {hop!r}")
        raise error_class(f"unknown hop {hop!r}; known: {', '.join(HOPS)}")
    return found


def _rejection(hop: Hop, exc: Exception) -> TokenRejected:
    """Map any decoding failure to a TokenRejected; the message never quotes token content."""
    if isinstance(exc, TokenRejected):
        reason = exc.reason
    elif isinstance(exc, (_Short, IndexError, struct.error)):
        reason = "wrong_length"
    else:
        reason = "malformed"
    return TokenRejected(reason, f"{hop.name}: {reason} ({type(exc).__name__})", hop=hop.name)


def _verify_resorted(hop: Hop, secret: bytes, obj, claimed: bytes) -> None:
    """NowPayments signs compact sorted-key JSON; accept either ASCII-escaped or raw UTF-8 forms."""
    for ensure_ascii in (True, False):
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()
        if hmac.compare_digest(_mac(secret, hop.digest, canonical).hex().encode(), claimed):
            return
    raise TokenRejected("bad_signature")


def _parse_binary(hop: Hop, buf: bytes, now: int) -> tuple[dict, int]:
    """Read the hop's fields from the front of buf; returns (fields, offset after the last field)."""
    out, offset, size, absent = {}, 0, len(buf), False
    for kind, names, fmt, info, group_start in hop._plan.steps:
        if kind == _STRS:
            for name in names:
                stop = offset + 1 + buf[offset]
                if stop > size:
                    raise _Short
                out[name] = buf[offset + 1:stop].decode()
                offset = stop
        elif kind == _FIXED:
            values = fmt.unpack_from(buf, offset)
            offset += fmt.size
            if len(values) == 1:
                out[names[0]] = values[0]
            else:
                out.update(zip(names, values))
            if info:
                for name in info[0]:
                    out[name] = out[name].rstrip(b"\0").decode()
                for name in info[1]:
                    out[name] = int.from_bytes(out[name], "big", signed=True)
        else:
            offset, absent = _parse_special(names, fmt, info, buf, offset, out, now, absent)
    return out, offset


def _read_trailer(body: bytes, offset: int) -> str | None:
    """The hop's trailer when the bytes after the last field are exactly one str8, else None."""
    if offset < len(body) and offset + 1 + body[offset] == len(body):
        try:
            return body[offset + 1:].decode()
        except UnicodeDecodeError:
            return None
    return None


def _parse_special(f: Field, fmt, threshold: int, buf: bytes, offset: int, out: dict, now: int, absent: bool):
    """Read one optional or constant field; returns (offset, whether its optional group is absent)."""
    if threshold:
        if threshold > 0:
            absent = len(buf) - offset < threshold
        if absent:
            out[f.name] = now if f.default is NOW else f.default
            return offset, absent
    if fmt is None:
        stop = offset + 1 + buf[offset]
        if stop > len(buf):
            raise _Short
        value, offset = buf[offset + 1:stop].decode(), stop
    else:
        value, offset = fmt.unpack_from(buf, offset)[0], offset + fmt.size
        if f.enc in _FIXUPS:
            value = _FIXUPS[f.enc](value)
    if f.const is None:
        out[f.name] = value
    elif value != f.const:
        raise ValueError(f"{f.name} is not {f.const!r}")
    return offset, absent


def _parse_json(hop: Hop, body: bytes, obj=None) -> dict:
    """Parse a JSON body and pick the declared fields (or return it whole when none are declared)."""
    if obj is None:
        obj = json.loads(body)
    if not isinstance(obj, dict):
        raise TypeError("JSON body is not an object")
    if not hop.fields:
        return obj
    out = {}
    for f in hop._plan.layout:
        key = f.key or f.name
        if key not in obj:
            key = next((a for a in f.aliases if a in obj), None)
            if key is None:
                if not f.optional:
                    raise KeyError(f.name)
                continue  # legacy senders do not send our optional keys: left out
        out[f.name] = _JSON_CHECKS[f.enc](obj[key])
    return out


def _check_clock(hop: Hop, out: dict, now: int) -> dict:
    """Apply the hop's window after the signature has been verified (as legacy)."""
    if hop.timestamp is None:
        return out
    if hop.timestamp == U16_MINUTES:
        out[TIMESTAMP] = _minutes_to_unix(out[TIMESTAMP], now)
    if hop.window is not None:
        age = now - out[TIMESTAMP]
        if age > hop.window[0]:
            raise TokenRejected("expired", f"{hop.name}: expired", hop=hop.name)
        if -age > hop.window[1]:
            raise TokenRejected("future", f"{hop.name}: timestamp in the future", hop=hop.name)
    return out


def _minutes_to_unix(minutes: int, now: int) -> int:
    """Place a u16 minute stamp in the 65536-minute cycle nearest the clock (legacy took the past one).

    Legacy read every stamp as "at most one cycle ago", so one minute ahead meant ~45.5 days old
    (defect 31). Choosing the nearest reading agrees with legacy for every stamp up to 22.7 days old,
    far beyond every window, and lets the future window apply.
    """
    current = now // 60
    behind = (current - minutes) & 0xFFFF
    if behind > 0x8000:
        return (current + 0x10000 - behind) * 60
    return (current - behind) * 60


def _encode_binary(hop: Hop, fields: Mapping, now: int) -> bytes:
    """Pack the fields in wire order; optional groups may be omitted only as a trailing run."""
    ts_value = (now // 60) & 0xFFFF if hop.timestamp == U16_MINUTES else now
    parts, sent, omitted = [], hop._plan.required, [False, False]  # omitted: [any group so far, current group]
    try:
        for kind, names, fmt, info, convert in hop._plan.steps:
            if kind == _STRS:
                for name, transform in zip(names, convert):
                    data = (transform(fields[name]) if transform else fields[name]).encode()
                    parts.append(_STR8_PREFIX[len(data)])  # IndexError beyond 255: diagnosed below
                    parts.append(data)
            elif kind == _FIXED:
                parts.append(fmt.pack(*[
                    ts_value if conv is _TS else conv(fields[name]) if conv else fields[name]
                    for name, conv in zip(names, convert)
                ]))
            else:
                sent += _encode_special(hop, names, fields, parts, omitted, convert)
    except errors.BadRequest:
        raise
    except Exception as exc:
        raise _encode_error(hop, fields, exc) from None
    if hop.trailer and fields.get(hop.trailer) is not None:
        try:
            parts.append(_pack_str8(fields[hop.trailer]))
        except (TypeError, ValueError) as exc:
            raise errors.BadRequest(f"{hop.name}: field {hop.trailer!r} {exc}", hop=hop.name, field=hop.trailer) from None
        sent += 1
    if len(fields) > sent:
        _refuse_unknown(hop, fields)
    return b"".join(parts)


def _encode_special(hop: Hop, f: Field, fields: Mapping, parts: list, omitted: list, group_start: bool) -> int:
    """Pack one optional or constant field; returns 1 when it consumed a caller's value."""
    if f.const is not None:
        parts.append(_pack_str8(f.const))
        return 0
    value = fields.get(f.name)
    if group_start:
        if value is not None and omitted[0]:
            raise errors.BadRequest(f"{hop.name}: field {f.name!r} cannot follow an omitted optional field")
        omitted[1] = value is None
        omitted[0] = omitted[0] or omitted[1]
    elif omitted[1] != (value is None):
        raise errors.BadRequest(f"{hop.name}: field {f.name!r} must be given together with the rest of its group")
    if value is None:
        return 0
    transform = _TRANSFORMS.get(f.transform)
    parts.append(_PACKERS[f.enc](transform(value) if transform else value))
    return 1


def _encode_error(hop: Hop, fields: Mapping, exc: Exception) -> errors.BadRequest:
    """Name the first field that cannot be packed (slow path, only after a failure)."""
    for f in hop._plan.layout:
        value = fields.get(f.name)
        if f.name == TIMESTAMP or f.const is not None or (value is None and f.optional):
            continue
        problem = "is missing" if value is None else None
        try:
            if problem is None:
                transform = _TRANSFORMS.get(f.transform)
                _PACKERS[f.enc](transform(value) if transform else value)
        except Exception as field_exc:  # noqa: BLE001 - any packing failure is the caller's value
            problem = str(field_exc) or type(field_exc).__name__
        if problem:
            return errors.BadRequest(f"{hop.name}: field {f.name!r} {problem}", hop=hop.name, field=f.name)
    return errors.BadRequest(f"{hop.name}: cannot encode ({type(exc).__name__}: {exc})", hop=hop.name)


def _encode_json(hop: Hop, fields: Mapping, now: int) -> str:
    """Serialise the JSON hops exactly as legacy: json.dumps in declared order (or sorted compact)."""
    obj, name = {}, None
    try:
        if not hop.fields:
            return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
        for f in hop._plan.layout:
            name = f.name
            value = now if name == TIMESTAMP else fields.get(name)
            if value is None and f.optional:
                continue
            if value is None:
                raise ValueError("is missing")
            if f.transform is not None:
                value = _TRANSFORMS[f.transform](value)
            obj[f.key or name] = _JSON_CHECKS[f.enc](value)
    except (TypeError, ValueError) as exc:
        where = f"field {name!r}" if name else "body"
        raise errors.BadRequest(f"{hop.name}: {where} {exc}", hop=hop.name, field=name) from None
    if len(fields) > len(hop._plan.names):
        _refuse_unknown(hop, fields)
    return json.dumps(obj)


def _refuse_unknown(hop: Hop, fields: Mapping) -> None:
    """Reject keys the hop does not carry (typos would otherwise vanish silently)."""
    unknown = set(fields) - hop._plan.names - {TIMESTAMP}
    if unknown:
        raise errors.BadRequest(f"{hop.name}: unknown field(s) {sorted(unknown)}", hop=hop.name)
