"""Queries and single-statement writes on the task table.

Every state write is one ``INSERT ... ON CONFLICT DO UPDATE`` (PostgreSQL,
SQLite) or ``INSERT ... ON DUPLICATE KEY UPDATE`` (MySQL, MariaDB) whose
``SET`` expressions carry the precedence rules of ``docs/design.md``, so
concurrent writers never need a read first and never lose a final state.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connections, models
from django.db.models import Q
from django.utils import timezone

from . import conf, heartbeat
from .db import DatabaseNow, statement_cursor
from .states import (
    ENDED_STATES,
    FAILURE,
    FINAL_STATES,
    RECEIVED,
    REVOKED,
    SCHEDULED,
    SCHEDULED_SENT,
    STARTED,
    SUCCESS,
    UNRECEIVED_STATES,
)

# How a column of an incoming write combines with the stored row.
STATE = "state"  # replaced when the write wins precedence
STATE_KEEP = "state_keep"  # replaced when the write wins and carries a value
LATEST = "latest"  # newest non-null value wins (fill-only when the write loses)
FILL = "fill"  # first non-null value wins: never overwritten, never wiped

COLUMN_POLICY: dict[str, str] = {
    "task": FILL,
    "args": FILL,
    "kwargs": FILL,
    "packed_args": FILL,
    "packed_args_content_type": FILL,
    "argsrepr": FILL,
    "kwargsrepr": FILL,
    "replayable": FILL,
    "options": FILL,
    "queue": FILL,
    "exchange": FILL,
    "routing_key": FILL,
    "priority": FILL,
    "parent_id": FILL,
    "root_id": FILL,
    "group_id": FILL,
    "periodic_task_name": FILL,
    "date_submitted": FILL,
    "eta": LATEST,
    "expires": LATEST,
    "result": STATE,
    "content_type": STATE,
    "content_encoding": STATE,
    "traceback": STATE,
    "date_done": STATE,
    "date_modified": STATE,
    # A winning state write ends any sender's claim (a retry is scheduled anew).
    "scheduled_id": STATE,
    "date_claimed": STATE,
    "meta": STATE_KEEP,
    "date_started": STATE_KEEP,
    "hostname": STATE_KEEP,
    # status and retries are always written last (see _build_upsert).
}

JSON_COLUMNS = frozenset({"args", "kwargs", "options", "meta"})
#: Written by every INSERT even when the writer does not know them (field defaults).
NOT_NULL_COLUMNS = frozenset({"task", "replayable"})
#: What a write of an attempt fills once: a later write of the same attempt by the same
#: writer leaves them out (its values are stored already; FILL never replaces them), so a
#: SUCCESS after STARTED sends neither the arguments again nor their encoding.
FILLED_ONCE = frozenset(c for c, p in COLUMN_POLICY.items() if p == FILL) - NOT_NULL_COLUMNS
#: The states of a task a worker holds: recovered when that worker is gone.
LOST_STATES = (RECEIVED, STARTED)
_FINALS_SQL = ", ".join(f"'{state}'" for state in sorted(FINAL_STATES))


class AttemptRow(NamedTuple):
    """What an attempt of a Django task reads from its row when it starts (``add_worker``)."""

    date_submitted: datetime | None
    date_started: datetime | None
    meta: dict[str, Any]


class TaskResultQuerySet(models.QuerySet):
    def get_stale_tasks(
        self,
        max_duration: timedelta | None = None,
        acceptable_states: Iterable[str] | None = None,
        now: datetime | None = None,
    ) -> TaskResultQuerySet:
        """Tasks that should have moved on by now (see "Stale tasks" in docs/design.md).

        A row is stale when it is not final, not in ``acceptable_states``, and:

        * SCHEDULED: its eta passed more than ``max_duration`` ago (it was never forwarded);
        * RECEIVED, STARTED: taken or started more than ``max_duration`` ago and the worker
          that took it is gone (``heartbeat.runners_alive_now``: a live worker running a long
          task, or holding a message until its eta, is not stale);
        * any other state (PENDING, RETRY, SCHEDULED_SENT, custom): its last state change
          is older than ``max_duration``.

        SUCCESS, FAILURE and REVOKED are never stale.
        """
        now = now or timezone.now()
        cutoff = now - (max_duration or timedelta(0))
        excluded = set(FINAL_STATES) | set(acceptable_states or ())
        by_age = Q(date_modified__lte=cutoff) & ~Q(status=SCHEDULED)
        overdue = Q(status=SCHEDULED, eta__lte=cutoff)
        qs = self.exclude(status__in=sorted(excluded)).filter(by_age | overdue)
        alive = heartbeat.runners_alive_now(now=now, using=self.db)
        if alive is not None:
            qs = qs.exclude(Q(status__in=[RECEIVED, STARTED]) & alive)
        return qs

    # -- a worker's receipt claim (``receipt``): each attempt of a task runs once.

    def takeable(self, retries: int, now: datetime | None = None) -> TaskResultQuerySet:
        """Rows a worker receiving attempt ``retries`` of their task may run.

        * a newer attempt than the row's, unless the row is SUCCESS or REVOKED (final for
          every attempt);
        * this attempt, not yet taken by a worker (PENDING, SCHEDULED, SCHEDULED_SENT);
        * this attempt, taken or running (RECEIVED, STARTED, custom states) by a worker
          that is gone (``heartbeat.runner_alive``); with heartbeats off, never.

        Not: an older attempt, an attempt that ended (SUCCESS, FAILURE, REVOKED, RETRY), an
        attempt a live worker holds.
        """
        newer = Q(retries__lt=retries) & ~Q(status__in=[SUCCESS, REVOKED])
        unreceived = Q(retries=retries, status__in=sorted(UNRECEIVED_STATES))
        takeable = newer | unreceived
        alive = heartbeat.runner_alive(now=now, using=self.db)
        if alive is not None:
            held = sorted(ENDED_STATES | UNRECEIVED_STATES)
            takeable |= Q(retries=retries) & ~Q(status__in=held) & ~alive
        return self.filter(takeable)

    def take(self, retries: int, hostname: str) -> int:
        """A worker takes attempt ``retries`` (on ``takeable`` rows): RECEIVED, its own."""
        return self.update(**self.taken_columns(retries, hostname))

    @staticmethod
    def taken_columns(retries: int, hostname: str, now: datetime | None = None) -> dict:
        """What ``take`` writes (``receipt`` compiles the same statement once)."""
        return {
            "status": RECEIVED,
            "hostname": hostname,
            "retries": retries,
            "date_modified": now or timezone.now(),
            "date_done": None,
            "scheduled_id": None,
            "date_claimed": None,
        }

    def get_stale_scheduled_tasks(
        self, max_duration: timedelta | None = None, now: datetime | None = None
    ) -> TaskResultQuerySet:
        """Scheduled rows a sender claimed but never recorded as sent (it crashed).

        They may or may not have reached the broker: the scheduler never resends
        them by itself (at most once); ``find_stale_scheduled_tasks --resend`` does
        on purpose. ``max_duration``: how long ago the claim was taken.
        """
        cutoff = (now or timezone.now()) - (max_duration or timedelta(0))
        return self.scheduled().claimed().filter(date_claimed__lte=cutoff)

    # -- the database ETA scheduler's rows (the state machine is in scheduler/__init__.py);
    # every rule is written once here and used by the ORM and the raw claim alike. Times
    # are the database's clock (``DatabaseNow``) unless given.

    def scheduled(self) -> TaskResultQuerySet:
        """Waiting in the database (the partial index ``fdr_scheduled_eta_idx``)."""
        return self.filter(status=SCHEDULED)

    def unclaimed(self) -> TaskResultQuerySet:
        return self.filter(scheduled_id__isnull=True)

    def claimed(self, token: Any = None) -> TaskResultQuerySet:
        """Held by a sender (by the one holding ``token``, if given)."""
        if token is None:
            return self.filter(scheduled_id__isnull=False)
        return self.filter(scheduled_id=token)

    def due(self, now: Any = None) -> TaskResultQuerySet:
        return self.filter(eta__lte=now if now is not None else DatabaseNow())

    def expired(self, now: Any = None) -> TaskResultQuerySet:
        return self.filter(expires__lte=now if now is not None else DatabaseNow())

    def unexpired(self, now: Any = None) -> TaskResultQuerySet:
        now = now if now is not None else DatabaseNow()
        return self.filter(Q(expires__isnull=True) | Q(expires__gt=now))

    def ready_to_send(self) -> TaskResultQuerySet:
        """Due, unclaimed, unexpired: what a sender may claim."""
        return self.scheduled().unclaimed().due().unexpired()

    def expired_unsent(self) -> TaskResultQuerySet:
        """Due, unclaimed and expired: revoked instead of sent."""
        return self.scheduled().unclaimed().due().expired()

    def lease_expired(self, lease: timedelta, now: datetime | None = None) -> TaskResultQuerySet:
        """Claims their sender stopped renewing for ``lease``: it is gone (killed, lost).

        A live sender renews the claims it holds every quarter of the lease (``renew``), so
        a slow sender keeps them; the partial index ``fdr_claimed_idx`` serves this query.
        """
        cutoff = (now or timezone.now()) - lease
        return self.scheduled().claimed().filter(date_claimed__lt=cutoff)

    def claim(self, token: Any) -> int:
        """Take these rows for a sender (callers select only unclaimed rows)."""
        return self.update(scheduled_id=token, date_claimed=timezone.now())

    def renew(self) -> int:
        """A live sender still holds these claims: their lease starts again."""
        return self.update(date_claimed=timezone.now())

    def release(self) -> int:
        """Give claimed rows back: a later pass sends them."""
        return self.update(scheduled_id=None, date_claimed=None, date_modified=timezone.now())

    def mark_sent(self) -> int:
        """The broker has them; the worker's states follow."""
        return self.update(status=SCHEDULED_SENT, date_modified=timezone.now())

    # -- recovering the tasks of a lost worker (recovery.py, docs/design.md section 5).
    # ``recoverable`` is the rule and also the guard of both transitions: recovery re-applies
    # it in the UPDATE itself, so a row another recoverer (or a worker) moved on is left.

    def recoverable(
        self,
        max_age: timedelta,
        acceptable_states: Iterable[str] | None = None,
        now: datetime | None = None,
    ) -> TaskResultQuerySet:
        """Stale RECEIVED/STARTED rows whose worker is gone: what recovery may act on.

        Gone is ``get_stale_tasks``' rule (the heartbeat); with heartbeats off nobody can
        tell, so nothing is recoverable. ``max_age`` must be positive: a row just requeued
        (eta = now) or just taken by a worker must never count as stale again.
        """
        if max_age <= timedelta(0):
            raise ValueError(f"recovering stale tasks needs a positive age, not {max_age}")
        if heartbeat.interval() <= 0:
            return self.none()
        stale = self.get_stale_tasks(max_age, acceptable_states, now)
        return stale.filter(status__in=LOST_STATES, hostname__isnull=False)

    def requeue(self, marker: Any = None, meta: Any = None) -> int:
        """Send again: each row becomes a due, unclaimed SCHEDULED row (same task id, same
        attempt), for ``scheduler.send_now`` or any sender. ``marker``: a token left in
        ``scheduled_id`` to read back what this statement changed (the caller clears it in
        the same transaction); ``meta``: the row's note of what happened."""
        return self.update(
            status=SCHEDULED,
            eta=DatabaseNow(),
            scheduled_id=marker,
            date_claimed=None,
            hostname=None,
            date_started=None,
            date_modified=timezone.now(),
            **({"meta": meta} if meta is not None else {}),
        )

    def mark_lost(self, failure: Mapping[str, Any], marker: Any = None) -> int:
        """FAILURE: the worker running them is gone. ``failure``: the result columns (an
        encoded ``WorkerLostError``, its text as traceback); ``marker`` as for requeue."""
        now = timezone.now()
        return self.update(
            **failure,
            status=FAILURE,
            scheduled_id=marker,
            date_claimed=None,
            date_done=now,
            date_modified=now,
        )

    def stats(self, window: timedelta = timedelta(hours=24), **options: Any) -> dict[str, Any]:
        """Counts, failure rate, run times, stale rows and scheduled backlog over ``window``.

        A JSON-serialisable dict; see ``django_celery_fulldbresult.stats.collect``.
        """
        from . import stats

        return stats.collect(self.all(), window, **options)


