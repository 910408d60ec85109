"""Every inter-service hop of the pipeline, declared once (spec §3); both ends import these.

Names are the hop keys of testdata/token-vectors.json; field names are its "fields" keys. Windows
are legacy's (spec §2.4) except where a comment says "deviation". Fields are optional only where a
legacy decoder really tolerates their absence (defect 33): GCSplit2's and GCSplit1's "defaults" for
the T4/T5 swap tail never applied and GCHostPay1's one-amount T8 guess misfires, so those fields are
required. GCSplit1's fallback to SUCCESS_URL_SIGNING_KEY for the batch token is not kept: a hop has
exactly one key.
"""
from __future__ import annotations

from telepay_shared.tokens import (
    F64, FIX16, ID48, JSON_FLOAT, JSON_HMAC_HEX, JSON_INT, JSON_SIG16, JSON_STR, LAST16, NOW,
    SIG_AT_OFFSET, STR8, STRICT, U16, U16_MINUTES, U32, U64, Field, Hop,
)

SUCCESS_KEY = "SUCCESS_URL_SIGNING_KEY"
TPS_KEY = "TPS_HOSTPAY_SIGNING_KEY"
IPN_KEY = "NOWPAYMENTS_IPN_SECRET"

HOUR, DAY = 3600, 86400
SPLIT_WINDOW = (DAY, 300)
HOSTPAY_WINDOW = (2 * HOUR, 5)


def _lower(name: str) -> Field:
    """A str8 field the legacy encoder lowercases."""
    return Field(name, STR8, transform="lower")


def _strs(*names: str) -> tuple[Field, ...]:
    """Consecutive plain str8 fields."""
    return tuple(Field(name, STR8) for name in names)


_PAYOUT_TARGET = _strs("wallet_address", "payout_currency", "payout_network")
_SUBSCRIPTION = (
    Field("user_id", ID48), Field("closed_channel_id", ID48),  # timestamp (u16 minutes) follows these
    Field("subscription_time_days", U16), Field("subscription_price", STR8), *_PAYOUT_TARGET,
)
_SPLIT_CLIENT = (Field("user_id", U64), Field("closed_channel_id", FIX16), *_PAYOUT_TARGET)
_SWAP_TAIL = (*_strs("swap_currency", "payout_mode"), Field("actual_eth_amount", F64))
_TRANSFER_HEAD = _strs("unique_id", "cn_api_id")
_TRANSFER_TAIL = (
    _lower("from_currency"), _lower("from_network"), Field("from_amount", F64), Field("payin_address", STR8),
)

# T1 TelePay bot → GCWebhook1 GET /?token= (legacy success URL; no longer minted by the bot)
SUCCESS_URL = Hop("telepay->gcwebhook1", _SUBSCRIPTION, SUCCESS_KEY, STRICT, U16_MINUTES, (2 * HOUR, 300),
                  timestamp_at=2, min_length=38)
# T2 GCWebhook1 → GCWebhook2 POST / (Cloud Task body {"token", "payment_id"}: send the invite)
INVITE = Hop("gcwebhook1->gcwebhook2", _SUBSCRIPTION, SUCCESS_KEY, STRICT, U16_MINUTES, (DAY, 300), timestamp_at=2)
# T3 GCWebhook1 → GCSplit1 POST / (instant payout; JSON body + X-Webhook-Signature; legacy never checks the timestamp)
INSTANT_SPLIT = Hop("gcwebhook1->gcsplit1", (
    Field("user_id", JSON_INT), Field("closed_channel_id", JSON_INT),
    *(Field(f.name, JSON_STR) for f in _PAYOUT_TARGET),
    Field("subscription_price", JSON_FLOAT, key="sub_price", aliases=("subscription_price",)),
    Field("actual_eth_amount", JSON_FLOAT), Field("payout_mode", JSON_STR),
    # Ours only, after the legacy keys (legacy GCSplit1 ignores unknown keys): the NowPayments
    # payment the payout belongs to, the idempotency key of everything downstream (defect 9).
    Field("payment_id", JSON_STR, default=None),
), SUCCESS_KEY, timestamp=JSON_INT, timestamp_at=8, wire=JSON_HMAC_HEX)
# T4 GCSplit1 → GCSplit2 POST / (estimate request)
# The payout key ("np:<payment_id>" / "batch:<batch_id>") rides as a trailer legacy ignores (defect 9).
ESTIMATE_REQUEST = Hop("gcsplit1->gcsplit2", (*_SPLIT_CLIENT, Field("adjusted_amount", F64), *_SWAP_TAIL),
                       SUCCESS_KEY, LAST16, U32, SPLIT_WINDOW, trailer="payout_key")
