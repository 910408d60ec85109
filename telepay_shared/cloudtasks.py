"""Cloud Tasks producer: every inter-service hop is enqueued through `TasksClient.enqueue`.

The legacy services (spec §5, §11 items 8-13 and 20) created unnamed tasks without OIDC tokens,
turned every creation error into `None`, and passed a naive `utcnow()` as the schedule time.
Redelivered requests therefore queued a second payout for the same payment. Here:

* A task created with an idempotency key gets a deterministic name,
  sha256(queue, key). Cloud Tasks refuses a second task with that name (ALREADY_EXISTS), and
  `enqueue` treats that refusal as success and returns the same name. So a handler that is
  redelivered and enqueues again with the same key does not produce a second downstream task.
  Cloud Tasks keeps a name reserved only for a while after the task ran or was deleted (about an
  hour, up to 9 days for queue.yaml queues), so this is a first line of defence; receivers must
  still be idempotent in the database.
* Named creates are retried on transient gRPC errors: a retry of a create that did land answers
  ALREADY_EXISTS, which is success. Unnamed creates are never retried, because that could
  duplicate them.
* Errors are typed. Transient failures raise `errors.TaskEnqueueFailed` (a TransientError, so the
  calling request answers 5xx and its own task is redelivered). A missing queue
  (NOT_FOUND / FAILED_PRECONDITION) or a missing permission (PERMISSION_DENIED) raises
  `errors.ConfigError`: a deployment fault, never a reason to answer 4xx and drop a payment. The
  web layer reports it as an unexpected 500, so the incoming task is retried until the queue
  exists. Anything else (for example INVALID_ARGUMENT, which is a bug in the caller) propagates
  unchanged.
* The delay is a timezone-aware UTC `schedule_time`. When an OIDC service account is configured,
  every task carries an OIDC token whose audience is the origin of the target URL (what Cloud Run
  checks).

Money never reaches this module as a float. `json.dumps` rejects `Decimal`, so callers put
amounts into the body as strings.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from urllib.parse import urlsplit

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

from telepay_shared import errors

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"

# gRPC outcomes after which the same create may succeed; RetryError is what our own retry
# raises when it gives up, and TransportError what google-auth raises when it cannot mint a token.
TRANSIENT_ERRORS = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.ResourceExhausted,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.RetryError,
    auth_exceptions.TransportError,
)

# Outcomes that only an operator can fix (queue absent or disabled, IAM missing).
CONFIG_ERRORS = (gexc.NotFound, gexc.FailedPrecondition, gexc.PermissionDenied)

# Safe only for named tasks: a repeat of a create that landed is answered ALREADY_EXISTS.
NAMED_CREATE_RETRY = gretry.Retry(
    predicate=gretry.if_exception_type(
        gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.Aborted
    ),
    initial=0.2,
    maximum=2.0,
    multiplier=2.0,
    timeout=15.0,
)


def task_id_for(queue: str, idempotency_key: str) -> str:
    """Return the Cloud Tasks task id ([0-9a-f]{64}) that one idempotency key maps to on one queue."""
    if not idempotency_key:
        raise ValueError("idempotency_key must be a non-empty string or None")
    digest = hashlib.sha256(f"{queue}\x00{idempotency_key}".encode("utf-8"))
    return digest.hexdigest()


def audience_for(url: str) -> str:
    """Return the OIDC audience for a target URL: its origin (scheme://host[:port])."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"task URL must be absolute, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def emulator_client(emulator_host: str) -> tasks_v2.CloudTasksClient:
    """Return a Cloud Tasks client speaking plaintext gRPC to a local emulator, without credentials."""
    transport = CloudTasksGrpcTransport(
        credentials=AnonymousCredentials(), channel=grpc.insecure_channel(emulator_host)
    )
    return tasks_v2.CloudTasksClient(transport=transport)


def _request_headers(extra: dict | None) -> dict:
    """Merge caller headers over the JSON content type, letting a caller's Content-Type win."""
    extra = dict(extra or {})
    if any(name.lower() == "content-type" for name in extra):
        return extra
    return {"Content-Type": JSON_CONTENT_TYPE, **extra}


def _request_body(body: dict | None, raw_body: bytes | None) -> bytes:
    """Return the bytes to deliver: exactly `raw_body`, or `body` as UTF-8 JSON."""
    if (body is None) == (raw_body is None):
        raise ValueError("pass exactly one of body and raw_body")
    if raw_body is not None:
        return bytes(raw_body)
    return json.dumps(body).encode("utf-8")


def _schedule_time(delay_s: float) -> datetime.datetime | None:
    """Return the aware UTC instant `delay_s` from now, or None to run at once."""
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    if delay_s == 0:
        return None
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delay_s)