class TaskDatabaseManager(models.Manager):
    """Every query of the package's models starts on the task database
    (``DJANGO_CELERY_FULLDBRESULT_DATABASE``), whatever the project's routers say: the
    admin, dashboard, commands and stats read what the backend writes, and every read that
    decides a write (an admin action, a resend) reads the primary, never a replica.
    ``.using()`` still wins (the backend's own connection, tests)."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().using(conf.database())


class TaskResultManager(TaskDatabaseManager.from_queryset(TaskResultQuerySet)):
    def get_task(self, task_id: str) -> Any:
        """The row for ``task_id``, or an unsaved PENDING instance (0.5.x API)."""
        try:
            return self.get(task_id=task_id)
        except self.model.DoesNotExist:
            return self.model(task_id=task_id)

    # -- writes -------------------------------------------------------------

    def store_state(
        self,
        values: Mapping[str, Any],
        *,
        using: str,
        retries: int | None,
        replace_call: bool = False,
        only_over: Iterable[str] | None = None,
    ) -> None:
        """Write a state change in one statement, applying the precedence rules.

        ``values`` maps column names to Python values (``None``: not known by
        this writer). ``retries`` is the attempt the write comes from, or None
        when unknown (``update_state`` without a request): it then counts as
        the stored attempt. ``replace_call`` lets this write replace the stored
        call (args, options) instead of only filling it. ``only_over``: the write
        wins only over a row in one of these states (a revoke from outside the worker).
        """
        connection = connections[using]
        sql, params = _build_upsert(
            self.model,
            connection,
            values,
            retries=retries,
            replace_call=replace_call,
            only_over=tuple(sorted(only_over)) if only_over is not None else None,
        )
        with statement_cursor(using) as cursor:
            cursor.execute(sql, params)

    def add_worker(self, task_id: str, hostname: str, *, key: str, using: str) -> AttemptRow:
        """Append ``hostname`` to the list ``meta[key]`` of the row of ``task_id`` and return
        what the attempt needs from the row (one ``UPDATE ... RETURNING`` on PostgreSQL;
        a read and a write elsewhere). No row: nothing written, the list is ``[hostname]``."""
        connection = connections[using]
        if connection.vendor == "postgresql":
            sql = _add_worker_sql(connection, self.model)
            with statement_cursor(using) as cursor:
                cursor.execute(sql, [key, key, hostname, task_id])
                found = cursor.fetchone()
            if found is None:
                return AttemptRow(None, None, {key: [hostname]})
            submitted, started, meta = found
            meta = json.loads(meta) if isinstance(meta, str) else meta  # Django loads jsonb as text
            return AttemptRow(submitted, started, meta)
        rows = self.using(using).filter(task_id=task_id)
        row = rows.values("date_submitted", "date_started", "meta").first() or {}
        meta = dict(row.get("meta") or {})
        meta[key] = [*meta.get(key, []), hostname]
        rows.update(meta=meta)
        return AttemptRow(row.get("date_submitted"), row.get("date_started"), meta)

    def record_publish(self, values: Mapping[str, Any], *, using: str) -> None:
        """Insert a PENDING row if none exists; otherwise only fill what is missing.

        One statement; it never changes the state of an existing row.
        """
        self.record_publishes([values], using=using)

    def insert_absent(self, values: Mapping[str, Any], *, using: str) -> bool:
        """Insert one row (values as the backend's writes carry them: JSON columns as
        encoded text) unless its task id is there; True when inserted. One statement."""
        connection = connections[using]
        columns = [c for c in values if c != "id"]
        for column in NOT_NULL_COLUMNS:
            if column not in columns:
                columns.append(column)
        sql, params = _insert_clause(self.model, connection, columns, values)
        if connection.vendor == "mysql":
            sql = sql.replace("INSERT INTO", "INSERT IGNORE INTO", 1)
        else:
            sql += " ON CONFLICT (task_id) DO NOTHING"
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount == 1

    def record_publishes(self, rows: Sequence[Mapping[str, Any]], *, using: str) -> None:
        """``record_publish`` of many rows in one statement (a task id sent twice: the
        first publish fills the row, as two statements in that order would)."""
        unique = list({values["task_id"]: values for values in reversed(rows)}.values())
        if not unique:
            return
        unique.reverse()
        connection = connections[using]
        with statement_cursor(using) as cursor:
            if connection.vendor == "postgresql" and len(unique) > 1:
                cursor.execute(
                    _insert_or_fill_recordset_sql(self.model, connection),
                    [_recordset_json(self.model, connection, unique)],
                )
                return
            sql = _insert_or_fill_sql(self.model, connection)
            params = [_publish_params(self.model, connection, values) for values in unique]
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:  # MySQL's driver makes it one multi-row INSERT; SQLite runs it in C
                cursor.executemany(sql, params)

    def delete_expired(
        self,
        expires: timedelta | float,
        *,
        using: str,
        batch_size: int = 5000,
        states: Iterable[str] = FINAL_STATES,
    ) -> int:
        """Delete rows of the final ``states`` done before ``now - expires``, in batches.

        Raw statements: no rows are loaded into Python and no delete signals fire.
        Unfinished rows (PENDING, STARTED, RETRY, SCHEDULED, ...) are never touched.
        """
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        cutoff = timezone.now() - expires
        finals = sorted(set(states) & FINAL_STATES)
        if not finals:
            return 0
        connection = connections[using]
        holders = ", ".join(["%s"] * len(finals))
        group_id = _quote(connection, "group_id")
        return _delete_in_batches(
            self.model,
            connection,
            f"{{date_done}} < %s AND {{status}} IN ({holders})"
            f" AND ({group_id} IS NULL OR {group_id} NOT IN ({_running_chords(self, connection)}))",
            [cutoff, *finals],
            batch_size,
            datetime_field="date_done",
        )


def _running_chords(manager, connection) -> str:
    """SQL selecting the group ids of unfinished chords: their header results and group are
    kept whatever their age, since the chord's last part joins them."""
    counters = manager.model._meta.apps.get_model("django_celery_fulldbresult", "ChordCounter")
    table = _quote(connection, counters._meta.db_table)
    return (
        f"SELECT {_quote(connection, 'group_id')} FROM {table}"
        f" WHERE {_quote(connection, 'date_done')} IS NULL"
    )