# T5 GCSplit2 → GCSplit1 POST /usdt-eth-estimate (estimate response)
ESTIMATE_RESPONSE = Hop("gcsplit2->gcsplit1", (
    *_SPLIT_CLIENT, Field("from_amount", F64), Field("to_amount_eth_post_fee", F64),
    Field("deposit_fee", F64), Field("withdrawal_fee", F64), *_SWAP_TAIL,
), SUCCESS_KEY, LAST16, U32, SPLIT_WINDOW, trailer="payout_key")  # GCSplit2 echoes T4's payout key
# T6 GCSplit1 → GCSplit3 POST / (swap request); GCSplit3 tolerates tokens without the swap tail
SWAP_REQUEST = Hop("gcsplit1->gcsplit3", (
    Field("unique_id", FIX16), *_SPLIT_CLIENT, Field("eth_amount", F64),
    Field("swap_currency", STR8, default="usdt", group="swap"),
    Field("payout_mode", STR8, default="instant", group="swap"),
    Field("actual_eth_amount", F64, default=0.0, group="swap"),
), SUCCESS_KEY, LAST16, U32, SPLIT_WINDOW)
# T7 GCSplit3 → GCSplit1 POST /eth-client-swap (swap response)
SWAP_RESPONSE = Hop("gcsplit3->gcsplit1", (
    Field("unique_id", FIX16), Field("user_id", U64), Field("closed_channel_id", FIX16),
    *_strs("cn_api_id", "from_currency", "to_currency", "from_network", "to_network"),
    Field("from_amount", F64), Field("to_amount", F64),
    *_strs("payin_address", "payout_address", "refund_address", "flow", "type_"),
    Field("actual_eth_amount", F64, default=0.0),
), SUCCESS_KEY, LAST16, U32, SPLIT_WINDOW)
# T8 GCSplit1 → GCHostPay1 POST / (pay the exchange; the receiver sends estimated_eth_amount)
HOSTPAY_ORDER = Hop("gcsplit1->gchostpay1", (
    Field("unique_id", FIX16), Field("cn_api_id", STR8), _lower("from_currency"), _lower("from_network"),
    Field("actual_eth_amount", F64), Field("estimated_eth_amount", F64), Field("payin_address", STR8),
), TPS_KEY, STRICT, U32, HOSTPAY_WINDOW, min_length=52)
# T9 GCBatchProcessor → GCSplit1 POST /batch-payout (JSON + sig16; legacy tokens never expire)
BATCH_PAYOUT = Hop("gcbatchprocessor->gcsplit1", (
    *(Field(name, JSON_STR) for name in ("batch_id", "client_id")),
    *(Field(f.name, JSON_STR) for f in _PAYOUT_TARGET),
    Field("total_amount_usdt", JSON_STR, transform="str", key="amount_usdt"),
    Field("actual_eth_amount", JSON_FLOAT),
), TPS_KEY, LAST16, timestamp=None, wire=JSON_SIG16)
# T10 GCHostPay1 → GCHostPay2 POST / (exchange status check).
# Deviation (defect 32): legacy accepted only 300 s in the past, so one retry backlog stranded the payout.
STATUS_CHECK = Hop("gchostpay1->gchostpay2", (*_TRANSFER_HEAD, *_TRANSFER_TAIL), SUCCESS_KEY, STRICT, U32,
                   HOSTPAY_WINDOW, min_length=52)
# T11 GCHostPay2 → GCHostPay1 POST /status-verified
STATUS_VERIFIED = Hop("gchostpay2->gchostpay1", (*_TRANSFER_HEAD, Field("status", STR8), *_TRANSFER_TAIL),
                      SUCCESS_KEY, STRICT, U32, HOSTPAY_WINDOW, min_length=52)
