"""The soak's fault machinery (tools/dev soak, soak.py): what it breaks, and the stand-ins it needs to see.

* RpcFaultProxy: a JSON-RPC proxy between GCHostPay3 and the chain. Armed faults make the next call
  of a method (or of any method) hang past the client's timeout without reaching the chain
  ("hang"), reach the chain and then lose the answer after the client gave up ("lost_answer"), or
  reach the chain and drop the connection at once ("reset"). lost_answer and reset on
  eth_sendRawTransaction are the case that paid twice in legacy: the transaction is accepted, the
  sender never hears so.
* AlertSink: a Slack incoming-webhook stand-in that keeps every alert it is sent (SLACK_ALERT_WEBHOOK).
* set_duplicates / duplicate_counts: switch the Cloud Tasks emulator's duplicate deliveries
  (emulator.Duplicator) through the stack folder's control file, and read what it did.
* kill_service, changenow_fault, restart_database: the other faults, on a running stack.
* FaultPlan: a seeded schedule of faults over a time window, every kind at least `minimum` times.
"""
from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from flask import Response, request
from telepay_shared.standins.server import StandInServer

from services.catalog import SERVICES
from tools.devstack import emulator
from tools.devstack.persist import write_atomically

LOOPBACK = "127.0.0.1"
RPC_FAULT_KINDS = ("hang", "lost_answer", "reset")
CHANGENOW_ROUTES = ("estimate", "create", "by_id")
CHANGENOW_FAULTS = ("server_error", "rate_limit", "hang")
CHANGENOW_CLIENT_TIMEOUT_S = 10.0  # telepay_shared.changenow.ChangeNowClient's default read timeout
FAULT_KINDS = ("duplicate_delivery", "kill_service", "changenow_5xx", "changenow_429", "changenow_timeout",
               "rpc_timeout", "rpc_lost_answer", "db_restart")

log = logging.getLogger("devstack.faults")


# ---------------------------------------------------------------------------- the Ethereum RPC proxy

@dataclass
class _Armed:
    """One armed fault: its kind, the method it waits for (None: any) and how many calls it still takes."""

    kind: str
    method: str | None
    count: int