class TasksClient:
    """Enqueues HTTP POST tasks on the queues of one project and location."""

    def __init__(
        self,
        project: str,
        location: str,
        emulator_host: str | None = None,
        oidc_service_account: str | None = None,
        client=None,
    ):
        self.project = project
        self.location = location
        self.oidc_service_account = oidc_service_account
        if client is None:
            client = emulator_client(emulator_host) if emulator_host else tasks_v2.CloudTasksClient()
        self.raw_client = client

    @classmethod
    def from_config(cls, config) -> "TasksClient":
        """Build from a service Config declaring CLOUD_TASKS_PROJECT_ID and CLOUD_TASKS_LOCATION.

        Optional: CLOUD_TASKS_EMULATOR_HOST (host:port of a local emulator) and
        CLOUD_TASKS_OIDC_SERVICE_ACCOUNT (tasks carry an OIDC token minted for that account).
        """
        return cls(
            config.CLOUD_TASKS_PROJECT_ID,
            config.CLOUD_TASKS_LOCATION,
            emulator_host=config.get("CLOUD_TASKS_EMULATOR_HOST"),
            oidc_service_account=config.get("CLOUD_TASKS_OIDC_SERVICE_ACCOUNT"),
        )

    def location_path(self) -> str:
        """Return projects/<project>/locations/<location>."""
        return tasks_v2.CloudTasksClient.common_location_path(self.project, self.location)

    def queue_path(self, queue: str) -> str:
        """Return the full resource name of a queue given its short name."""
        return tasks_v2.CloudTasksClient.queue_path(self.project, self.location, queue)

    def task_path(self, queue: str, idempotency_key: str) -> str:
        """Return the task name that `enqueue` uses for this queue and idempotency key."""
        return tasks_v2.CloudTasksClient.task_path(
            self.project, self.location, queue, task_id_for(queue, idempotency_key)
        )

    def build_task(
        self, queue: str, url: str, payload: bytes, headers: dict, delay_s: float,
        idempotency_key: str | None,
    ) -> dict:
        """Return the Task (as a dict) that `enqueue` submits."""
        http_request = {"http_method": tasks_v2.HttpMethod.POST, "url": url, "headers": headers, "body": payload}
        if self.oidc_service_account:
            http_request["oidc_token"] = {
                "service_account_email": self.oidc_service_account,
                "audience": audience_for(url),
            }
        task = {"http_request": http_request}
        if idempotency_key is not None:
            task["name"] = self.task_path(queue, idempotency_key)
        schedule_time = _schedule_time(delay_s)
        if schedule_time is not None:
            task["schedule_time"] = schedule_time
        return task

    def enqueue(
        self,
        queue: str,
        url: str,
        body: dict | None,
        *,
        idempotency_key: str | None,
        delay_s: float = 0,
        headers: dict | None = None,
        raw_body: bytes | None = None,
    ) -> str:
        """Create an HTTP POST task on `queue` and return its name; a repeated key returns the first name."""
        audience_for(url)  # reject a relative URL even when no OIDC token needs its origin
        task = self.build_task(
            queue, url, _request_body(body, raw_body), _request_headers(headers), delay_s, idempotency_key
        )
        create_options = {"retry": NAMED_CREATE_RETRY} if idempotency_key is not None else {}
        try:
            created = self.raw_client.create_task(parent=self.queue_path(queue), task=task, **create_options)
        except gexc.AlreadyExists:
            if idempotency_key is None:
                raise
            log.info("task already enqueued", extra={"queue": queue, "task": task["name"]})
            return task["name"]
        except CONFIG_ERRORS as exc:
            raise errors.ConfigError(f"Cloud Tasks queue {self.queue_path(queue)} unusable: {exc}") from exc
        except TRANSIENT_ERRORS as exc:
            raise errors.TaskEnqueueFailed(f"enqueue on {queue} failed: {exc}", queue=queue) from exc
        log.info("task enqueued", extra={"queue": queue, "task": created.name})
        return created.name

    def ensure_queue(self, name: str) -> str:
        """Create the queue `name` unless it exists and return its full resource name (local dev, tests)."""
        queue_path = self.queue_path(name)
        try:
            self.raw_client.create_queue(parent=self.location_path(), queue={"name": queue_path})
        except gexc.AlreadyExists:
            pass
        except TRANSIENT_ERRORS as exc:
            raise errors.TaskEnqueueFailed(f"creating queue {name} failed: {exc}", queue=name) from exc
        return queue_path
