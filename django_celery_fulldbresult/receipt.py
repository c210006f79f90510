"""The receipt claim: a worker takes an attempt of a task before it runs it, once.

A message can reach workers more than once: the scheduler forwards a claim again when its
sender died after publishing it (``SCHEDULER_RECLAIM_AFTER``), Redis and SQS hand a message
out again after ``visibility_timeout`` while the first worker still holds it, a publish may
be duplicated. When a worker receives a forwarded message (and, with
``DJANGO_CELERY_FULLDBRESULT_RUN_ONCE``, any message) its main process takes the attempt
(task id + ``retries``) in one conditional UPDATE of the task's row
(``TaskResultQuerySet.takeable().take()``: RECEIVED, with its hostname), before the task
reaches the pool. If the row says the attempt ended, a newer one exists, or a live worker
holds it, the message is acknowledged and not run; if the row is REVOKED, the task is
revoked as Celery revokes it (durable revocation). A row taken by a worker that died
(heartbeats) is taken again.

How a message is skipped: Celery checks its revoked set right before it runs a request
(``Request.revoked()``, in the worker's main process), then acknowledges it and records
REVOKED through the backend. A skipped copy's id goes into that set and into ``_skipped``;
the backend's ``mark_as_revoked`` sees it there and writes nothing (the row belongs to the
attempt that ran or runs), and the id leaves the revoked set again, so a later attempt of
the same task is not refused. Celery still logs "Discarding revoked task" and sends its
``task_revoked`` signal and ``task-revoked`` event for the copy.

A forwarded task whose result is ignored is taken by deleting its row (nothing would ever
follow it): a second copy finds no row and is skipped.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, ClassVar

from celery.app.task import Context
from celery.worker import state as worker_state
from django.conf import settings
from django.db import connections
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from . import conf, db, heartbeat, records
from .models import TaskResultMeta
from .states import RECEIVED, REVOKED

logger = logging.getLogger(__name__)

#: A header on every message the scheduler forwards: a worker receiving one always takes
#: the attempt first (revoked rows, copies of a forward).
FORWARDED_HEADER = "fulldb_forwarded"


class Outcome(enum.Enum):
    TAKEN = "taken"  # run it
    REVOKED = "revoked"  # Celery revokes it (REVOKED recorded, acknowledged)
    DUPLICATE = "duplicate"  # acknowledged, not run, nothing recorded
    UNKNOWN = "unknown"  # no row to decide by: run it


@dataclass(frozen=True)
class Attempt:
    """The attempt a message carries, who received it, and the call (for a first row)."""

    task_id: str
    task: str
    retries: int
    hostname: str
    forwarded: bool
    ignore_result: bool
    #: The worker's request (``celery.worker.request.Request``), if any: the row a first
    #: receipt writes holds the call, as the worker's own writes do.
    request: Any = None

    @classmethod
    def of(cls, request: Any) -> Attempt:
        headers = request.request_dict or {}
        return cls(
            task_id=request.id,
            task=request.task_name,
            retries=int(headers.get("retries") or 0),
            hostname=request.hostname or "",
            forwarded=bool(headers.get(FORWARDED_HEADER)),
            ignore_result=bool(getattr(request, "ignore_result", False)),
            request=request,
        )

    def applies(self) -> bool:
        """Forwarded messages always; others with RUN_ONCE, when a row records the result."""
        return self.forwarded or (bool(conf.get("RUN_ONCE")) and not self.ignore_result)


def take(attempt: Attempt, using: str) -> tuple[Outcome, str]:
    """Take ``attempt`` for its worker (one statement when it is free); the outcome and, when
    it is not taken, what the row says.

    A row may appear between the take and the read that says why it failed (publish
    tracking writes behind): the take is tried once more before the copy is refused.
    """
    rows = TaskResultMeta.objects.using(using).filter(task_id=attempt.task_id)
    row: dict[str, Any] | None = None
    for _ in range(2):
        if _taken(rows, attempt):
            return Outcome.TAKEN, ""
        row = rows.values("status", "retries", "hostname").first()
        if row is not None:
            continue  # decided on once more: it may have been written just now
        if attempt.forwarded:  # a forwarded row is deleted only by the worker taking it
            return Outcome.DUPLICATE, "taken by another worker"
        if _insert_taken(attempt, using):
            return Outcome.TAKEN, ""
    if row is None:
        return Outcome.UNKNOWN, "no row"
    if row["status"] == REVOKED:
        return Outcome.REVOKED, "revoked"
    return Outcome.DUPLICATE, (
        f"attempt {row['retries']} is {row['status']} on {row['hostname'] or 'no worker'}"
    )


def _taken(rows: Any, attempt: Attempt) -> bool:
    """The take itself: one UPDATE (RECEIVED, this worker's), or, for a forwarded task whose
    result is ignored, one DELETE (nothing would ever follow its row)."""
    if attempt.forwarded and attempt.ignore_result:
        deleted, _ = rows.takeable(attempt.retries).delete()
        return bool(deleted)
    statement = TakeStatement.get(rows.db)
    with db.statement_cursor(rows.db) as cursor:
        cursor.execute(statement.sql, statement.params(attempt, timezone.now()))
        return cursor.rowcount == 1


@dataclass(frozen=True)
class TakeStatement:
    """``filter(task_id=...).takeable(retries).take(retries, hostname)`` as SQL, compiled
    once per database and settings: the rule stays the QuerySet's, and a worker does not
    compile it again for every message (about 1 ms of its consumer's time each).

    Compiled with sentinel values; ``params`` puts the message's values in their places.
    """

    sql: str
    #: Parameter index -> which value goes there ("task_id", "retries", "hostname",
    #: "now", "cutoff"); every other parameter is a constant of the rule.
    slots: dict[int, str]
    constants: list[Any]
    #: How far before "now" a live worker's last heartbeat may be (None: heartbeats off).
    window: timedelta | None
    connection_alias: str

    _TASK_ID = "fulldb-sentinel-task-id-7f3c9a"
    _HOSTNAME = "fulldb-sentinel-hostname-7f3c9a"
    _RETRIES = 987_654_321
    _cache: ClassVar[dict[tuple, TakeStatement]] = {}

    @classmethod
    def get(cls, using: str) -> TakeStatement:
        window = heartbeat.window()
        key = (using, connections[using].vendor, window, settings.USE_TZ)
        statement = cls._cache.get(key)
        if statement is None:
            statement = cls._cache[key] = cls._compile(using, window)
        return statement

    @classmethod
    def _compile(cls, using: str, window: timedelta | None) -> TakeStatement:
        now = _sentinel_time()
        qs = TaskResultMeta.objects.using(using).filter(task_id=cls._TASK_ID)
        qs = qs.takeable(cls._RETRIES, now=now)
        query = qs.query.chain(UpdateQuery)
        query.add_update_values(qs.taken_columns(cls._RETRIES, cls._HOSTNAME, now=now))
        sql, params = query.get_compiler(using).as_sql()
        connection = connections[using]
        named = {
            _prepared(connection, now): "now",
            cls._TASK_ID: "task_id",
            cls._HOSTNAME: "hostname",
            cls._RETRIES: "retries",
        }
        if window is not None:
            named[_prepared(connection, now - window)] = "cutoff"
        slots = {i: named[p] for i, p in enumerate(params) if _hashable(p) and p in named}
        return cls(sql, slots, list(params), window, using)

    def params(self, attempt: Attempt, now: datetime) -> list[Any]:
        connection = connections[self.connection_alias]
        values = {
            "task_id": attempt.task_id,
            "hostname": attempt.hostname,
            "retries": attempt.retries,
            "now": _prepared(connection, now),
        }
        if self.window is not None:
            values["cutoff"] = _prepared(connection, now - self.window)
        out = list(self.constants)
        for index, name in self.slots.items():
            out[index] = values[name]
        return out


def _sentinel_time() -> datetime:
    moment = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=dt_timezone.utc)
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def _prepared(connection: Any, value: datetime) -> Any:
    return TaskResultMeta._meta.get_field("date_modified").get_db_prep_value(value, connection)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _insert_taken(attempt: Attempt, using: str) -> bool:
    """No row yet (publish tracking off, or still behind): the first receipt writes it, with
    the call as the worker's own writes store it (``records.from_request``: exact
    arguments, or none and not replayable for a secret task)."""
    now = timezone.now()
    values: dict[str, Any] = {}
    request = attempt.request
    if request is not None:
        context = Context(request.request_dict, args=request.args, kwargs=request.kwargs)
        values.update(records.from_request(request.task.app, context))
    values.setdefault("replayable", False)  # no call stored: nothing to send again
    values.update(
        task_id=attempt.task_id,
        task=attempt.task,
        status=RECEIVED,
        hostname=attempt.hostname,
        retries=attempt.retries,
        date_submitted=now,
        date_modified=now,
    )
    return TaskResultMeta.objects.insert_absent(values, using=using)


# -- skipping a copy -------------------------------------------------------------------------

_lock = threading.Lock()
_skipped: set[str] = set()


def _skip(task_id: str) -> None:
    with _lock:
        _skipped.add(task_id)
    worker_state.revoked.add(task_id)


def was_skipped(task_id: str | None) -> bool:
    """Called by the backend's ``mark_as_revoked``: True (once) for a copy this worker
    skipped, whose revocation must not be recorded. The id leaves Celery's revoked set."""
    if task_id is None:
        return False
    with _lock:
        if task_id not in _skipped:
            return False
        _skipped.discard(task_id)
    worker_state.revoked.discard(task_id)
    return True


def on_task_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """``task_received`` (the worker's main process, before the pool): take the attempt."""
    if request is None:
        return
    attempt = Attempt.of(request)
    if not attempt.applies():
        return
    try:
        outcome, why = db.run_with_reconnect(lambda using: take(attempt, using))
    except Exception:  # noqa: BLE001 - cannot tell: the task runs, as without the check
        logger.exception(
            "run once: could not take %s[%s] attempt %d; running it unchecked",
            attempt.task,
            attempt.task_id,
            attempt.retries,
        )
        return
    if outcome is Outcome.REVOKED:
        worker_state.revoked.add(attempt.task_id)
    elif outcome is Outcome.DUPLICATE:
        logger.info(
            "run once: %s[%s] attempt %d not run (%s); the copy is acknowledged",
            attempt.task,
            attempt.task_id,
            attempt.retries,
            why,
        )
        _skip(attempt.task_id)