class RpcFaultProxy:
    """Forwards JSON-RPC POSTs to the chain; armed faults break the next matching calls (module docstring)."""

    def __init__(self, upstream: str, hang_s: float, port: int = 0):
        self.upstream, self.hang_s = upstream, hang_s
        self.fired: Counter = Counter()  # (kind, method) -> calls broken
        self.calls: Counter = Counter()  # method -> calls forwarded or broken
        self._armed: list[_Armed] = []
        self._lock, self._stopping = threading.Lock(), threading.Event()
        self._session = threading.local()
        self._server = ThreadingHTTPServer((LOOPBACK, port), self._handler_class())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> of the proxy."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> RpcFaultProxy:
        """Serve in a daemon thread."""
        threading.Thread(target=self._server.serve_forever, name="rpc-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        """Release hanging calls and stop serving."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def arm(self, kind: str, method: str | None = None, count: int = 1) -> None:
        """Break the next `count` calls of `method` (any method when None) as `kind` (RPC_FAULT_KINDS)."""
        if kind not in RPC_FAULT_KINDS:
            raise ValueError(f"unknown RPC fault {kind!r}")
        with self._lock:
            self._armed.append(_Armed(kind, method, count))

    def disarm(self) -> int:
        """Drop every armed fault; how many calls they would still have broken."""
        with self._lock:
            left = sum(armed.count for armed in self._armed)
            self._armed.clear()
        return left

    def _take(self, methods: list[str]) -> str | None:
        """The fault kind this call gets, consuming one armed call, or None."""
        with self._lock:
            for method in methods:
                self.calls[method] += 1
            for armed in self._armed:
                if armed.method is None or armed.method in methods:
                    armed.count -= 1
                    self._armed = [a for a in self._armed if a.count > 0]
                    self.fired[(armed.kind, armed.method or methods[0])] += 1
                    return armed.kind
        return None

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        """POST the body to the chain; (status, answer)."""
        session = getattr(self._session, "value", None)
        if session is None:
            session = self._session.value = requests.Session()
        answer = session.post(self.upstream, data=body, headers={"Content-Type": "application/json"}, timeout=120)
        return answer.status_code, answer.content

    def _handler_class(self):
        """The request handler, bound to this proxy."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = proxy._take(_methods(body))
                if kind == "hang":  # never reaches the chain; the client times out
                    proxy._stopping.wait(proxy.hang_s)
                    self.close_connection = True
                    return
                status, answer = proxy._forward(body)
                if kind is not None:  # the chain did it; the answer is lost (late, or the connection dropped)
                    if kind == "lost_answer":
                        proxy._stopping.wait(proxy.hang_s)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        return Handler


def _methods(body: bytes) -> list[str]:
    """The JSON-RPC method names of a request (or batch); ['?'] when it is not JSON-RPC."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ["?"]
    calls = parsed if isinstance(parsed, list) else [parsed]
    return [str(call.get("method", "?")) for call in calls if isinstance(call, dict)] or ["?"]


# ---------------------------------------------------------------------------- the alert sink

class AlertSink(StandInServer):
    """A Slack incoming-webhook stand-in: keeps the text of every alert POSTed to it (at any path)."""

    url_path = "/services/soak/alerts"  # the webhook URL to configure as SLACK_ALERT_WEBHOOK is `url`

    def __init__(self, port: int = 0):
        super().__init__(LOOPBACK, port, hang_s=0.0)
        self.alerts: list[dict] = []
        self.app = self.app_on_every_path(__name__, self._alert_view, methods=("POST",))

    def texts(self) -> list[str]:
        """The text of every alert received so far."""
        with self._lock:
            return [alert["text"] for alert in self.alerts]

    def _alert_view(self, path: str) -> Response:
        """Keep the alert's text (the whole body when it is not Slack's JSON) and answer Slack's "ok"."""
        body = request.get_data()
        try:
            text = str(json.loads(body).get("text", ""))
        except (ValueError, AttributeError):
            text = body.decode(errors="replace")
        with self._lock:
            self.alerts.append({"at": time.time(), "text": text})
        return Response(b"ok", status=200)


# ---------------------------------------------------------------------------- faults on the stack

def set_duplicates(stack_folder: Path, share: float, seed: int | None = None) -> None:
    """Make the stack's Cloud Tasks emulator deliver `share` of its tasks twice (0: never)."""
    control = Path(stack_folder) / emulator.FAULTS_FILE
    write_atomically(control, json.dumps({"duplicate_share": share, "seed": seed}).encode())


def duplicate_counts(stack_folder: Path) -> Counter:
    """What the emulator duplicated so far: concurrent, after_success, answer_<status>."""
    try:
        return Counter(json.loads((Path(stack_folder) / emulator.FAULT_STATS_FILE).read_text()))
    except (OSError, ValueError):
        return Counter()


def kill_service(stack, service: str, down_s: float) -> None:
    """SIGKILL a service (its requests in flight die with it), wait, start it again."""
    stack.stop_part(service, signal.SIGKILL, timeout_s=5)
    time.sleep(down_s)
    stack.start_service(service)


def restart_database(stack, down_s: float) -> None:
    """Stop PostgreSQL (fast shutdown: sessions are cut, commits kept), wait, start it again."""
    stack.restart_database(down_s)


def changenow_fault(stack, route: str, kind: str, count: int = 1, retry_after: str = "1") -> None:
    """Make the ChangeNOW stand-in's next `count` calls of a route answer 502, 429 or hang past the client timeout."""
    spec = {"route": route, "kind": kind, "count": count, "retry_after": retry_after}
    if kind == "hang":
        spec["hang_s"] = CHANGENOW_CLIENT_TIMEOUT_S + 1
    answer = requests.post(stack.url("changenow") + "/_standin/faults", json=spec, timeout=10)
    answer.raise_for_status()


def consume_changenow_faults(stack, attempts: int = 50) -> int:
    """Take every fault still queued at the stand-in with harmless calls; how many were left."""
    headers = {"x-changenow-api-key": stack.secrets["CHANGENOW_API_KEY"]}
    base = stack.url("changenow") + "/v2"
    probes = {"estimate": lambda: requests.get(base + "/exchange/estimated-amount", headers=headers, timeout=30),
              "create": lambda: requests.post(base + "/exchange", json={}, headers=headers, timeout=30),
              "by_id": lambda: requests.get(base + "/exchange/by-id", headers=headers, timeout=30)}
    left = 0
    for probe in probes.values():
        for _ in range(attempts):
            started = time.monotonic()
            answer = probe()  # every probe is invalid: without a fault it answers 400 at once
            if answer.status_code == 400 and time.monotonic() - started < CHANGENOW_CLIENT_TIMEOUT_S:
                break
            left += 1
    return left


# ---------------------------------------------------------------------------- the schedule

@dataclass(frozen=True)
class Fault:
    """One scheduled fault: when (seconds into the window), what, and its details."""

    at_s: float
    kind: str
    details: dict = field(default_factory=dict)


class FaultPlan:
    """A seeded schedule: every kind in `kinds` at least `minimum` times, plus Poisson extras at `per_minute`."""

    SERVICES_KILLED = SERVICES  # any of them, np-webhook and GCHostPay3 included
    # Where lost answers hurt: the broadcast above all, then the reads the transfer decision rests on.
    RPC_METHODS = ("eth_sendRawTransaction", "eth_sendRawTransaction", "eth_getTransactionReceipt",
                   "eth_getTransactionCount", "eth_getTransactionByHash", None)

    def __init__(self, rng: random.Random, window_s: float, kinds: tuple[str, ...], minimum: int = 1,
                 per_minute: float = 20.0, db_restarts: int = 1):
        self.rng = rng
        scheduled = [kind for kind in kinds if kind not in ("duplicate_delivery", "db_restart")]
        faults = [self._fault(kind, window_s) for kind in scheduled for _ in range(minimum)]
        faults += [self._fault("db_restart", window_s, early=0.25) for _ in range(db_restarts if "db_restart" in kinds else 0)]
        extras = int(per_minute * window_s / 60)
        faults += [self._fault(rng.choice(scheduled), window_s) for _ in range(extras) if scheduled]
        self.faults = sorted(faults, key=lambda fault: fault.at_s)

    def _fault(self, kind: str, window_s: float, early: float = 0.0) -> Fault:
        """One fault of a kind at a random moment of the window (after `early` of it), with random details."""
        at_s = self.rng.uniform(early * window_s, 0.85 * window_s)
        rng = self.rng
        details = {
            "kill_service": lambda: {"service": rng.choice(self.SERVICES_KILLED), "down_s": rng.uniform(0.2, 2.0)},
            "changenow_5xx": lambda: {"route": rng.choice(CHANGENOW_ROUTES), "kind": "server_error",
                                      "count": rng.randint(1, 3)},
            "changenow_429": lambda: {"route": rng.choice(CHANGENOW_ROUTES), "kind": "rate_limit",
                                      "count": rng.randint(1, 3), "retry_after": rng.choice(("0", "1", "2"))},
            "changenow_timeout": lambda: {"route": rng.choice(CHANGENOW_ROUTES), "kind": "hang", "count": 1},
            "rpc_timeout": lambda: {"kind": "hang", "method": rng.choice(self.RPC_METHODS)},
            "rpc_lost_answer": lambda: {"kind": rng.choice(("lost_answer", "reset")),
                                        "method": rng.choice(self.RPC_METHODS)},
            "db_restart": lambda: {"down_s": rng.uniform(0.5, 3.0)},
        }[kind]()
        return Fault(at_s, kind, details)

    def counts(self) -> Counter:
        """Faults scheduled, by kind."""
        return Counter(fault.kind for fault in self.faults)


class Injector:
    """Carries out a FaultPlan against a stack in a background thread, counting what it did."""

    def __init__(self, stack, plan: FaultPlan, proxy: RpcFaultProxy, say=lambda text: None):
        self.stack, self.plan, self.proxy, self.say = stack, plan, proxy, say
        self.injected: Counter = Counter()
        self.changenow_calls = 0  # calls the queued ChangeNOW faults were to break
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)
        self._workers: list[threading.Thread] = []

    def start(self) -> Injector:
        """Start the schedule now."""
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Skip what is left of the schedule and wait for faults in progress to end (services back up)."""
        self._stop.set()
        self._thread.join()
        for worker in self._workers:
            worker.join()

    def join(self) -> None:
        """Wait until the whole schedule has been carried out."""
        self._thread.join()
        for worker in self._workers:
            worker.join()

    def _run(self) -> None:
        """Inject each fault at its time; kills and restarts run beside the schedule (they block for seconds)."""
        for fault in self.plan.faults:
            if self._stop.wait(max(0.0, self._started + fault.at_s - time.monotonic())):
                return
            if fault.kind in ("kill_service", "db_restart"):
                worker = threading.Thread(target=self._inject, args=(fault,), name=f"fault-{fault.kind}")
                worker.start()
                self._workers.append(worker)
            else:
                self._inject(fault)

    def _inject(self, fault: Fault) -> None:
        """Carry out one fault; a failure to inject is recorded (the soak reports it), never raised."""
        details = fault.details
        try:
            if fault.kind == "kill_service":
                self.say(f"fault: kill -9 {details['service']}, back in {details['down_s']:.1f} s")
                kill_service(self.stack, details["service"], details["down_s"])
            elif fault.kind == "db_restart":
                self.say(f"fault: PostgreSQL restart ({details['down_s']:.1f} s down)")
                restart_database(self.stack, details["down_s"])
            elif fault.kind.startswith("changenow_"):
                changenow_fault(self.stack, details["route"], details["kind"], details["count"],
                                details.get("retry_after", "1"))
                self.changenow_calls += details["count"]
            else:
                self.proxy.arm(details["kind"], details["method"])
            self.injected[fault.kind] += 1
        except Exception as exc:  # noqa: BLE001 - reported in the soak's result
            self.errors.append(f"{fault.kind} {details}: {type(exc).__name__}: {exc}")
            log.warning("fault %s not injected: %s", fault.kind, exc)
