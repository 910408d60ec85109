"""Tests of telepay_shared.cloudtasks: the real client against the local emulator, error mapping with fakes."""
import datetime
import json
import os
import re
import time
import uuid

import google.oauth2.id_token
import pytest
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exceptions
from google.cloud import tasks_v2

from telepay_shared import cloudtasks, errors
from telepay_shared.testing.tasks_emulator import DeliveryRecorder

# The emulator, the recorder of its deliveries and the client on the emulator are the plugin's
# fixtures `tasks_emulator`, `deliveries` and `tasks`.
pytest_plugins = ["telepay_shared.testing.pytest_plugin"]

PROJECT = "telepay-test"  # the plugin's TEST_PROJECT and TEST_LOCATION, where its `tasks` client
LOCATION = "us-central1"  # creates the queues
SERVICE_ACCOUNT = "tasks-invoker@telepay-test.iam.gserviceaccount.com"


@pytest.fixture
def queue(tasks):
    """Return the short name of a fresh queue, so no test sees another's tasks."""
    name = f"q-{uuid.uuid4().hex[:12]}"
    tasks.ensure_queue(name)
    return name


class FakeTasksApi:
    """Stands in for CloudTasksClient: records create calls and raises the configured error."""

    def __init__(self, error=None):
        self.error = error
        self.calls = []

    def create_task(self, parent, task, **options):
        self.calls.append({"parent": parent, "task": task, "options": options})
        if self.error is not None:
            raise self.error
        return tasks_v2.Task(name=task.get("name") or f"{parent}/tasks/server-assigned")

    def create_queue(self, parent, queue):
        self.calls.append({"parent": parent, "queue": queue})
        if self.error is not None:
            raise self.error
        return tasks_v2.Queue(name=queue["name"])


def fake_tasks(error=None):
    """Return a TasksClient over a FakeTasksApi and the fake itself."""
    api = FakeTasksApi(error)
    return cloudtasks.TasksClient(PROJECT, LOCATION, client=api), api


def paused_task(tasks, queue):
    """Return the single task waiting on a paused queue, read back through ListTasks."""
    listed = list(tasks.raw_client.list_tasks(
        request={"parent": tasks.queue_path(queue), "response_view": tasks_v2.Task.View.FULL}
    ))
    assert len(listed) == 1
    return listed[0]


# --- delivery through the emulator -------------------------------------------------------------

def test_delivers_json_body_and_headers(tasks, queue, deliveries):
    body = {"token": "abc", "payment_id": 4479119533, "note": "é"}
    name = tasks.enqueue(queue, deliveries.url("/process?x=1"), body, idempotency_key=None,
                         headers={"X-Webhook-Signature": "sig-hex"})
    (delivery,) = deliveries.expect_exactly(1)
    assert name.startswith(tasks.queue_path(queue) + "/tasks/")
    assert delivery.path == "/process?x=1"
    assert delivery.body == json.dumps(body).encode("utf-8")
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-webhook-signature"] == "sig-hex"
    assert delivery.headers["x-cloudtasks-queuename"] == tasks.queue_path(queue)
    assert delivery.headers["x-cloudtasks-taskname"] == name.rsplit("/", 1)[-1]


def test_same_key_is_delivered_once_and_keeps_its_name(tasks, queue, deliveries):
    url = deliveries.url("/")
    first = tasks.enqueue(queue, url, {"token": "first"}, idempotency_key="payment-42")
    repeat = tasks.enqueue(queue, url, {"token": "second"}, idempotency_key="payment-42")
    deliveries.wait_for(1)
    after_delivery = tasks.enqueue(queue, url, {"token": "third"}, idempotency_key="payment-42")
    (delivery,) = deliveries.expect_exactly(1)
    assert first == repeat == after_delivery == tasks.task_path(queue, "payment-42")
    assert json.loads(delivery.body) == {"token": "first"}
    assert delivery.headers["x-cloudtasks-taskname"] == first.rsplit("/", 1)[-1]


