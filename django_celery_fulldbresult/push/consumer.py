"""Celery's asynchronous result API on the task table: ``ResultConsumer``.

``AsyncResult.get()``, ``GroupResult.join_native`` (``iter_native``), ``then()`` callbacks
and the chord join register the results they wait for with the backend; the consumer's
``drain_events`` waits on the process's listening session (``listener.py``) and reads the
rows whose notification names a waited-for task, one statement for all of them.

What a notification can miss is read anyway: the first read of a wait happens after the
session listens, a lost session is opened again and every waited-for task read at once,
and every ``SAFETY_POLL`` seconds of silence the waited-for tasks are read in one statement
(a write whose statement began before this process first listened, and committed after
its first read, was not notified). Threads share one session: one waits on it, and a thread
that found it busy returns at once to look at its own result, which the other may have set.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import states
from celery.backends.asynchronous import BaseResultConsumer
from celery.result import ResultSet

from .. import db
from .listener import Listener, NotHeard

logger = logging.getLogger(__name__)

#: Seconds after which the waited-for tasks are read even without a notification.
SAFETY_POLL = 5.0
#: Seconds without anybody waiting after which the session is closed (writers stop
#: notifying once no session listens); the next wait opens it again.
IDLE_CLOSE = 30.0
#: Seconds before a session that could not be opened is tried again, and between the reads
#: of waiting meanwhile (Celery's polling interval).
RECONNECT_AFTER = 1.0
POLL_INTERVAL = 0.5
#: Seconds before a session that heard nothing (``listener.NotHeard``) is tried again.
RETRY_UNHEARD_AFTER = 300.0


class ResultConsumer(BaseResultConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._listener: Listener | None = None
        self._next_poll = 0.0
        self._retry_at = 0.0
        self._unheard_logged = False
        self._last_waited = time.monotonic()
        self._reaper: threading.Thread | None = None

    # -- what Celery calls ------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Nothing to subscribe: the waited-for tasks are the backend's pending results."""

    def cancel_for(self, task_id: str) -> None:
        """Nothing to unsubscribe (see ``consume_from``)."""

    def stop(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def on_after_fork(self) -> None:
        # The listener module dropped the parent's session in the child already.
        self._listener = None
        self._reaper = None

    def on_wait_for_pending(self, result: Any, timeout: float | None = None, **kwargs: Any):
        """Read what is stored already (a group's members: one statement); when something
        is still to come, listen, and read those again (what was stored before the session
        listened was not notified). A wait that finds everything done, as the chord join
        does, opens no session."""
        if isinstance(result, ResultSet):
            ids = [node.id for node in result.results if not isinstance(node, ResultSet)]
        else:
            ids = [result.id]
        self._last_waited = time.monotonic()
        # The session that listened before this read began, if any: what it did not hear
        # was stored before the read, which sees it.
        before = self._listener if self._listener is not None and self._listener.is_open else None
        self._deliver([task_id for task_id in ids if task_id in self._waited()])
        still = [task_id for task_id in ids if task_id in self._waited()]
        if not still:
            return
        with self._lock:
            listener = self._listening()
        if listener is not None and listener is not before:
            self._deliver(still)

    def drain_events(self, timeout: float | None = None) -> None:
        timeout = 1.0 if timeout is None else timeout
        if not self._lock.acquire(blocking=False):
            # Another thread is draining, for every waiter of the process: once it is done,
            # the caller looks at its own result (which it may have set).
            if self._lock.acquire(timeout=timeout):
                self._lock.release()
            return
        try:
            self._last_waited = time.monotonic()
            self._drain(timeout)
        finally:
            self._lock.release()

    # -- the work -----------------------------------------------------------------

    def _listening(self) -> Listener | None:
        """The open session (opened on first need), or None while it cannot be opened."""
        if self._listener is not None and self._listener.is_open:
            return self._listener
        now = time.monotonic()
        if now < self._retry_at:
            return None
        listener = Listener(db.task_db_alias())
        try:
            listener.open()
        except NotHeard as exc:
            if not self._unheard_logged:
                logger.warning("result push: %s", exc)
                self._unheard_logged = True
            self._retry_at = now + RETRY_UNHEARD_AFTER
            self._next_poll = 0.0
            return None
        except Exception as exc:  # noqa: BLE001 - waiting polls until the database is back
            logger.warning("result push: cannot listen (%s); polling meanwhile", exc)
            self._retry_at = now + RECONNECT_AFTER
            self._next_poll = 0.0
            return None
        self._listener = listener
        # The caller reads what it waits for now (stored before the session listened).
        self._next_poll = now + SAFETY_POLL
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._close_when_idle, name="fulldb-result-push", daemon=True
            )
            self._reaper.start()
        return listener

    def _close_when_idle(self) -> None:
        """Close the session once nobody has waited during ``IDLE_CLOSE`` (a result that
        was given up on, a ``get()`` that timed out, stays pending in Celery: not counted)."""
        while True:
            time.sleep(min(1.0, IDLE_CLOSE / 4))
            if time.monotonic() - self._last_waited < IDLE_CLOSE:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # someone is waiting right now
            try:
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                return
            finally:
                self._lock.release()

    def _drain(self, timeout: float) -> None:
        listened = self._listener is not None and self._listener.is_open
        listener = self._listening()
        if listener is not None and not listened:
            self._next_poll = 0.0  # opened here: what was stored before is read now
        now = time.monotonic()
        wait = max(0.0, min(timeout, self._next_poll - now))
        notified: set[str] = set()
        if listener is None:
            wait = min(wait, POLL_INTERVAL)
            time.sleep(wait)
        else:
            try:
                notices = listener.wait(wait)
            except listener.errors as exc:
                logger.warning("result push: listening session lost (%s); reconnecting", exc)
                listener.close()
                self._listener = None
                self._next_poll = 0.0
                notices = []
            wanted = states.READY_STATES if self.on_message is None else None
            notified = {
                task_id for status, task_id in notices if wanted is None or status in wanted
            }
        waited = self._waited()
        if listener is None or time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + SAFETY_POLL
            ids = waited
        else:
            ids = notified & waited
        if ids:
            self._deliver(sorted(ids))

    def _waited(self) -> set[str]:
        """The task ids some result object waits on (Celery's pending results: per id a
        result, or a mapping of waiters, depending on the Celery version)."""
        ids: set[str] = set()
        for mapping in self._pending_results:
            ids.update(task_id for task_id, waiters in list(mapping.items()) if waiters)
        return ids

    def _deliver(self, task_ids: list[str]) -> None:
        ready = states.READY_STATES if self.on_message is None else None
        for meta in self.backend.read_metas(task_ids, ready):
            self.on_state_change(meta, None)
