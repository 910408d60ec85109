"""GCHostPay2's business rule: read an exchange's ChangeNOW status for GCHostPay1 (spec §4.11)."""
from __future__ import annotations

from telepay_shared import hops
from telepay_shared.changenow import ChangeNowClient

# T11 echoes every T10 field and adds the status.
ECHOED_FIELDS = tuple(f.name for f in hops.STATUS_CHECK.fields)


def verified_status(order: dict, changenow: ChangeNowClient) -> dict:
    """Ask ChangeNOW where the exchange stands; return the T11 fields for GCHostPay1.

    An unknown exchange id raises ChangeNowNotFound (404: Cloud Tasks stops) and an unreachable
    ChangeNOW a transient error (5xx: retried); legacy answered 500 to both, forever (defect 25).
    """
    exchange = changenow.exchange_status(order["cn_api_id"])
    return {**{name: order[name] for name in ECHOED_FIELDS}, "status": exchange.status}


def status_verified_url(gchostpay1_url: str) -> str:
    """GCHostPay1's /status-verified, from its configured base URL."""
    return gchostpay1_url.rstrip("/") + "/status-verified"