class GroupResultManager(TaskDatabaseManager):
    def delete_expired(
        self, expires: timedelta | float, *, using: str, batch_size: int = 5000
    ) -> int:
        """Delete groups saved before ``now - expires``, except the header of a chord that
        is still running (its last part restores it)."""
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        cutoff = timezone.now() - expires
        connection = connections[using]
        group_id = _quote(connection, "group_id")
        return _delete_in_batches(
            self.model,
            connection,
            f"{{date_done}} < %s AND {group_id} NOT IN ({_running_chords(self, connection)})",
            [cutoff],
            batch_size,
            datetime_field="date_done",
        )


# -- SQL builders -----------------------------------------------------------


def _quote(connection, name: str) -> str:
    return connection.ops.quote_name(name)


def _prep(model, connection, column: str, value: Any) -> Any:
    """Python value -> database parameter (JSON columns arrive as encoded text)."""
    if value is None or column in JSON_COLUMNS:
        return value
    field = model._meta.get_field(column)
    return field.get_db_prep_value(value, connection, prepared=False)


def _insert_value(model, column: str, value: Any) -> Any:
    """The value an INSERT needs: the field default where the writer knows nothing."""
    if value is not None:
        return value
    field = model._meta.get_field(column)
    if field.null:
        return None
    return field.get_default()


