"""Write-behind for publish tracking: PENDING rows written by one thread per process.

``apply_async`` only queues the row it read from the message (``publish.record``); a
thread of the process writes what is queued, many rows per statement
(``TaskResultQuerySet.record_publishes``: insert-if-absent, fill-only, so a row the worker
already wrote keeps its state whatever the order). Publishing then costs what reading
the message costs, not a round trip to the database, and a process holds one session for
its PENDING rows (the writer's), not one per publishing thread.

The rules, each in one place below:

* **Order.** Rows are written in the order they were queued, at most ``MAX_BATCH`` per
  statement; the first row after a quiet spell at once, and in a burst a batch gathers for
  at most ``LINGER`` seconds; a task id queued twice is filled by its first publish.
* **Backpressure.** At most ``MAX_QUEUED`` rows wait; beyond that ``submit`` refuses and
  the caller writes its row itself (as without write-behind).
* **Nothing dropped silently.** A batch that fails on a lost connection is tried again
  (``RETRY_DELAYS``) on a new one; a batch the database refuses is written row by row, so
  a bad row costs only itself. A row that still cannot be written is logged at ERROR with
  its task id (the task itself was sent; ``find_stale_tasks`` cannot see it without a row).
* **Flushed at exit.** ``flush()`` waits until every queued row is written: called at
  interpreter exit (``atexit``), when a Celery worker or one of its pool processes shuts
  down (pool processes end with ``os._exit``, which skips ``atexit``), and by callers that
  must read the rows back from another connection at once.
* **Fork.** A child starts with an empty queue and no thread (the parent writes what it
  queued).
* **The connection** follows Django's rules as the worker's does (``db.recycle``), and with
  ``CONN_MAX_AGE = 0`` it is closed once the queue has been empty for ``IDLE_CLOSE``
  seconds: an idle web process keeps no session of ours.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import db
from .models import TaskResultMeta

logger = logging.getLogger(__name__)

#: Rows per statement.
MAX_BATCH = 500
#: Rows waiting at most; beyond that the publishing thread writes its own row.
MAX_QUEUED = 20_000
#: Seconds between the tries of a batch that failed (then it is logged and dropped).
RETRY_DELAYS = (0.2, 1.0, 3.0)
#: In a burst (a batch written less than this many seconds ago), seconds the writer waits
#: for the next batch to fill; the first row after a quiet spell is written at once. Each
#: wake-up of the writer costs the publishing threads far more than its statement (the
#: GIL, and the cores the database and the broker share).
LINGER = 0.25
#: Seconds without work before the writer closes its connection (CONN_MAX_AGE = 0).
IDLE_CLOSE = 1.0

Row = Mapping[str, Any]


class PendingWriter:
    """The queue and its thread (one per process: ``writer``)."""

    def __init__(self, write: Callable[[Sequence[Row]], None]) -> None:
        self._write = write
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue: deque[Row] = deque()
        self._writing = 0
        self._flushing = 0
        self._last_write = 0.0
        self._thread: threading.Thread | None = None
        self.batches = 0

    def submit(self, row: Row) -> bool:
        """Queue ``row``; False when the queue is full (the caller writes it)."""
        with self._lock:
            if len(self._queue) >= MAX_QUEUED:
                return False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="fulldb-publish-writer", daemon=True
                )
                self._thread.start()
            self._queue.append(row)
            if len(self._queue) in (1, MAX_BATCH):
                self._work.notify()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is written (or given up); False on timeout.
        The writer does not linger for a fuller batch while someone waits."""
        with self._lock:
            self._flushing += 1
            self._work.notify()
            try:
                return self._idle.wait_for(lambda: not self._queue and not self._writing, timeout)
            finally:
                self._flushing -= 1

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + self._writing

    def _take(self) -> list[Row] | None:
        """The next batch; None after ``IDLE_CLOSE`` seconds without work."""
        with self._lock:
            if not self._queue:
                self._idle.notify_all()
                if not self._work.wait_for(lambda: self._queue, IDLE_CLOSE):
                    return None
            if len(self._queue) < MAX_BATCH and time.monotonic() - self._last_write < LINGER:
                # In a burst (the last batch was just written), let the batch fill: fewer
                # wake-ups and larger statements. The lock is released meanwhile.
                self._work.wait_for(self._batch_ready, LINGER)
            count = min(len(self._queue), MAX_BATCH)
            batch = [self._queue.popleft() for _ in range(count)]
            self._writing = count
            return batch

    def _batch_ready(self) -> bool:
        return len(self._queue) >= MAX_BATCH or self._flushing > 0

    def _done(self) -> None:
        with self._lock:
            self._last_write = time.monotonic()
            self._writing = 0
            if not self._queue:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                db.close_idle()
                continue
            try:
                self._write_batch(batch)
            finally:
                self._done()
                db.recycle(between_tasks=True)

    def _write_batch(self, batch: list[Row]) -> None:
        """Write ``batch``; a database that is down is waited for (``RETRY_DELAYS``); a row
        the database refuses costs only that row (the batch is written row by row)."""
        error: Exception | None = None
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            time.sleep(delay)
            try:
                self._write(batch)
                self.batches += 1
                return
            except Exception as exc:  # noqa: BLE001 - logged, with every task id
                error = exc
                if not db.is_connection_error(exc):
                    self._write_one_by_one(batch)
                    return
                logger.warning(
                    "publish tracking: %d PENDING rows not written (try %d): %r",
                    len(batch),
                    attempt + 1,
                    exc,
                )
        self._lost(batch, error)

    def _write_one_by_one(self, batch: list[Row]) -> None:
        for row in batch:
            try:
                self._write([row])
            except Exception as exc:  # noqa: BLE001
                self._lost([row], exc)

    @staticmethod
    def _lost(rows: Sequence[Row], error: Exception | None) -> None:
        for row in rows:
            logger.error(
                "publish tracking: the task %s (%s) was sent but its PENDING row could not be "
                "written: %r",
                row["task_id"],
                row.get("task"),
                error,
            )

    def after_fork_in_child(self) -> None:
        self._reset()


def _write(rows: Sequence[Row]) -> None:
    db.run_with_reconnect(lambda alias: TaskResultMeta.objects.record_publishes(rows, using=alias))


writer = PendingWriter(_write)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=writer.after_fork_in_child)


def flush(timeout: float | None = 10.0) -> bool:
    """Wait until the PENDING rows of every task this process published are written."""
    return writer.flush(timeout)


def on_shutdown(**_: Any) -> None:
    if writer.pending() and not writer.flush(10.0):
        logger.error("publish tracking: %d PENDING rows still unwritten at exit", writer.pending())


atexit.register(on_shutdown)
