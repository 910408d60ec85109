"""Cloud Tasks' dispatch for gcloud-tasks-emulator (the stack's `tasks` part, world.py).

The emulator wakes each queue every 0.1 s and delivers its tasks one at a time, waiting for each
answer: every hop waits up to a poll for its turn, and a queue's throughput is one over its
slowest handler (GCHostPay3 signing and broadcasting: a few per second). Cloud Tasks dispatches a
new task within milliseconds and up to max_concurrent_dispatches tasks of a queue at once (spec
§5: 10 for the GCHostPay queues, 50 to 150 for the others). `dispatch_concurrently` makes the
emulator do the same: a new task wakes its queue at once, up to N deliveries of a queue are in
flight, and a failed delivery is retried after RETRY_AFTER_S (the emulator's own pace).

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

import json
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib import error

RETRY_AFTER_S = 0.1
# Relative to the part's working directory: the stack starts every part in its folder (stack.py).
FAULTS_FILE, FAULT_STATS_FILE = Path("run", "tasks-faults.json"), Path("run", "tasks-faults-stats.json")
CONTROL_EVERY_S = 0.5  # how often the control file is looked at
LATE_DUPLICATE_S = (0.05, 1.5)  # a duplicate after success comes this long after the 2xx

log = logging.getLogger("devstack.emulator")


class Duplicator:
    """Decides which deliveries Cloud Tasks repeats (module docstring); one per emulator, shared by its queues."""

    def __init__(self, control: Path = FAULTS_FILE, stats: Path = FAULT_STATS_FILE):
        self.control, self.stats_path = control, stats
        self.share, self.rng = 0.0, random.Random()
        self.counts: Counter = Counter()
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
    """Delivers one queue's due tasks, at most `concurrency` at once."""

    def __init__(self, server_module, state, queue: str, concurrency: int, lock: threading.Lock,
                 wake: threading.Event, duplicator: Duplicator | None = None):
        self.server, self.state, self.queue = server_module, state, queue
        self.lock, self.wake = lock, wake  # lock: the emulator's queue lists; wake: set by new tasks
        self.duplicator = duplicator or Duplicator(Path(os.devnull), Path(os.devnull))
        self.concurrency = concurrency
        self.free = threading.BoundedSemaphore(concurrency)
        self.in_flight: set[str] = set()
        self.retry_at: dict[str, float] = {}  # failed task name -> when it may be delivered again

    def run(self, alive) -> None:
        """Start due tasks whenever woken (a new task, a delivery done) or every poll, while alive()."""
        name = f"dispatch-{self.queue.rsplit('/', 1)[-1]}"
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix=name) as pool:
            while alive():
                self.wake.clear()  # before looking, so a task created meanwhile wakes the next wait
                if self.state.queue(self.queue).state == self.server.Queue.State.RUNNING:
                    self._start_due(pool)
                self.wake.wait(self.server._LOOP_SLEEP_TIME)

    def _start_due(self, pool: ThreadPoolExecutor) -> None:
        """Hand due tasks to the pool while it has a free slot."""
        for task in self._due():
            if not self.free.acquire(blocking=False):
                return
            self.in_flight.add(task.name)
            pool.submit(self._deliver, task)
            if self.duplicator.choose(task.name) == "concurrent":
                self._duplicate(task, "concurrent", 0.0)

    def _due(self) -> list:
        """Tasks whose schedule time has come, not in flight, not waiting to be retried."""
        now, clock = datetime.now(timezone.utc), time.monotonic()
        with self.lock:
            return [task for task in self.state._queue_tasks.get(self.queue, [])
                    if task.name not in self.in_flight and self.retry_at.get(task.name, 0.0) <= clock
                    and not (task.schedule_time and task.schedule_time > now)]

    def _deliver(self, task) -> None:
        """Deliver, then drop the task from its queue unless it must be retried; free the slot."""
        try:
            task.dispatch_count += 1
            status = self._answer_status(task)
            retry = 400 <= status < 600 and (self.state._max_retries < 0
                                             or task.dispatch_count <= self.state._max_retries)
            with self.lock:
                self.in_flight.discard(task.name)
                self._forget_or_retry(task, retry)
            delay = None if retry or not 200 <= status < 300 else self.duplicator.take_late(task.name)
            if delay is not None:
                self._duplicate(task, "after_success", delay)
        finally:
            self.free.release()
            self.wake.set()

    def _forget_or_retry(self, task, retry: bool) -> None:
        """Under the lock: a delivered task leaves the queue; a failed one waits RETRY_AFTER_S."""
        if retry:
            self.retry_at[task.name] = time.monotonic() + RETRY_AFTER_S
            return
        self.retry_at.pop(task.name, None)
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


def dispatch_concurrently(server_module, concurrency: int) -> None:
    """Patch gcloud_tasks_emulator.server: new tasks dispatched at once, up to `concurrency` per queue."""
    lock = threading.Lock()
    wakes: dict[str, threading.Event] = defaultdict(threading.Event)
    duplicator = Duplicator()
    create_task = server_module.QueueState.create_task

    def create_and_wake(self, queue: str, task):
        created = create_task(self, queue, task)
        wakes[queue].set()
        return created

    def process_queue(self, queue: str) -> None:
        dispatcher = QueueDispatcher(server_module, self._state, queue, concurrency, lock, wakes[queue], duplicator)
        dispatcher.run(lambda: self._is_running.is_set() and queue in self._state._queues)

    server_module.QueueState.create_task = create_and_wake
    server_module.Processor._process_queue = process_queue
