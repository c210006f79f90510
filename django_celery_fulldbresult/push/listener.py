"""One listening PostgreSQL session per process: ``LISTEN`` on the channel the task table's
trigger notifies (``sql.py``), registered in the listeners table so that writers notify.

The session is a connection of its own, made from the task database's settings without a
connection pool (a pooled connection handed back would keep listening for its next user), in
autocommit, and used only by the thread that holds the consumer's lock. Waiting is a
``select()`` on its socket, which gevent and eventlet make cooperative.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import uuid
import weakref
from typing import Any

from django.db import connections

from .. import db
from . import sql

logger = logging.getLogger(__name__)

_opened_lock = threading.Lock()
_opened: list[weakref.ref[Listener]] = []


#: Seconds a new session waits to hear its own probe notification.
PROBE_TIMEOUT = 2.0


class NotHeard(Exception):
    """The session listens but hears nothing (``Listener._probe``)."""


class Listener:
    """``open()``, then ``wait(timeout)`` for ``(status, task_id)`` pairs, ``close()``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.raw: Any = None
        self.errors: tuple[type[BaseException], ...] = (OSError,)
        self._psycopg2 = False
        self._heard: list[str] = []

    @property
    def is_open(self) -> bool:
        return self.raw is not None

    def open(self) -> None:
        base = connections.create_connection(self.alias)
        options = {k: v for k, v in base.settings_dict.get("OPTIONS", {}).items() if k != "pool"}
        wrapper = type(base)({**base.settings_dict, "OPTIONS": options}, self.alias)
        self.errors = (wrapper.Database.Error, OSError)
        raw = wrapper.get_new_connection(wrapper.get_connection_params())
        self._psycopg2 = type(raw).__module__.startswith("psycopg2")
        self.raw = raw
        try:
            raw.autocommit = True
            with contextlib.closing(raw.cursor()) as cursor:
                for statement in (sql.PRUNE, sql.REGISTER, sql.LISTEN):
                    cursor.execute(statement)
            self._probe()
        except BaseException:
            self.close()
            raise
        with _opened_lock:
            _opened.append(weakref.ref(self))

    def _probe(self) -> None:
        """Notify the channel and hear it back: a session behind a pooler in transaction
        mode (PgBouncer) may listen on a server connection that is not its own and hear
        nothing. Notifications heard meanwhile are kept for the next ``wait()``."""
        token = f"{sql.PROBE} {uuid.uuid4().hex}"
        with contextlib.closing(self.raw.cursor()) as cursor:
            cursor.execute(sql.NOTIFY, [token])
        deadline = time.monotonic() + PROBE_TIMEOUT
        # A session's own notification comes back with the NOTIFY's reply: the driver holds
        # it already and the socket never turns readable for it, so look before selecting.
        readable = True
        while True:
            heard = self._drain() if readable else []
            if token in heard:
                heard.remove(token)
                self._heard += heard  # handed over by the next wait()
                return
            self._heard += heard
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([self.raw.fileno()], [], [], min(0.05, left))
        raise NotHeard(
            f"no notification came back within {PROBE_TIMEOUT} s on a session that listens "
            "(a connection pooler in transaction mode?); waiting for results polls. "
            "DJANGO_CELERY_FULLDBRESULT_RESULT_PUSH = False says so without trying."
        )

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """The notifications that arrive within ``timeout`` seconds (those already there at
        once): ``(status, task_id)`` pairs. Raises ``self.errors`` on a lost session."""
        heard, self._heard = self._heard, []
        if not heard:
            readable, _, _ = select.select([self.raw.fileno()], [], [], max(0.0, timeout))
            if readable:
                heard = self._drain()
        return [_parse(payload) for payload in heard]

    def _drain(self) -> list[str]:
        if self._psycopg2:
            self.raw.poll()
            payloads = [notify.payload for notify in self.raw.notifies]
            self.raw.notifies.clear()
            return payloads
        payloads: list[str] = []
        while True:  # psycopg 3 hands over what one read brought
            batch = [notify.payload for notify in self.raw.notifies(timeout=0)]
            if not batch:
                return payloads
            payloads += batch

    def close(self) -> None:
        """Unregister (writers stop notifying when nobody is left) and disconnect."""
        raw, self.raw = self.raw, None
        if raw is None:
            return
        with contextlib.suppress(Exception), contextlib.closing(raw.cursor()) as cursor:
            cursor.execute(sql.UNREGISTER)
        with contextlib.suppress(Exception):
            raw.close()

    def forget(self) -> None:
        """After fork, in the child: drop the parent's session without talking over it."""
        raw, self.raw = self.raw, None
        if raw is None:
            return
        with contextlib.suppress(AttributeError, OSError, TypeError, ValueError):
            os.close(raw.fileno())
        with contextlib.suppress(Exception):
            raw.close()


def _parse(payload: str) -> tuple[str, str]:
    status, _, task_id = payload.partition(" ")
    return status, task_id


def _take_all() -> list[Listener]:
    """The process's listeners, no longer tracked."""
    with _opened_lock:
        listeners = [ref() for ref in _opened]
        _opened.clear()
    return [listener for listener in listeners if listener is not None]


def close_all() -> None:
    """Close every listening session of the process (tests, before the database goes)."""
    for listener in _take_all():
        listener.close()


def _forget_inherited() -> None:
    for listener in _take_all():
        listener.forget()


db.also_close(close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)
