"""A local Cloud Tasks emulator in a subprocess, and an HTTP receiver that records what it delivers.

`TasksEmulator` runs the PyPI package gcloud-tasks-emulator on a free 127.0.0.1 port. Point
`telepay_shared.cloudtasks.TasksClient(..., emulator_host=emulator.host)` at it. The emulator
delivers to real URLs, so give tasks a `DeliveryRecorder.url(...)` as their target and assert
on `recorder.wait_for(n)`.

What gcloud-tasks-emulator 0.6.2 does (checked against its server.py and by probing):
* HTTP tasks are sent with their own method (default POST) to the exact `http_request.url`
  (host, port, path and query). `--target-host/--target-port` only apply to App Engine tasks.
  The body bytes are sent unchanged. The headers are the task's own plus X-CloudTasks-QueueName,
  -TaskName (the id, not the full path), -TaskRetryCount, -TaskExecutionCount and -TaskETA. The
  request is made with urllib, so User-Agent is Python-urllib/3.x. A task without a
  Content-Type header arrives as application/x-www-form-urlencoded (urllib's default).
* `schedule_time` is honoured: each queue is polled every 0.1 s and a task that is not yet due
  goes back to the end of the queue.
* Any answer from 400 to 599, and any connection error, is retried on the next 0.1 s pass: there
  is no backoff and no limit unless --max-retries is given. Queue retry and rate settings are
  ignored. Each queue delivers one task at a time through `urlopen` with no timeout, so a
  receiver that hangs stalls its queue.
* OIDC tokens are stored on the task but never minted: no Authorization header is sent.
  `install_oidc_tokens` adds them (below).
* Task names are stored but NOT de-duplicated: creating the same name twice creates two tasks,
  and both are delivered. Production Cloud Tasks answers ALREADY_EXISTS, and that refusal is
  what `TasksClient.enqueue` relies on for idempotency.
* CreateTask on a missing queue answers FAILED_PRECONDITION; production answers NOT_FOUND.
* CreateQueue on an existing queue returns that queue (production: ALREADY_EXISTS). GetQueue on a
  missing queue answers UNKNOWN (an uncaught KeyError). GetTask and DeleteTask answer
  UNIMPLEMENTED. ListTasks shows only tasks not yet delivered and ignores `response_view`.
  PauseQueue and ResumeQueue work, so to inspect a created task, pause its queue first and call
  list_tasks.
* The gRPC server listens on [::]:<port> (every interface), whatever host it is given.

So the subprocess started here is the emulator with three changes that make it answer as
production does (see `install_cloud_tasks_fidelity`). A reused task name answers
ALREADY_EXISTS; the emulator remembers names for its whole life, whereas production frees them
about an hour after the task ran or was deleted. A missing queue answers NOT_FOUND. And
(`install_oidc_tokens`) a task whose http_request has an oidc_token is delivered with
`Authorization: Bearer <ID token>`, minted at each delivery for its service_account_email and
audience (the task's URL when it names none) by a local issuer (telepay_shared.testing.oidc):
`TasksEmulator.oidc_issuer`, whose certificates a `CertsServer` publishes for the services.

Version notes:
* 0.4.0 cannot run with google-cloud-tasks 2.x: it imports `google.cloud.tasks_v2.proto`, which
  was removed in 2.0. Use 0.5 or later.
* 0.6.2 declares `protobuf<5` but runs with protobuf 7.36 (pip check complains). Install it with
  `--no-deps`, or override that pin in the lock file.
* It calls `datetime.utcnow()`, deprecated since Python 3.12 (a DeprecationWarning in the
  subprocess's log, still present in 3.14). It declares no classifiers beyond Python 3, and its
  last release was 2024-09.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from google.api_core import exceptions as gexc

from telepay_shared.testing.harness import Harness
from telepay_shared.testing.oidc import OidcIssuer

LOOPBACK = "127.0.0.1"
TOKEN_REUSE_S = 300.0  # a minted ID token is attached to the tasks of the next five minutes (it lives an hour)
EMULATOR_MODULE = "telepay_shared.testing.tasks_emulator"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def install_cloud_tasks_fidelity(server_module) -> None:
    """Patch the emulator so reused task names answer ALREADY_EXISTS and missing queues NOT_FOUND."""
    state_class = server_module.QueueState
    create_task = state_class.create_task
    names_lock = threading.Lock()
    used_names: set[str] = set()

    def create_task_like_cloud_tasks(self, queue, task):
        """Create a task, refusing a name this emulator has already seen."""
        if queue not in self._queue_tasks:
            raise gexc.NotFound(f"Queue {queue} does not exist.")
        if task.name:
            with names_lock:
                if task.name in used_names:
                    raise gexc.AlreadyExists(f"Requested entity already exists: {task.name}")
                used_names.add(task.name)
        return create_task(self, queue, task)

    state_class.create_task = create_task_like_cloud_tasks


def install_oidc_tokens(server_module, issuer: OidcIssuer) -> None:
    """Patch the emulator so a task with an oidc_token is delivered with the ID token Cloud Tasks would attach."""
    make_task_request = server_module._make_task_request
    minted: dict[tuple[str, str], tuple[float, str]] = {}  # (audience, account) -> (minted at, token)
    minting = threading.Lock()

    def token_for(audience: str, account: str) -> str:
        """An unexpired ID token for the account and audience: one is minted per TOKEN_REUSE_S, not per task
        (an RSA signature each), as Google's token sources reuse theirs; each is valid far longer."""
        now = time.monotonic()
        with minting:
            at, token = minted.get((audience, account), (-TOKEN_REUSE_S, ""))
            if now - at >= TOKEN_REUSE_S:
                token = issuer.mint(audience, account)
                minted[(audience, account)] = (now, token)
            return token

    def make_task_request_with_identity(queue_name, task, host, port):
        """Deliver the task; one with an oidc_token carries a token in a copy, so none is stored."""
        stored = type(task).pb(task)  # the protobuf itself: proto-plus converts on every read
        identity = stored.http_request.oidc_token
        if not identity.service_account_email:
            return make_task_request(queue_name, task, host, port)
        token = token_for(identity.audience or stored.http_request.url, identity.service_account_email)
        signed = type(stored)()
        signed.CopyFrom(stored)  # a protobuf copy: proto-plus's deepcopy walks every field in Python
        signed.http_request.headers["Authorization"] = "Bearer " + token
        return make_task_request(queue_name, type(task).wrap(signed), host, port)

    server_module._make_task_request = make_task_request_with_identity