# T12 GCHostPay1 → GCHostPay3 POST / (execute payment; T13 retries arrive here too, hence the optional fields).
# Deviation: context is required. Legacy's decoder defaulted it to "instant", so a T10 status check
# (the same fields without context, same key) was also a valid payment order that skipped
# GCHostPay1's exchange-status gate (defect 25); every live T12 sender writes context.
EXECUTE_PAYMENT = Hop("gchostpay1->gchostpay3", (
    *_TRANSFER_HEAD, *_TRANSFER_TAIL, _lower("context"),
    Field("attempt_count", U32, default=1, group="retry"), Field("first_attempt_at", U32, default=NOW, group="retry"),
    Field("error_code", STR8, default=None, group="retry"),
), SUCCESS_KEY, STRICT, U32, HOSTPAY_WINDOW, min_length=52)
# T13 GCHostPay3 → GCHostPay3 POST / (self-retry; the encoder is given the previous attempt_count and sends +1)
EXECUTE_RETRY = Hop("gchostpay3->gchostpay3", (
    *_TRANSFER_HEAD, *_TRANSFER_TAIL, _lower("context"),
    Field("attempt_count", U32, transform="increment"), Field("first_attempt_at", U32), Field("error_code", STR8),
), SUCCESS_KEY, STRICT, U32, HOSTPAY_WINDOW, min_length=52)
# T14 GCHostPay3 → GCHostPay1 POST /payment-completed
PAYMENT_COMPLETED = Hop("gchostpay3->gchostpay1", (
    *_TRANSFER_HEAD, *_strs("tx_hash", "tx_status"), Field("gas_used", U64), Field("block_number", U64),
), SUCCESS_KEY, STRICT, U32, HOSTPAY_WINDOW, min_length=43)
# T15 GCMicroBatchProcessor → GCHostPay1 POST / (pay the batch conversion; first string is the literal "batch").
# Deviation (defect 32): legacy accepted only 300 s in the past.
MICROBATCH_ORDER = Hop("gcmicrobatch->gchostpay1", (
    Field("context", STR8, const="batch"),
    *_strs("batch_conversion_id", "cn_api_id", "from_currency", "from_network"),
    Field("from_amount", F64), Field("payin_address", STR8),
), SUCCESS_KEY, STRICT, U64, HOSTPAY_WINDOW, min_length=45)
# T16 GCHostPay1 → GCMicroBatchProcessor POST /swap-executed
MICROBATCH_SWAP_EXECUTED = Hop("gchostpay1->gcmicrobatch", (
    *_strs("batch_conversion_id", "cn_api_id", "tx_hash"), Field("actual_usdt_received", F64),
), SUCCESS_KEY, LAST16, U64, (30 * 60, 5))
# T17 GCHostPay1 → GCHostPay1 POST /retry-callback-check (self; signature at offset, trailing bytes ignored)
CALLBACK_RETRY = Hop("gchostpay1->gchostpay1", (
    *_strs("unique_id", "cn_api_id", "tx_hash", "context"), Field("retry_count", U32),
), SUCCESS_KEY, SIG_AT_OFFSET, U32, (DAY, 300))
# T18 GCAccumulator → GCSplit3 POST /eth-to-usdt (dead: never sent by the running code)
ACCUMULATOR_SWAP_REQUEST = Hop("gcaccumulator->gcsplit3", (
    Field("accumulation_id", U64), Field("client_id", STR8), Field("eth_amount", F64),
    Field("usdt_wallet_address", STR8),
), SUCCESS_KEY, LAST16, U64, (300, 5))
# T19 GCSplit3 → GCAccumulator POST /swap-created (dead: the endpoint does not exist)
ACCUMULATOR_SWAP_CREATED = Hop("gcsplit3->gcaccumulator", (
    Field("accumulation_id", U64), *_strs("client_id", "cn_api_id"), Field("from_amount", F64), Field("to_amount", F64),
    *_strs("payin_address", "payout_address"),
), SUCCESS_KEY, LAST16, U64, (300, 5))
# T20 GCAccumulator → GCHostPay1 POST / (dead: never sent; receiver maps it to unique_id acc_<id>)
ACCUMULATOR_HOSTPAY_ORDER = Hop("gcaccumulator->gchostpay1", (
    Field("accumulation_id", U64), *_strs("cn_api_id", "from_currency", "from_network"),
    Field("from_amount", F64), Field("payin_address", STR8), _lower("context"),
), SUCCESS_KEY, STRICT, U64, HOSTPAY_WINDOW, min_length=45)
# T21 NowPayments → np-webhook POST / (IPN; header x-nowpayments-sig = HMAC-SHA512 hex; the whole body is returned)
NOWPAYMENTS_IPN = Hop("nowpayments->np-webhook", (), IPN_KEY, timestamp=None, wire=JSON_HMAC_HEX,
                      digest="sha512", sorted_json=True)

# HTTP header carrying the hex signature of the JSON/HMAC hops.
SIGNATURE_HEADERS = {INSTANT_SPLIT.name: "X-Webhook-Signature", NOWPAYMENTS_IPN.name: "x-nowpayments-sig"}

HOPS: dict[str, Hop] = {hop.name: hop for hop in (
    SUCCESS_URL, INVITE, INSTANT_SPLIT, ESTIMATE_REQUEST, ESTIMATE_RESPONSE, SWAP_REQUEST, SWAP_RESPONSE,
    HOSTPAY_ORDER, BATCH_PAYOUT, STATUS_CHECK, STATUS_VERIFIED, EXECUTE_PAYMENT, EXECUTE_RETRY,
    PAYMENT_COMPLETED, MICROBATCH_ORDER, MICROBATCH_SWAP_EXECUTED, CALLBACK_RETRY,
    ACCUMULATOR_SWAP_REQUEST, ACCUMULATOR_SWAP_CREATED, ACCUMULATOR_HOSTPAY_ORDER, NOWPAYMENTS_IPN,
)}
