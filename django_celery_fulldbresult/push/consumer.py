"""Celery's asynchronous result API on the task table: ``ResultConsumer``.

``AsyncResult.get()``, ``GroupResult.join_native`` (``iter_native``), ``then()`` callbacks
and the chord join register the results they wait for with the backend; the consumer's
``drain_events`` waits on the process's listening session (``listener.py``) until a task
some caller waits on right now (``get()``, a join) is notified, and reads the rows of every
notified registered task, one statement per backend for all of them. A task only registered
(Celery's group barrier registers every part of a group it publishes: a chord's header)
does not end the wait: its row is read with the others when it ends, at the latest after
Celery's drain interval (1 s), so a chord of 1,000 parts costs a few reads, not 1,000.

One session per process (``Hub``), whatever the number of backends: Celery gives each
thread a backend of its own (the backend is not ``thread_safe``), and a web server's threads
would otherwise hold a session each. One thread drains for every backend
of the process; a thread that finds the session busy waits for it and returns to look at
its own result, which the other may have set.

What a notification can miss is read anyway: a wait reads again once the session listens
(unless it listened before the wait's first read), a lost session is opened again and
every waited-for task read at once, and every ``SAFETY_POLL`` seconds of silence the
waited-for tasks are read (a write whose statement began before the session first listened,
and committed after a wait's first read, was not notified).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
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


class Hub:
    """The process's listening session and the consumers (one per backend) it serves."""

    def __init__(self) -> None:
        #: Held by the thread that uses the session (drains, opens it); released through
        #: ``release()``, which wakes the threads waiting for that use to end.
        self.lock = threading.Lock()
        #: Set when the current use of the session ends (swapped for a new event at each).
        self._released = threading.Event()
        self._swap = threading.Lock()
        self.listener: Listener | None = None
        self._consumers: weakref.WeakSet[ResultConsumer] = weakref.WeakSet()
        self._consumers_lock = threading.Lock()  # a thread's new backend joins meanwhile
        self.next_poll = 0.0
        self.retry_at = 0.0
        self.unheard_logged = False
        self.last_waited = time.monotonic()
        self.reaper: threading.Thread | None = None

    def open_listener(self) -> Listener | None:
        """The open session (opened on first need), or None while it cannot be opened.
        Called with ``lock`` held."""
        if self.listener is not None and self.listener.is_open:
            return self.listener
        now = time.monotonic()
        if now < self.retry_at:
            return None
        listener = Listener(db.task_db_alias())
        try:
            listener.open()
        except NotHeard as exc:
            if not self.unheard_logged:
                logger.warning("result push: %s", exc)
                self.unheard_logged = True
            self.retry_at = now + RETRY_UNHEARD_AFTER
            self.next_poll = 0.0
            return None
        except Exception as exc:  # noqa: BLE001 - waiting polls until the database is back
            logger.warning("result push: cannot listen (%s); polling meanwhile", exc)
            self.retry_at = now + RECONNECT_AFTER
            self.next_poll = 0.0
            return None
        self.listener = listener
        # The caller reads what it waits for now (stored before the session listened).
        self.next_poll = now + SAFETY_POLL
        if self.reaper is None or not self.reaper.is_alive():
            self.reaper = threading.Thread(
                target=self._close_when_idle, name="fulldb-result-push", daemon=True
            )
            self.reaper.start()
        return listener

    def join(self, consumer: ResultConsumer) -> None:
        with self._consumers_lock:
            self._consumers.add(consumer)

    def consumers(self) -> list[ResultConsumer]:
        with self._consumers_lock:
            return list(self._consumers)

    def current(self) -> Listener | None:
        listener = self.listener
        return listener if listener is not None and listener.is_open else None

    def release(self) -> None:
        """Release the session and wake whoever waits for this use of it to end (the
        next thread to take it may be the one that released it: a waiter blocked on the
        lock itself could wait for many drains)."""
        self.lock.release()
        with self._swap:
            ended, self._released = self._released, threading.Event()
        ended.set()

    def wait_until_released(self, timeout: float) -> None:
        """Wait, up to ``timeout`` s, until the thread that holds the session releases it
        (at once if nobody does)."""
        released = self._released
        if self.lock.locked():
            released.wait(timeout)

    def close(self) -> None:
        self.lock.acquire()
        try:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
        finally:
            self.release()

    def _close_when_idle(self) -> None:
        """Close the session once nobody has waited during ``IDLE_CLOSE`` (a result that
        was given up on, a ``get()`` that timed out, stays pending in Celery: not counted)."""
        while True:
            time.sleep(min(1.0, IDLE_CLOSE / 4))
            if time.monotonic() - self.last_waited < IDLE_CLOSE:
                continue
            if not self.lock.acquire(blocking=False):
                continue  # someone is waiting right now
            try:
                if self.listener is not None:
                    self.listener.close()
                    self.listener = None
                return
            finally:
                self.release()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a notification of a task some caller waits on right
        now, then hand each backend its notified tasks' rows (one statement per backend).
        Notifications of tasks only registered (a group's parts, which Celery's group
        barrier registers) do not end the wait: read together when it ends. Called with
        ``lock`` held."""
        listened = self.current() is not None
        listener = self.open_listener()
        if listener is not None and not listened:
            self.next_poll = 0.0  # opened here: what was stored before is read now
        deadline = min(time.monotonic() + timeout, self.next_poll)
        # The consumers are read after each wait, not before: a thread's backend created
        # during the wait joined the hub before its first read, so a notification that read
        # missed comes after it joined, and reaches it.
        if listener is None:
            time.sleep(min(max(0.0, deadline - time.monotonic()), POLL_INTERVAL))
        else:
            while True:
                try:
                    notices = listener.wait(max(0.0, deadline - time.monotonic()))
                except listener.errors as exc:
                    logger.warning("result push: listening session lost (%s); reconnecting", exc)
                    listener.close()
                    self.listener = None
                    self.next_poll = 0.0
                    break
                woken = False
                for consumer in self.consumers():
                    woken = consumer.take(notices) or woken
                if woken or time.monotonic() >= deadline:
                    break
        poll = self.listener is None or time.monotonic() >= self.next_poll
        if poll:
            self.next_poll = time.monotonic() + SAFETY_POLL
        for consumer in self.consumers():
            consumer.hand_over(poll)


_hub = Hub()
#: Ticks of deliveries, process-wide (``next()`` of a count is atomic).
_deliveries = itertools.count(1)


def hub() -> Hub:
    return _hub


def _new_hub_after_fork() -> None:
    # The listener module drops the parent's session in the child; the lock and the
    # reaper thread of the parent are not the child's.
    global _hub
    consumers = list(_hub._consumers)  # the parent's lock may be held: not taken here
    _hub = Hub()
    for consumer in consumers:
        _hub.join(consumer)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_hub_after_fork)


class ResultConsumer(BaseResultConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The task ids callers wait on right now (``_wait_for_pending``), with a count of
        #: the waits; a notification of one of them ends the hub's wait.
        self._active: Counter[str] = Counter()
        self._active_lock = threading.Lock()
        #: Waited-for tasks notified and not read yet (touched with the hub's lock held).
        self._notified: set[str] = set()
        #: When (``_deliveries``) a row was last handed to this backend's results, and what
        #: had been when its caller last returned from ``drain_events`` to look at them.
        self._delivered_at = 0
        self._looked_at = 0
        hub().join(self)

    # -- what Celery calls ------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Nothing to subscribe: the waited-for tasks are the backend's pending results."""

    def cancel_for(self, task_id: str) -> None:
        """Nothing to unsubscribe (see ``consume_from``)."""

    def stop(self) -> None:
        """Close the process's session (the next wait opens it again)."""
        hub().close()

    def _wait_for_pending(self, result: Any, **kwargs: Any) -> Iterator[None]:
        """Celery's wait, with ``result``'s ids (a group's parts) counted as actively waited
        for while it lasts."""
        ids = Counter(_ids_of(result))
        with self._active_lock:
            self._active.update(ids)
        try:
            yield from super()._wait_for_pending(result, **kwargs)
        finally:
            with self._active_lock:
                self._active -= ids

    def on_wait_for_pending(self, result: Any, timeout: float | None = None, **kwargs: Any):
        """Read what is stored already (a group's members: one statement); when something
        is still to come, listen, and read those again (what was stored before the session
        listened was not notified) unless the session listened before the first read began.
        A wait that finds everything done, as the chord join does, opens no session.

        While another thread (or Celery's drainer greenlet under gevent and eventlet) holds
        the session, this one does not wait for it: it may hold it for a whole drain (a
        greenlet drainer takes it back at once, forever), and a drain that opens the session
        reads every waited-for task first; so does the next drain, for a session some
        other waiter is opening."""
        ids = _ids_of(result)
        shared = hub()
        shared.last_waited = time.monotonic()
        before = shared.current()
        self._deliver([task_id for task_id in ids if task_id in self._waited()])
        still = [task_id for task_id in ids if task_id in self._waited()]
        if not still or before is not None:
            return  # done, or the session heard whatever was stored after the read
        if not shared.lock.acquire(blocking=False):
            shared.next_poll = 0.0
            return
        try:
            listener = shared.open_listener()
        finally:
            shared.release()
        if listener is not None and listener is not before:
            self._deliver(still)

    def drain_events(self, timeout: float | None = None) -> None:
        timeout = 1.0 if timeout is None else timeout
        shared = hub()
        if not shared.lock.acquire(blocking=False):
            # Another thread is draining, for every backend of the process: once it is
            # done, the caller looks at its own result (which it may have set).
            if self._delivered_at <= self._looked_at:
                shared.wait_until_released(timeout)
            self._looked_at = self._delivered_at
            return
        try:
            if self._delivered_at > self._looked_at:
                # Delivered to since the caller last looked (by another thread's drain, just
                # before the caller's look, or by its own first read): it looks first, or it
                # would wait here for a result it has.
                return
            shared.last_waited = time.monotonic()
            shared.drain(timeout)
        finally:
            self._looked_at = self._delivered_at
            shared.release()

    # -- the work -----------------------------------------------------------------

    def take(self, notices: list[tuple[str, str]]) -> bool:
        """Note the notified tasks this backend has registered; whether one of them is
        actively waited for (the hub's wait then ends)."""
        if not notices:
            return False
        waited = self._waited()
        wanted = states.READY_STATES if self.on_message is None else None
        hits = {
            task_id
            for status, task_id in notices
            if task_id in waited and (wanted is None or status in wanted)
        }
        if not hits:
            return False
        self._notified |= hits
        with self._active_lock:
            return any(task_id in self._active for task_id in hits)

    def hand_over(self, poll: bool) -> None:
        """Read the rows of this backend's notified tasks (of every waited-for task on a
        safety read)."""
        notified, self._notified = self._notified, set()
        waited = self._waited()
        ids = waited if poll else notified & waited
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
        metas = self.backend.read_metas(task_ids, ready)
        for meta in metas:
            self.on_state_change(meta, None)
        if metas:
            self._delivered_at = next(_deliveries)


def _ids_of(result: Any) -> list[str]:
    """The task ids a wait on ``result`` is for: its own, or a group's parts."""
    if isinstance(result, ResultSet):
        return [node.id for node in result.results if not isinstance(node, ResultSet)]
    return [result.id]