def test_different_keys_are_two_tasks(tasks, queue, deliveries):
    url = deliveries.url("/")
    one = tasks.enqueue(queue, url, {"token": "one"}, idempotency_key="payment-1")
    two = tasks.enqueue(queue, url, {"token": "two"}, idempotency_key="payment-2")
    delivered = deliveries.expect_exactly(2)
    assert one != two
    assert sorted(json.loads(d.body)["token"] for d in delivered) == ["one", "two"]


def test_same_key_on_two_queues_is_two_tasks(tasks, queue, deliveries):
    other_queue = f"{queue}-other"
    tasks.ensure_queue(other_queue)
    here = tasks.enqueue(queue, deliveries.url("/"), {"token": "t"}, idempotency_key="payment-7")
    there = tasks.enqueue(other_queue, deliveries.url("/"), {"token": "t"}, idempotency_key="payment-7")
    deliveries.expect_exactly(2)
    assert here.rsplit("/", 1)[-1] != there.rsplit("/", 1)[-1]


def test_delay_is_honoured(tasks, queue, deliveries):
    started = time.monotonic()
    tasks.enqueue(queue, deliveries.url("/later"), {"token": "t"}, idempotency_key=None, delay_s=1.5)
    (delivery,) = deliveries.expect_exactly(1, timeout_s=10, quiet_s=0.3)
    assert delivery.received_at - started >= 1.5


def test_undelayed_task_is_delivered_promptly(tasks, queue, deliveries):
    started = time.monotonic()
    tasks.enqueue(queue, deliveries.url("/now"), {"token": "t"}, idempotency_key=None)
    (delivery,) = deliveries.wait_for(1)
    assert delivery.received_at - started < 1.5


def test_raw_body_is_delivered_byte_exact(tasks, queue, deliveries):
    signed = '{"user_id":7,  "amount":"12.50","sig":"é"}\n'.encode("utf-8")
    tasks.enqueue(queue, deliveries.url("/"), None, idempotency_key="hop-1", raw_body=signed,
                  headers={"X-Webhook-Signature": "abc"})
    (delivery,) = deliveries.expect_exactly(1)
    assert delivery.body == signed
    assert delivery.headers["content-type"] == "application/json"


def test_non_2xx_answer_is_redelivered_by_the_emulator(tasks, queue):
    with DeliveryRecorder(statuses=[503]) as flaky:
        tasks.enqueue(queue, flaky.url("/"), {"token": "t"}, idempotency_key="retry-1")
        failed, retried = flaky.expect_exactly(2)
    assert failed.body == retried.body
    assert retried.headers["x-cloudtasks-taskretrycount"] == "1"