def _on_conflict(connection) -> str:
    if connection.vendor == "mysql":
        return "ON DUPLICATE KEY UPDATE"
    return f"ON CONFLICT ({_quote(connection, 'task_id')}) DO UPDATE SET"


#: Alias of the target table in upserts (PostgreSQL, SQLite): keeps statements short.
ROW_ALIAS = "t"


def _insert_clause(model, connection, columns: list[str], values: Mapping[str, Any]):
    return _insert_sql(model, connection, columns), _row_params(model, connection, columns, values)


def _row_params(model, connection, columns: Sequence[str], values: Mapping[str, Any]) -> list[Any]:
    """One row's parameters for ``_insert_sql``, field defaults where ``values`` has none
    (``_prep`` of ``_insert_value``, with each column's field looked up once per process)."""
    params = []
    for column, field, prepares, text in _column_fields(model, tuple(columns)):
        value = values.get(column)
        if value is None:
            if field.null:
                params.append(None)
                continue
            value = field.get_default()
        if prepares and value is not None and not (text and type(value) is str):
            value = field.get_db_prep_value(value, connection, prepared=False)
        params.append(value)
    return params


#: Fields whose ``get_db_prep_value`` returns a ``str`` as it is, on every vendor.
_TEXT_FIELDS = frozenset({"CharField", "TextField"})