def _child_environment() -> dict:
    """Return the environment for the emulator subprocess, with this process's import path."""
    # Under Bazel the packages live in runfiles directories listed only in sys.path.
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    return environment


class TasksEmulator(Harness):
    """gcloud-tasks-emulator (patched for fidelity) running as a subprocess on 127.0.0.1."""

    def __init__(self, startup_timeout_s: float = 20.0, max_retries: int = -1, oidc_issuer: OidcIssuer | None = None):
        self.startup_timeout_s = startup_timeout_s
        self.max_retries = max_retries
        self.oidc_issuer = oidc_issuer or OidcIssuer()  # signs the OIDC tokens of the tasks it delivers
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._log_dir: tempfile.TemporaryDirectory | None = None

    @property
    def host(self) -> str:
        """Return host:port for `TasksClient(emulator_host=...)`."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Return the file that collects the emulator's output."""
        return Path(self._log_dir.name) / "emulator.log"

    def log_text(self) -> str:
        """Return what the emulator has logged so far (for failure messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "TasksEmulator":
        """Start the subprocess and return once it accepts gRPC connections."""
        self.port = free_port()
        self._log_dir = tempfile.TemporaryDirectory(prefix="tasks-emulator-")
        key_path = Path(self._log_dir.name) / "oidc-key.pem"
        key_path.touch(mode=0o600)
        key_path.write_text(self.oidc_issuer.private_pem())
        command = [sys.executable, "-m", EMULATOR_MODULE, "--port", str(self.port),
                   "--max-retries", str(self.max_retries), "--oidc-key", str(key_path)]
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=_child_environment(),
            )
        with self.stopped_on_failure():
            self._wait_until_serving()
        return self

    def _wait_until_serving(self) -> None:
        """Block until the gRPC port accepts a connection; fail early if the process dies."""
        deadline = time.monotonic() + self.startup_timeout_s
        channel = grpc.insecure_channel(self.host)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"tasks emulator exited with {self._process.returncode}:\n{self.log_text()}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.25)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"tasks emulator not serving after {self.startup_timeout_s}s:\n{self.log_text()}")
        finally:
            channel.close()

    def stop(self) -> None:
        """Stop the subprocess (SIGTERM, then SIGKILL after 5 s) and delete its log."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None


