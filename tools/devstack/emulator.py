"""Cloud Tasks' dispatch for gcloud-tasks-emulator (the stack's `tasks` part, world.py).

The emulator wakes each queue every 0.1 s and delivers its tasks one at a time, waiting for each
answer: every hop waits up to a poll for its turn, and a queue's throughput is one over its
slowest handler (GCHostPay3 signing and broadcasting: a few per second). Cloud Tasks dispatches a
new task within milliseconds and up to max_concurrent_dispatches tasks of a queue at once (spec
§5: 10 for the GCHostPay queues, 50 to 150 for the others). `dispatch_concurrently` makes the
emulator do the same: a new task wakes its queue at once, up to N deliveries of a queue are in
flight, and a failed delivery is retried with a doubling wait (retry_after_s, as Cloud Tasks backs off). A wake
costs what arrived since the last one (new, retried and now-due tasks), never a scan of the
queue's backlog, and an idle queue sleeps until woken. `deliver_over_kept_connections` sends each
delivery as the emulator builds it, over an HTTP/1.1 connection kept open to its target (the
emulator's urlopen opens one per delivery, and the target accepts it).

A task stays in the queue's list while it is being delivered and leaves it only once answered 2xx
(or given up on), so ListTasks, and with it `tools/dev down`, also sees tasks in flight: a task
saved while in flight may be delivered twice, as Cloud Tasks may deliver any task twice, never lost.

Duplicate deliveries (the soak's fault, tools/devstack/faults.py): Cloud Tasks delivers at least
once, so a handler may see the same task twice, even at the same time. While the control file
run/tasks-faults.json of the stack folder (every part runs in it) says {"duplicate_share": S,
"seed": N}, each task dispatched is, with probability S, delivered once more: either at the same
moment as its first delivery, or again shortly after that delivery was answered 2xx (the answer
"lost"). A duplicate's answer is ignored, as Cloud Tasks ignores it; what was done is counted in
run/tasks-faults-stats.json.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib import error

# A failed delivery is retried after RETRY_MIN_S, the wait doubling at each failure up to RETRY_MAX_S,
# as Cloud Tasks' min_backoff/max_backoff do (the stack's own short bounds: a restarted service is
# back in a second or two). A fixed pace would redeliver a task that keeps failing (a host wallet
# out of ETH) ten times a second for as long as it fails, the whole stack's CPU spent on it.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
IDLE_LOOK_S = 1.0  # an idle queue looks again this often anyway (a resumed queue, a stop)
# Relative to the part's working directory: the stack starts every part in its folder (stack.py).
FAULTS_FILE, FAULT_STATS_FILE = Path("run", "tasks-faults.json"), Path("run", "tasks-faults-stats.json")
CONTROL_EVERY_S = 0.5  # how often the control file is looked at
LATE_DUPLICATE_S = (0.05, 1.5)  # a duplicate after success comes this long after the 2xx

log = logging.getLogger("devstack.emulator")


def _saved_counts(stats: Path) -> dict:
    """The duplicate counts a stats file holds ({} when there is none or it is unreadable)."""
    try:
        saved = json.loads(stats.read_text())
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in saved.items() if isinstance(value, int)} if isinstance(saved, dict) else {}


class Duplicator:
    """Decides which deliveries Cloud Tasks repeats (module docstring); one per emulator, shared by its queues."""

    def __init__(self, control: Path = FAULTS_FILE, stats: Path = FAULT_STATS_FILE):
        self.control, self.stats_path = control, stats
        self.share, self.rng = 0.0, random.Random()
        # The counts go on from what an earlier emulator process of the stack wrote: the soak reports
        # the difference between two readings, and a restarted emulator starting again from zero made
        # a whole soak's duplicates read as none.
        self.counts: Counter = Counter(_saved_counts(stats))
        self._lock = threading.Lock()
        self._seen: tuple | None = None  # (mtime, size) of the control file last read
        self._looked_at = 0.0
        self.late: set[str] = set()  # task names to deliver again once answered 2xx
        self.decided: set[str] = set()  # each task is drawn once, not again on every retry

    def _refresh(self) -> None:
        """Under the lock: re-read the control file when it changed (at most every CONTROL_EVERY_S)."""
        if time.monotonic() - self._looked_at < CONTROL_EVERY_S:
            return
        self._looked_at = time.monotonic()
        try:
            stat = self.control.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                settings = json.loads(self.control.read_text())
                self.share = float(settings.get("duplicate_share", 0.0))
                self.rng = random.Random(settings.get("seed"))
                self._seen = seen
        except (OSError, ValueError):
            self.share, self._seen = 0.0, None

    def choose(self, task_name: str) -> str | None:
        """'concurrent', 'after_success' or None (deliver once) for a task about to be delivered."""
        with self._lock:
            self._refresh()
            if task_name in self.decided or self.share <= 0:
                return None
            self.decided.add(task_name)
            if self.rng.random() >= self.share:
                return None
            mode = self.rng.choice(("concurrent", "after_success"))
            if mode == "after_success":
                self.late.add(task_name)
            return mode

    def take_late(self, task_name: str) -> float | None:
        """The delay of a duplicate due now that the task was answered 2xx, or None."""
        with self._lock:
            if task_name not in self.late:
                return None
            self.late.discard(task_name)
            return self.rng.uniform(*LATE_DUPLICATE_S)

    def count(self, mode: str, status: int) -> None:
        """Record one duplicate delivery and its answer, in the stats file the soak reads."""
        with self._lock:
            self.counts[mode] += 1
            self.counts[f"answer_{status}"] += 1
            data = json.dumps(dict(self.counts)).encode()
        try:
            partial = self.stats_path.with_name(self.stats_path.name + f".{threading.get_ident()}")
            partial.write_bytes(data)
            os.replace(partial, self.stats_path)
        except OSError as exc:  # the stack folder is gone: nothing to report to
            log.info("duplicate stats not written: %s", exc)


class QueueDispatcher:
    """Delivers one queue's due tasks, at most `concurrency` at once.

    New tasks arrive in `inbox` (appended by CreateTask) and failed ones in `retries`; only the
    dispatch thread sorts them into `ready` (due now, in order) and `later` (a heap by due time), so
    a wake costs what arrived since the last one, not a scan of the queue's whole backlog. (So a
    PurgeQueue does not reach tasks already sorted: the stack never purges.)
    """

    def __init__(self, server_module, state, queue: str, concurrency: int, lock: threading.Lock,
                 wake: threading.Event, duplicator: Duplicator | None = None, inbox: deque | None = None):
        self.server, self.state, self.queue = server_module, state, queue
        self.lock, self.wake = lock, wake  # lock: the emulator's queue lists; wake: set by new tasks
        self.duplicator = duplicator or Duplicator(Path(os.devnull), Path(os.devnull))
        self.concurrency = concurrency
        self.free = threading.BoundedSemaphore(concurrency)
        self.inbox = deque() if inbox is None else inbox  # tasks created, not yet sorted (deque: thread-safe)
        self.retries: deque = deque()  # (monotonic due time, task) of failed deliveries
        self.ready: deque = deque()  # due tasks, in creation order: the dispatch thread's own
        self.later: list = []  # heap of (monotonic due time, sequence, task): scheduled or retried tasks
        self._sequence = itertools.count()  # ties in `later` never compare tasks

    def run(self, alive) -> None:
        """Start due tasks whenever woken (a new task, a delivery done) or every poll, while alive()."""
        name = f"dispatch-{self.queue.rsplit('/', 1)[-1]}"
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix=name) as pool:
            while alive():
                self.wake.clear()  # before looking, so a task created meanwhile wakes the next wait
                self._sort_arrivals()
                if self.state.queue(self.queue).state == self.server.Queue.State.RUNNING:
                    self._start_due(pool)
                self.wake.wait(self._next_look())

    def _sort_arrivals(self) -> None:
        """Move new and failed tasks into `ready` or `later`, by when they are due."""
        now, clock = datetime.now(timezone.utc), time.monotonic()
        while self.inbox:
            task = self.inbox.popleft()
            eta = task.schedule_time
            if eta and eta > now:
                heapq.heappush(self.later, (clock + (eta - now).total_seconds(), next(self._sequence), task))
            else:
                self.ready.append(task)
        while self.retries:
            due, task = self.retries.popleft()
            heapq.heappush(self.later, (due, next(self._sequence), task))

    def _next_look(self) -> float:
        """How long to wait for a wake: until the next scheduled task is due, at most a poll; longer when
        nothing waits (a new task and a finished delivery wake the queue)."""
        if not self.later:
            return self.server._LOOP_SLEEP_TIME if self.ready else IDLE_LOOK_S
        return max(0.0, min(self.server._LOOP_SLEEP_TIME, self.later[0][0] - time.monotonic()))

    def _start_due(self, pool: ThreadPoolExecutor) -> None:
        """Hand due tasks to the pool while it has a free slot."""
        clock = time.monotonic()
        while self.later and self.later[0][0] <= clock:
            self.ready.append(heapq.heappop(self.later)[2])
        while self.ready and self.free.acquire(blocking=False):
            task = self.ready.popleft()
            pool.submit(self._deliver, task)
            if self.duplicator.choose(task.name) == "concurrent":
                self._duplicate(task, "concurrent", 0.0)

    def _deliver(self, task) -> None:
        """Deliver, then drop the task from its queue unless it must be retried; free the slot."""
        try:
            task.dispatch_count += 1
            status = self._answer_status(task)
            retry = 400 <= status < 600 and (self.state._max_retries < 0
                                             or task.dispatch_count <= self.state._max_retries)
            if retry:
                self.retries.append((time.monotonic() + retry_after_s(task.dispatch_count), task))
            else:
                self._forget(task)
            delay = None if retry or not 200 <= status < 300 else self.duplicator.take_late(task.name)
            if delay is not None:
                self._duplicate(task, "after_success", delay)
        finally:
            self.free.release()
            self.wake.set()

    def _forget(self, task) -> None:
        """A task answered (or given up on) leaves the queue's list, which ListTasks shows."""
        with self.lock:
            tasks = self.state._queue_tasks.get(self.queue, [])
            position = next((i for i, queued in enumerate(tasks) if queued is task), None)
            if position is not None:
                del tasks[position]

    def _duplicate(self, task, mode: str, delay_s: float) -> None:
        """Deliver the task once more, outside the queue's slots, after delay_s; its answer is only counted."""
        def deliver_again():
            time.sleep(delay_s)
            self.duplicator.count(mode, self._answer_status(task))

        threading.Thread(target=deliver_again, name=f"duplicate-{mode}", daemon=True).start()

    def _answer_status(self, task) -> int:
        """The HTTP status of one delivery; 500 when the target cannot be reached (as the emulator counts it)."""
        try:
            with self.server._make_task_request(self.queue, task, self.state._target_host,
                                                self.state._target_port) as response:
                return response.status
        except error.HTTPError as exc:
            return exc.code
        except Exception as exc:  # noqa: BLE001 - refused connections, resets: retried like a 5xx
            log.info("delivery of %s failed: %s", task.name, exc)
            return 500


