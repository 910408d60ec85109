"""The stack's Cloud Tasks dispatch (emulator.py) in-process: immediate, once-per-task delivery, retries,
scheduled tasks, the HTTP request each delivery sends, and connections kept to the targets."""
from __future__ import annotations

import datetime
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from gcloud_tasks_emulator import server
from google.cloud import tasks_v2

from telepay_shared.cloudtasks import TasksClient
from telepay_shared.testing.tasks_emulator import DeliveryRecorder, free_port, install_cloud_tasks_fidelity
from tools.devstack import emulator

QUEUE = "emulator-test"
_SEND_REQUEST = server._make_task_request  # the emulator's own, before any patch: the reference request


@pytest.fixture(scope="module")
def tasks():
    """The patched emulator as world.serve_tasks runs it (without OIDC), on a free port, and a client."""
    install_cloud_tasks_fidelity(server)
    emulator.deliver_over_kept_connections(server)
    emulator.dispatch_concurrently(server, 4)
    server._LOOP_SLEEP_TIME = 0.05
    port = free_port()
    running = server.create_server("127.0.0.1", port, max_retries=-1)
    running.start()
    try:  # stopped whatever happens: its threads would keep the test process alive
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)  # start() returns before it listens
        client = TasksClient("p", "l", emulator_host=f"127.0.0.1:{port}")
        client.ensure_queue(QUEUE)
        yield client
    finally:
        running.stop()


@pytest.fixture()
def recorder():
    """A receiver of the deliveries."""
    with DeliveryRecorder() as started:
        yield started


def test_each_task_is_delivered_once_at_once(tasks, recorder):
    created = time.monotonic()
    names = {tasks.enqueue(QUEUE, recorder.url("/hop"), {"n": n}, idempotency_key=f"once-{n}") for n in range(30)}
    deliveries = recorder.expect_exactly(30, timeout_s=10, quiet_s=0.5)
    assert {delivery.headers["x-cloudtasks-taskname"] for delivery in deliveries} == {n.rsplit("/", 1)[-1]
                                                                                   for n in names}
    assert min(delivery.received_at for delivery in deliveries) - created < 2.0
    assert list(tasks.raw_client.list_tasks(parent=tasks.queue_path(QUEUE))) == []


def test_a_failed_delivery_is_retried_and_listed_until_answered(tasks):
    with DeliveryRecorder(statuses=[503, 500]) as failing:
        tasks.enqueue(QUEUE, failing.url("/flaky"), {"a": 1}, idempotency_key="retried")
        failing.wait_for(1)
        assert len(list(tasks.raw_client.list_tasks(parent=tasks.queue_path(QUEUE)))) == 1
        deliveries = failing.expect_exactly(3, timeout_s=5, quiet_s=0.5)
    assert [d.headers["x-cloudtasks-taskretrycount"] for d in deliveries] == ["0", "1", "2"]
    gaps = [later.received_at - earlier.received_at for earlier, later in zip(deliveries, deliveries[1:])]
    assert gaps[0] >= emulator.retry_after_s(1) * 0.9
    assert gaps[1] >= emulator.retry_after_s(2) * 0.9  # backed off: twice the first wait
    assert list(tasks.raw_client.list_tasks(parent=tasks.queue_path(QUEUE))) == []


def test_a_task_that_keeps_failing_is_retried_ever_less_often_up_to_the_cap(tasks):
    with DeliveryRecorder(statuses=[503] * 5) as failing:
        tasks.enqueue(QUEUE, failing.url("/down"), {"a": 1}, idempotency_key="backing-off")
        deliveries = failing.wait_for(6, timeout_s=15)
    gaps = [later.received_at - earlier.received_at for earlier, later in zip(deliveries, deliveries[1:])]
    # 0.1, 0.2, 0.4, 0.8, 1.6 s: five failures cost five deliveries in 3 s, not thirty.
    for failed, gap in enumerate(gaps, 1):
        assert gap >= emulator.retry_after_s(failed) * 0.9
    assert gaps[-1] > 4 * gaps[1]
    assert [emulator.retry_after_s(n) for n in (1, 2, 3, 6, 7, 50)] == [0.1, 0.2, 0.4, 3.2, 5.0, 5.0]


def test_a_scheduled_task_waits_for_its_time(tasks, recorder):
    created = time.monotonic()
    tasks.enqueue(QUEUE, recorder.url("/later"), {"a": 1}, idempotency_key="scheduled", delay_s=0.6)
    tasks.enqueue(QUEUE, recorder.url("/now"), {"a": 2}, idempotency_key="unscheduled")
    first, second = recorder.wait_for(2, timeout_s=5)
    assert (first.path, second.path) == ("/now", "/later")
    assert second.received_at - created >= 0.55
    assert second.headers["x-cloudtasks-tasketa"] != ""


@pytest.mark.parametrize("eta", [None, datetime.datetime(2026, 11, 28, 1, 2, 3, 456789, tzinfo=datetime.UTC)])
@pytest.mark.parametrize("body", [b'{"a": 1}', b""])
def test_the_request_is_the_one_the_emulator_sends(monkeypatch, eta, body):
    sent = []
    monkeypatch.setattr(server, "request", type("Urllib", (), {"Request": urllib.request.Request,
                                                              "urlopen": staticmethod(sent.append)}))
    task = tasks_v2.Task(name="projects/p/locations/l/queues/q/tasks/t-1", dispatch_count=3, http_request={
        "url": "http://127.0.0.1:9/x?y=1", "http_method": tasks_v2.HttpMethod.POST, "body": body,
        "headers": {"Content-Type": "application/json", "Authorization": "Bearer token"}})
    if eta:
        task.schedule_time = eta
    _SEND_REQUEST("projects/p/locations/l/queues/q", task, "localhost", 80)
    ours = emulator.http_task_request("projects/p/locations/l/queues/q", tasks_v2.Task.pb(task), tasks_v2.HttpMethod)

    def seen(request):
        return request.full_url, request.get_method(), request.data, sorted(
            (name, str(value)) for name, value in request.header_items())

    assert seen(ours) == seen(sent[0])


class _Target(ThreadingHTTPServer):
    """An HTTP/1.1 target that counts its connections and closes the next one after answering when told."""

    daemon_threads = True

    def __init__(self):
        self.connections, self.close_next = 0, False
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                target.connections += 1

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status = 404 if self.path == "/missing" else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if target.close_next:
                    target.close_next, self.close_connection = False, True

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_deliveries_share_a_kept_connection_and_survive_its_close():
    target = _Target()
    threading.Thread(target=target.serve_forever, daemon=True).start()
    connections = emulator.KeptConnections()
    url = f"http://127.0.0.1:{target.server_address[1]}"
    try:
        statuses = [connections.urlopen(urllib.request.Request(url + "/hop", data=b"x")).status for _ in range(5)]
        assert statuses == [200] * 5 and target.connections == 1
        target.close_next = True
        connections.urlopen(urllib.request.Request(url + "/hop", data=b"x"))
        time.sleep(0.1)  # the target has closed the kept connection
        assert connections.urlopen(urllib.request.Request(url + "/hop", data=b"x")).status == 200
        assert target.connections == 2
        with pytest.raises(urllib.error.HTTPError) as refused:
            connections.urlopen(urllib.request.Request(url + "/missing", data=b"x"))
        assert refused.value.code == 404
    finally:
        target.shutdown()
        target.server_close()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
