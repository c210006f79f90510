"""Results pushed to waiters: ``AsyncResult.get()``, ``GroupResult.join_native`` and the
other ways of waiting wake when the result is stored, not on a timer.

On PostgreSQL a trigger on the task table (``sql.py``, installed by migration 0007) sends a
``NOTIFY`` for each state written while some session listens; each process that waits holds
one listening connection (``listener.py``), and Celery's asynchronous result API (the
``ResultConsumer`` of ``consumer.py``, as the Redis backend has one) reads a task's row when
its notification arrives. Elsewhere, and with ``RESULT_PUSH = False``, waiting polls.
"""

from __future__ import annotations

import celery
from django.db import connections

from .. import conf, db

#: The first Celery whose asynchronous result API keeps every result object waiting on a
#: task id (celery#4925) and hands over ready results before a timeout: before it, a second
#: ``AsyncResult`` of the same id, a group rebuilt from ids, never wakes.
CELERY_ASYNC_API = (5, 7)


def enabled() -> bool:
    """Whether waiting for results in this process uses the push (LISTEN/NOTIFY).

    PostgreSQL and Celery 5.7+ only, and not in Django's test environment unless the
    package's own connection is used there too: the listening session would outlive a test
    database that the test runner then cannot drop.
    """
    if not conf.get("RESULT_PUSH") or tuple(celery.VERSION[:2]) < CELERY_ASYNC_API:
        return False
    if not db.uses_own_connection():
        return False
    return connections[db.task_db_alias()].vendor == "postgresql"