def retry_after_s(failed_attempts: int) -> float:
    """How long a task waits before its next delivery, after `failed_attempts` failed ones (RETRY_MIN_S)."""
    return min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(max(failed_attempts - 1, 0), 32))


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection without Nagle: http.client sends a body apart from its headers, and the
    body would otherwise wait for the target's delayed ACK of the headers."""

    def connect(self) -> None:
        """Connect, then send every write at once."""
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class KeptConnections:
    """urlopen for the emulator's deliveries over HTTP/1.1 connections kept open per target.

    The emulator's urlopen opens (and the service accepts) a connection for every delivery; Cloud
    Tasks keeps its connections to a target. A connection is used by one delivery at a time; one the
    target closed while idle is replaced by a fresh one, once, as HTTP clients do with a kept-alive
    connection (the request had not reached the target). What reaches the target is what urllib
    sends: the task's headers, Content-Type defaulted as urllib does, its User-Agent.
    """

    IDLE_PER_TARGET = 32  # more idle connections than a target's concurrent deliveries are closed
    user_agent = f"Python-urllib/{sys.version_info[0]}.{sys.version_info[1]}"

    def __init__(self):
        self._idle: dict[tuple[str, int], list] = defaultdict(list)
        self._lock = threading.Lock()

    def urlopen(self, req: urllib.request.Request):
        """Send the request; the answered response (its body read), or HTTPError for 4xx/5xx, as urlopen."""
        target = urllib.parse.urlsplit(req.full_url)
        if target.scheme != "http":
            return urllib.request.urlopen(req)
        key = (target.hostname, target.port or 80)
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        headers = {"User-Agent": self.user_agent, **dict(req.header_items())}
        if req.data is not None and not req.has_header("Content-type"):
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        response = self._exchange(key, req.get_method(), path, req.data, headers)
        if response.status >= 400:
            raise error.HTTPError(req.full_url, response.status, response.reason, response.headers, None)
        return response

    def _exchange(self, key: tuple[str, int], method: str, path: str, body, headers: dict):
        """One request and its whole answer on a kept connection (a fresh one if the kept one was closed)."""
        connection, kept = self._take(key)
        try:
            return self._send(key, connection, method, path, body, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not kept:
                raise
        return self._send(key, _Connection(*key), method, path, body, headers)

    def _send(self, key, connection: http.client.HTTPConnection, method: str, path: str, body, headers: dict):
        """Send on this connection, read the answer, keep the connection when the target keeps it open."""
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self._give_back(key, connection)
        return response

    def _take(self, key: tuple[str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept connection to the target (kept=True), else a new one."""
        with self._lock:
            idle = self._idle[key]
            if idle:
                return idle.pop(), True
        return _Connection(*key), False

    def _give_back(self, key: tuple[str, int], connection: http.client.HTTPConnection) -> None:
        """Keep the connection for the target's next delivery (most recently used first)."""
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self.IDLE_PER_TARGET:
                idle.append(connection)
                return
        connection.close()


def dispatch_concurrently(server_module, concurrency: int) -> None:
    """Patch gcloud_tasks_emulator.server: new tasks dispatched at once, up to `concurrency` per queue, over
    connections kept open to the targets."""
    lock = threading.Lock()
    wakes: dict[str, threading.Event] = defaultdict(threading.Event)
    inboxes: dict[str, deque] = defaultdict(deque)
    duplicator = Duplicator()
    create_task = server_module.QueueState.create_task

    def create_and_wake(self, queue: str, task):
        created = create_task(self, queue, task)
        inboxes[queue].append(created)
        wakes[queue].set()
        return created

    def process_queue(self, queue: str) -> None:
        dispatcher = QueueDispatcher(server_module, self._state, queue, concurrency, lock, wakes[queue], duplicator,
                                     inboxes[queue])
        dispatcher.run(lambda: self._is_running.is_set() and queue in self._state._queues)

    server_module.QueueState.create_task = create_and_wake
    server_module.Processor._process_queue = process_queue


def deliver_over_kept_connections(server_module) -> None:
    """Patch gcloud_tasks_emulator.server: an HTTP task is sent as its _make_task_request sends it (same URL,
    method, body and headers), read from the task's protobuf directly and over KeptConnections.

    Install it before anything that wraps _make_task_request (install_oidc_tokens): the wrappers then
    call this one. App Engine tasks, which the stack does not use, keep the emulator's own path.
    """
    make_task_request, connections = server_module._make_task_request, KeptConnections()

    def make_http_task_request(queue_name: str, task, host: str, port: int):
        raw = type(task).pb(task)  # proto-plus reads every field through its marshal: a few us each
        if not raw.http_request.url:
            return make_task_request(queue_name, task, host, port)
        return connections.urlopen(http_task_request(queue_name, raw, server_module.HttpMethod))

    server_module._make_task_request = make_http_task_request


def http_task_request(queue_name: str, raw, methods) -> urllib.request.Request:
    """The urllib Request gcloud-tasks-emulator's _make_task_request builds for an HTTP task (raw: its protobuf)."""
    http, eta = raw.http_request, raw.schedule_time
    attempt = raw.dispatch_count - 1
    headers = {**http.headers,
               "X-CloudTasks-QueueName": queue_name, "X-CloudTasks-TaskName": raw.name.rsplit("/", 1)[-1],
               "X-CloudTasks-TaskRetryCount": attempt, "X-CloudTasks-TaskExecutionCount": attempt,
               "X-CloudTasks-TaskETA": str(eta.ToDatetime(timezone.utc).timestamp()) if raw.HasField("schedule_time")
               else ""}
    request = urllib.request.Request(http.url, method=methods(http.http_method).name, data=http.body)
    for name, value in headers.items():
        request.add_header(name, value)
    return request