@functools.lru_cache(maxsize=256)
def _column_fields(model, columns: tuple[str, ...]) -> list[tuple[str, Any, bool, bool]]:
    """(column, field, whether its value needs ``get_db_prep_value``, whether it is a text
    column, whose ``str`` values need none) for each column. JSON columns arrive as encoded
    text: no ``get_db_prep_value``."""
    return [
        (
            column,
            field := model._meta.get_field(column),
            column not in JSON_COLUMNS,
            field.get_internal_type() in _TEXT_FIELDS,
        )
        for column in columns
    ]


def _insert_sql(model, connection, columns: Sequence[str]) -> str:
    """``INSERT INTO table (columns) VALUES (...)`` (the table aliased, see ``_stored``)."""
    return _insert_sql_of(connection.vendor, model._meta.db_table, tuple(columns))


@functools.lru_cache(maxsize=256)
def _insert_sql_of(vendor: str, db_table: str, columns: tuple[str, ...]) -> str:
    """``_insert_sql``, a pure function of these, so cached (a state write has a few shapes)."""
    table = _quote_name(vendor, db_table)
    if vendor != "mysql":
        table = f"{table} AS {ROW_ALIAS}"
    names = ", ".join(_quote_name(vendor, c) for c in columns)
    json_holder = "%s::jsonb" if vendor == "postgresql" else "%s"
    holders = ", ".join(json_holder if c in JSON_COLUMNS else "%s" for c in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({holders})"


def _precedence_sql(
    old_status: str,
    old_retries: str,
    new_status: str,
    retries: int | None,
    only_over: tuple[str, ...] | None = None,
) -> str:
    """SQL that is true when a write of ``new_status`` from attempt ``retries`` wins.

    ``old_status``/``old_retries`` are the SQL references to the stored values.

    * SUCCESS is final: nothing replaces it (the first SUCCESS is kept).
    * A write from an older attempt never wins.
    * A final state wins over anything (but SUCCESS) from the same or an older attempt.
    * A non-final state wins only over a non-final state of the same attempt,
      or over anything from an older attempt.
    * A write with ``only_over`` (a revoke from outside the worker running the task)
      wins only over those states: never over a task another worker started, nor over a
      result.
    """
    if only_over is not None:
        listed = ", ".join(f"'{state}'" for state in only_over)
        return f"({old_status} IN ({listed}))"
    incoming = old_retries if retries is None else str(int(retries))
    not_success = f"{old_status} <> '{SUCCESS}'"
    if new_status in FINAL_STATES:
        return f"({not_success} AND {incoming} >= {old_retries})"
    return (
        f"({not_success} AND ({incoming} > {old_retries} OR ({incoming} = {old_retries}"
        f" AND {old_status} NOT IN ({_FINALS_SQL}))))"
    )


def _quote_name(vendor: str, name: str) -> str:
    return f"`{name}`" if vendor == "mysql" else f'"{name}"'


def _incoming(vendor: str, column: str) -> str:
    """The value the INSERT part carries for ``column``, as seen from the update part."""
    quoted = _quote_name(vendor, column)
    ref = f"VALUES({quoted})" if vendor == "mysql" else f"EXCLUDED.{quoted}"
    # The NOT NULL name column gets '' when the writer does not know it.
    return f"NULLIF({ref}, '')" if column == "task" else ref


@functools.lru_cache(maxsize=256)
def _upsert_update_sql(
    vendor: str,
    table: str,
    columns: tuple[str, ...],
    final: bool,
    retries: int | None,
    replace_call: bool,
    only_over: tuple[str, ...] | None = None,
) -> str:
    """The ``SET`` part of a state write; a pure function of its arguments, so cached.

    The incoming values are read back from the INSERT part (``EXCLUDED``/``VALUES()``),
    so the statement carries each value once, and only ``columns`` (what the
    writer knows, plus the state columns) appear at all.
    """

    def old(column: str) -> str:
        return _stored(vendor, column)

    wins = _precedence_sql(
        old("status"), old("retries"), SUCCESS if final else "PENDING", retries, only_over
    )
    sets: list[str] = []
    for column in columns:
        policy = COLUMN_POLICY[column]
        new, ref = _incoming(vendor, column), old(column)
        target = _quote_name(vendor, column)
        if policy == FILL and replace_call:
            policy = LATEST
        if policy == FILL and column == "task":  # NOT NULL: '' means unknown
            sets.append(f"{target} = COALESCE(NULLIF({ref}, ''), {new}, '')")
        elif policy == FILL:
            sets.append(f"{target} = COALESCE({ref}, {new})")
        elif policy == LATEST:
            sets.append(
                f"{target} = CASE WHEN {wins} THEN COALESCE({new}, {ref})"
                f" ELSE COALESCE({ref}, {new}) END"
            )
        elif policy == STATE:
            sets.append(f"{target} = CASE WHEN {wins} THEN {new} ELSE {ref} END")
        else:  # STATE_KEEP
            sets.append(f"{target} = CASE WHEN {wins} THEN COALESCE({new}, {ref}) ELSE {ref} END")
    # status and retries last. Every expression above reads the stored status
    # and retries. MySQL applies assignments left to right (later ones see the
    # new values), so there the retries expression runs after the status one
    # and asks whether the status is now the incoming one; PostgreSQL and
    # SQLite see only stored values and can reuse the precedence test.
    status_col, retries_col = _quote_name(vendor, "status"), _quote_name(vendor, "retries")
    new_status = _incoming(vendor, "status")
    sets.append(f"{status_col} = CASE WHEN {wins} THEN {new_status} ELSE {old('status')} END")
    if retries is not None:
        incoming = int(retries)
        won = f"{old('status')} = {new_status}" if vendor == "mysql" else wins
        sets.append(
            f"{retries_col} = CASE WHEN {won} AND {incoming} > {old('retries')}"
            f" THEN {incoming} ELSE {old('retries')} END"
        )
    return ", ".join(sets)


def _build_upsert(
    model,
    connection,
    values: Mapping[str, Any],
    *,
    retries: int | None,
    replace_call: bool,
    only_over: tuple[str, ...] | None = None,
) -> tuple[str, list[Any]]:
    # A column the writer does not know and that the state does not reset is
    # left out: the stored value stays, and the statement stays short.
    known = tuple(
        column
        for column, policy in COLUMN_POLICY.items()
        if policy == STATE or column in NOT_NULL_COLUMNS or values.get(column) is not None
    )
    insert_sql, params = _insert_clause(
        model,
        connection,
        ["task_id", *known, "status", "retries"],
        {**values, "retries": retries or 0},
    )
    update_sql = _upsert_update_sql(
        connection.vendor,
        model._meta.db_table,
        known,
        values["status"] in FINAL_STATES,
        retries,
        replace_call,
        only_over,
    )
    return f"{insert_sql} {_on_conflict(connection)} {update_sql}", params


#: Columns a publish record may fill on an existing row (never state columns).
PUBLISH_FILL_COLUMNS = [c for c, p in COLUMN_POLICY.items() if p in (FILL, LATEST)]


def _stored(vendor: str, column: str) -> str:
    """The stored row's value of ``column`` inside an upsert's update part.

    PostgreSQL and SQLite address it through the target's alias (see
    ``_insert_clause``); MySQL has no alias there, and unqualified names mean
    the stored row.
    """
    if vendor == "mysql":
        return _quote_name(vendor, column)
    return f"{ROW_ALIAS}.{_quote_name(vendor, column)}"


@functools.lru_cache(maxsize=8)
def _fill_update_sql(vendor: str) -> str:
    sets = []
    for column in PUBLISH_FILL_COLUMNS:
        ref, new = _stored(vendor, column), _incoming(vendor, column)
        if column == "task":
            sets.append(f"{_quote_name(vendor, column)} = COALESCE(NULLIF({ref}, ''), {new}, '')")
        else:
            sets.append(f"{_quote_name(vendor, column)} = COALESCE({ref}, {new})")
    return ", ".join(sets)


#: The columns publish tracking writes.
PUBLISH_COLUMNS = ["task_id", *PUBLISH_FILL_COLUMNS, "status", "retries", "date_modified"]


def _add_worker_sql(connection, model) -> str:
    """PostgreSQL: ``meta[%s]`` (a list) gets ``%s`` appended, in the row of task id ``%s``."""
    table = _quote(connection, model._meta.db_table)
    meta = _quote(connection, "meta")
    return (
        f"UPDATE {table} SET {meta} = jsonb_set(COALESCE({meta}, '{{}}'::jsonb), "
        f"ARRAY[%s::text], COALESCE({meta} -> %s::text, '[]'::jsonb) || to_jsonb(%s::text)) "
        f"WHERE {_quote(connection, 'task_id')} = %s "
        f"RETURNING {_quote(connection, 'date_submitted')}, {_quote(connection, 'date_started')}, "
        f"{meta}"
    )


def _insert_or_fill_sql(model, connection) -> str:
    """Insert a PENDING row, or fill what a stored row lacks (one row's parameters:
    ``_publish_params``)."""
    insert_sql = _insert_sql(model, connection, PUBLISH_COLUMNS)
    return f"{insert_sql} {_on_conflict(connection)} {_fill_update_sql(connection.vendor)}"


def _publish_params(model, connection, values: Mapping[str, Any]) -> list[Any]:
    return _row_params(model, connection, PUBLISH_COLUMNS, values)


def _insert_or_fill_recordset_sql(model, connection) -> str:
    """PostgreSQL: ``_insert_or_fill_sql`` for many rows passed as one JSON array
    (``jsonb_to_recordset``). One short statement whatever the number of rows: the server
    parses the rows, and the client neither rewrites nor re-parses a statement of 25
    placeholders per row (a 500-row VALUES list cost the driver 0.07 ms per row)."""
    return _recordset_sql(model, connection.alias)


@functools.lru_cache(maxsize=16)
def _recordset_sql(model, alias: str) -> str:
    connection = connections[alias]
    meta = model._meta
    table = meta.db_table
    names, selects, definitions = [], [], []
    for column in PUBLISH_COLUMNS:
        field = meta.get_field(column)
        names.append(_quote(connection, field.column))
        key = _quote(connection, column)  # the recordset's columns: the JSON keys
        if column in JSON_COLUMNS:  # encoded JSON text, as in every other statement
            definitions.append(f"{key} text")
            selects.append(f"r.{key}::jsonb")
        elif field.get_internal_type() == "BinaryField":
            definitions.append(f"{key} text")
            selects.append(f"decode(r.{key}, 'base64')")
        else:
            definitions.append(f"{key} {field.db_type(connection)}")
            selects.append(f"r.{key}")
    return (
        f"INSERT INTO {_quote(connection, table)} AS {ROW_ALIAS} ({', '.join(names)}) "
        f"SELECT {', '.join(selects)} "
        f"FROM jsonb_to_recordset(%s::jsonb) AS r({', '.join(definitions)}) "
        f"{_on_conflict(connection)} {_fill_update_sql(connection.vendor)}"
    )


def _recordset_json(model, connection, rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as the JSON array ``_recordset_sql`` reads: Python values as
    ``_publish_params`` would give them, datetimes in ISO 8601 (with their offset), bytes
    in base64. Written for speed (the publish writer's share of the GIL): the fields'
    own conversions only where a value needs one."""
    encoded = []
    for values in rows:
        row = {}
        for column in PUBLISH_COLUMNS:
            value = values.get(column)
            if value is None:
                value = _insert_value(model, column, None)
            if isinstance(value, datetime):
                value = _prep(model, connection, column, value).isoformat()
            elif isinstance(value, (bytes, bytearray, memoryview)):
                value = base64.b64encode(bytes(value)).decode("ascii")
            elif not isinstance(value, (str, int, float, type(None))):
                value = _prep(model, connection, column, value)
            row[column] = value
        encoded.append(row)
    return json.dumps(encoded, separators=(",", ":"))


def _delete_in_batches(
    model,
    connection,
    where_template: str,
    where_params: list[Any],
    batch_size: int,
    datetime_field: str,
) -> int:
    where = where_template.format(
        date_done=_quote(connection, "date_done"), status=_quote(connection, "status")
    )
    field = model._meta.get_field(datetime_field)
    params = [
        field.get_db_prep_value(p, connection) if isinstance(p, datetime) else p
        for p in where_params
    ]
    return delete_where_in_batches(model, connection, where, params, batch_size)


def delete_where_in_batches(
    model,
    connection,
    where: str,
    params: list[Any],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete the rows matching the SQL ``where`` (prepared ``params``), ``batch_size`` per
    statement, until a statement deletes fewer; ``progress(total so far)`` after each one."""
    table = _quote(connection, model._meta.db_table)
    pk = _quote(connection, model._meta.pk.column)
    if connection.vendor == "mysql":
        sql = f"DELETE FROM {table} WHERE {where} LIMIT %s"
    else:
        sql = f"DELETE FROM {table} WHERE {pk} IN (SELECT {pk} FROM {table} WHERE {where} LIMIT %s)"
    total = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(sql, [*params, int(batch_size)])
            deleted = cursor.rowcount
        total += max(deleted, 0)
        if progress is not None:
            progress(total)
        if deleted < batch_size:
            return total