@dataclass(frozen=True)
class Delivery:
    """One HTTP request the receiver got: path with query, lower-cased headers, raw body."""

    path: str
    headers: dict
    body: bytes
    received_at: float  # time.monotonic() when the body had been read


class DeliveryRecorder(Harness):
    """An HTTP server on 127.0.0.1 that records every POST and answers the next scripted status."""

    def __init__(self, statuses=()):
        self._statuses = list(statuses)  # answered in order, then 200
        # URLs carry a prefix unique to this recorder: the emulator keeps redelivering an earlier
        # test's tasks, and a later recorder may be given the same port; those are not ours.
        self._prefix = "/" + secrets.token_hex(6)
        self._deliveries: list[Delivery] = []
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "DeliveryRecorder":
        """Start serving in a daemon thread."""
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                recorder._record(self)

            def log_message(self, *args):
                pass  # the test output should show assertions, not access logs

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def url(self, path: str = "/") -> str:
        """Return the absolute URL of `path` on this receiver."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}{self._prefix}{path}"

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        """Store one request and answer it with the next scripted status."""
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        headers = {name.lower(): value for name, value in handler.headers.items()}
        if not handler.path.startswith(self._prefix):
            handler.send_response(200)  # a stale task of another recorder: accept it so it stops
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        with self._changed:
            path = handler.path[len(self._prefix):] or "/"
            self._deliveries.append(Delivery(path, headers, body, time.monotonic()))
            status = self._statuses.pop(0) if self._statuses else 200
            self._changed.notify_all()
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def deliveries(self) -> list[Delivery]:
        """Return the deliveries so far, oldest first."""
        with self._changed:
            return list(self._deliveries)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Delivery]:
        """Return the deliveries once there are at least `count`; raise AssertionError on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._deliveries) >= count, timeout_s):
                raise AssertionError(f"expected {count} deliveries within {timeout_s}s, got {len(self._deliveries)}")
            return list(self._deliveries)

    def expect_exactly(self, count: int, timeout_s: float = 10.0, quiet_s: float = 1.0) -> list[Delivery]:
        """Wait for `count` deliveries, then check that none more arrive within `quiet_s`."""
        self.wait_for(count, timeout_s)
        time.sleep(quiet_s)
        deliveries = self.deliveries()
        if len(deliveries) != count:
            raise AssertionError(f"expected exactly {count} deliveries, got {len(deliveries)}")
        return deliveries

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main(argv=None) -> int:
    """Run the patched emulator in this process until it is terminated (the subprocess entry point)."""
    parser = argparse.ArgumentParser(description="gcloud-tasks-emulator with Cloud Tasks name de-duplication")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-retries", type=int, default=-1)
    parser.add_argument("--oidc-key", help="PEM file of the key that signs tasks' OIDC tokens (none: no token)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Imported here so a test process that only uses DeliveryRecorder does not need the package.
    try:
        from gcloud_tasks_emulator import server
    except ModuleNotFoundError as exc:  # 0.4.x imports google.cloud.tasks_v2.proto, gone since 2.0
        raise SystemExit(f"gcloud-tasks-emulator >= 0.5 is required: {exc}")

    install_cloud_tasks_fidelity(server)
    if args.oidc_key:
        install_oidc_tokens(server, OidcIssuer.from_pem(Path(args.oidc_key).read_bytes()))
    server.create_server(LOOPBACK, args.port, max_retries=args.max_retries).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