@pytest.fixture
def local_zone_not_utc():
    """Run the test with the process's local zone at UTC-3, where a naive 'UTC' datetime is wrong."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "TPY+03"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset (POSIX)")
def test_schedule_time_is_utc_even_off_utc_hosts(tasks, queue, local_zone_not_utc):
    tasks.raw_client.pause_queue(name=tasks.queue_path(queue))
    before = datetime.datetime.now(datetime.timezone.utc)
    tasks.enqueue(queue, "https://gchostpay3.example.run.app/", {"token": "t"}, idempotency_key=None, delay_s=60)
    after = datetime.datetime.now(datetime.timezone.utc)
    scheduled = paused_task(tasks, queue).schedule_time
    delay = datetime.timedelta(seconds=60)
    assert before + delay - datetime.timedelta(seconds=1) <= scheduled <= after + delay + datetime.timedelta(seconds=1)


def test_schedule_time_is_an_aware_utc_instant():
    tasks, api = fake_tasks()
    before = datetime.datetime.now(datetime.timezone.utc)
    tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key=None, delay_s=300)
    tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key=None)
    after = datetime.datetime.now(datetime.timezone.utc)
    scheduled = api.calls[0]["task"]["schedule_time"]
    assert scheduled.utcoffset() == datetime.timedelta(0)
    assert before + datetime.timedelta(seconds=300) <= scheduled <= after + datetime.timedelta(seconds=300)
    assert "schedule_time" not in api.calls[1]["task"]


# --- the created task --------------------------------------------------------------------------

def test_oidc_token_is_set_with_the_target_origin_as_audience(tasks_emulator, queue):
    tasks = cloudtasks.TasksClient(PROJECT, LOCATION, emulator_host=tasks_emulator.host,
                                   oidc_service_account=SERVICE_ACCOUNT)
    tasks.raw_client.pause_queue(name=tasks.queue_path(queue))
    tasks.enqueue(queue, "https://gcsplit1-abc-uc.a.run.app/batch-payout?x=1", {"token": "t"},
                  idempotency_key="batch-1")
    created = paused_task(tasks, queue)
    assert "oidc_token" in created.http_request
    assert created.http_request.oidc_token.service_account_email == SERVICE_ACCOUNT
    assert created.http_request.oidc_token.audience == "https://gcsplit1-abc-uc.a.run.app"
    assert created.http_request.http_method == tasks_v2.HttpMethod.POST
    assert created.http_request.url == "https://gcsplit1-abc-uc.a.run.app/batch-payout?x=1"


def test_delivered_tasks_carry_an_id_token_of_the_emulators_issuer_reused_across_tasks(tasks_emulator, queue,
                                                                                        deliveries, oidc_issuer):
    """As Cloud Tasks does, each delivery carries Authorization: Bearer <ID token> for the account and the
    audience; one token is minted per account and audience and reused while it is young."""
    tasks = cloudtasks.TasksClient(PROJECT, LOCATION, emulator_host=tasks_emulator.host,
                                   oidc_service_account=SERVICE_ACCOUNT)
    for number in range(2):
        tasks.enqueue(queue, deliveries.url(f"/hop?n={number}"), {"token": "t"}, idempotency_key=f"oidc-{number}")
    got = deliveries.expect_exactly(2, quiet_s=0.3)
    bearer = {d.headers["authorization"] for d in got}
    assert len(bearer) == 1  # minted once for both tasks
    claims = google.oauth2.id_token.verify_token(bearer.pop().removeprefix("Bearer "), oidc_issuer.transport(),
                                                 audience=cloudtasks.audience_for(deliveries.url()), certs_url="http://certs")
    assert (claims["email"], claims["email_verified"]) == (SERVICE_ACCOUNT, True)


def test_no_oidc_token_without_a_service_account(tasks, queue):
    tasks.raw_client.pause_queue(name=tasks.queue_path(queue))
    tasks.enqueue(queue, "https://gcsplit1-abc-uc.a.run.app/", {"token": "t"}, idempotency_key=None)
    created = paused_task(tasks, queue)
    assert "oidc_token" not in created.http_request
    assert created.http_request.url == "https://gcsplit1-abc-uc.a.run.app/"


def test_caller_content_type_replaces_the_json_default():
    tasks, api = fake_tasks()
    tasks.enqueue("q", "https://a.example/", None, idempotency_key=None, raw_body=b"x=1",
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert api.calls[0]["task"]["http_request"]["headers"] == {"content-type": "application/x-www-form-urlencoded"}


# --- task names --------------------------------------------------------------------------------

def test_task_id_is_deterministic_and_valid_for_cloud_tasks():
    task_id = cloudtasks.task_id_for("gcsplit-webhook-queue", "np:4479119533")
    assert task_id == cloudtasks.task_id_for("gcsplit-webhook-queue", "np:4479119533")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,500}", task_id)
    assert task_id != cloudtasks.task_id_for("gcsplit-webhook-queue", "np:4479119534")
    assert task_id != cloudtasks.task_id_for("gcsplit1-batch-queue", "np:4479119533")


def test_named_creates_are_retried_and_unnamed_are_not():
    tasks, api = fake_tasks()
    tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key="k")
    tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key=None)
    assert api.calls[0]["options"] == {"retry": cloudtasks.NAMED_CREATE_RETRY}
    assert api.calls[1]["options"] == {}
    assert "name" not in api.calls[1]["task"]


# --- error mapping -----------------------------------------------------------------------------

def test_missing_queue_on_the_emulator_is_a_config_error(tasks, deliveries):
    with pytest.raises(errors.ConfigError, match="queues/no-such-queue"):
        tasks.enqueue("no-such-queue", deliveries.url("/"), {"token": "t"}, idempotency_key="k")


@pytest.mark.parametrize("google_error", [
    gexc.NotFound("queue not found"),
    gexc.FailedPrecondition("queue does not exist"),
    gexc.PermissionDenied("cloudtasks.tasks.create denied"),
])
def test_queue_and_permission_problems_are_config_errors(google_error):
    tasks, _ = fake_tasks(google_error)
    with pytest.raises(errors.ConfigError) as raised:
        tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key="k")
    assert raised.value.__cause__ is google_error


@pytest.mark.parametrize("google_error", [
    gexc.ServiceUnavailable("unavailable"),
    gexc.DeadlineExceeded("deadline"),
    gexc.ResourceExhausted("quota"),
    gexc.InternalServerError("internal"),
    gexc.Aborted("aborted"),
    gexc.RetryError("gave up", cause=gexc.ServiceUnavailable("unavailable")),
    auth_exceptions.TransportError("metadata server unreachable"),
])
def test_transient_failures_raise_task_enqueue_failed(google_error):
    tasks, _ = fake_tasks(google_error)
    with pytest.raises(errors.TaskEnqueueFailed) as raised:
        tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key="k")
    assert isinstance(raised.value, errors.TransientError)
    assert raised.value.http_status == 503
    assert raised.value.details == {"queue": "q"}
    assert raised.value.__cause__ is google_error


def test_other_google_errors_propagate_unchanged():
    invalid = gexc.InvalidArgument("task too large")
    tasks, _ = fake_tasks(invalid)
    with pytest.raises(gexc.InvalidArgument) as raised:
        tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key="k")
    assert raised.value is invalid


def test_already_exists_is_success_only_for_named_tasks():
    tasks, _ = fake_tasks(gexc.AlreadyExists("exists"))
    assert tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key="k") == tasks.task_path("q", "k")
    with pytest.raises(gexc.AlreadyExists):
        tasks.enqueue("q", "https://a.example/", {"token": "t"}, idempotency_key=None)


@pytest.mark.parametrize("arguments, problem", [
    ({"body": {"a": 1}, "raw_body": b"{}"}, "exactly one"),
    ({"body": None}, "exactly one"),
    ({"body": {"a": 1}, "delay_s": -1}, "delay_s"),
    ({"body": {"a": 1}, "url": "/relative"}, "absolute"),
    ({"body": {"a": 1}, "idempotency_key": ""}, "non-empty"),
])
def test_invalid_calls_are_refused_before_any_request(arguments, problem):
    tasks, api = fake_tasks()
    call = {"url": "https://a.example/", "idempotency_key": None, **arguments}
    with pytest.raises(ValueError, match=problem):
        tasks.enqueue("q", call.pop("url"), call.pop("body"), **call)
    assert api.calls == []


# --- queues ------------------------------------------------------------------------------------

def test_ensure_queue_is_idempotent_on_the_emulator(tasks):
    name = f"q-{uuid.uuid4().hex[:12]}"
    assert tasks.ensure_queue(name) == tasks.ensure_queue(name) == tasks.queue_path(name)
    listed = [q.name for q in tasks.raw_client.list_queues(parent=tasks.location_path())]
    assert listed.count(tasks.queue_path(name)) == 1


def test_ensure_queue_accepts_already_exists_and_maps_transient_errors():
    existing, _ = fake_tasks(gexc.AlreadyExists("exists"))
    assert existing.ensure_queue("q") == f"projects/{PROJECT}/locations/{LOCATION}/queues/q"
    unavailable, _ = fake_tasks(gexc.ServiceUnavailable("down"))
    with pytest.raises(errors.TaskEnqueueFailed):
        unavailable.ensure_queue("q")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
