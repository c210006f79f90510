"""Queries and single-statement writes on the task table.

Every state write is one ``INSERT ... ON CONFLICT DO UPDATE`` (PostgreSQL,
SQLite) or ``INSERT ... ON DUPLICATE KEY UPDATE`` (MySQL, MariaDB) whose
``SET`` expressions carry the precedence rules of ``docs/design.md``, so
concurrent writers never need a read first and never lose a final state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, models
from django.db.models import Q
from django.utils import timezone

from .states import FINAL_STATES, SCHEDULED, STARTED, SUCCESS

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
_FINALS_SQL = ", ".join(f"'{state}'" for state in sorted(FINAL_STATES))


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
        * STARTED: it started more than ``max_duration`` ago and its worker sends no
          heartbeat (a live worker running a long task is not stale);
        * any other state (PENDING, RECEIVED, RETRY, SCHEDULED_SENT, custom): its last
          state change is older than ``max_duration``.

        SUCCESS, FAILURE and REVOKED are never stale.
        """
        from . import heartbeat

        now = now or timezone.now()
        cutoff = now - (max_duration or timedelta(0))
        excluded = set(FINAL_STATES) | set(acceptable_states or ())
        by_age = Q(date_modified__lte=cutoff) & ~Q(status=SCHEDULED)
        overdue = Q(status=SCHEDULED, eta__lte=cutoff)
        qs = self.exclude(status__in=sorted(excluded)).filter(by_age | overdue)
        live = heartbeat.live_hostnames(now=now, using=self.db)
        if live is not None:
            qs = qs.exclude(status=STARTED, hostname__in=live)
        return qs

    def get_stale_scheduled_tasks(
        self, max_duration: timedelta | None = None, now: datetime | None = None
    ) -> TaskResultQuerySet:
        """Scheduled rows a sender claimed but never recorded as sent (it crashed).

        They may or may not have reached the broker: the scheduler never resends
        them by itself (at most once); ``find_stale_scheduled_tasks --resend`` does
        on purpose. ``max_duration``: how long ago the claim was taken.
        """
        cutoff = (now or timezone.now()) - (max_duration or timedelta(0))
        return self.filter(status=SCHEDULED, scheduled_id__isnull=False, date_claimed__lte=cutoff)

    def stats(self, window: timedelta = timedelta(hours=24), **options: Any) -> dict[str, Any]:
        """Counts, failure rate, run times, stale rows and scheduled backlog over ``window``.

        A JSON-serialisable dict; see ``django_celery_fulldbresult.stats.collect``.
        """
        from . import stats

        return stats.collect(self.all(), window, **options)


class TaskResultManager(models.Manager.from_queryset(TaskResultQuerySet)):
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
    ) -> None:
        """Write a state change in one statement, applying the precedence rules.

        ``values`` maps column names to Python values (``None``: not known by
        this writer). ``retries`` is the attempt the write comes from, or None
        when unknown (``update_state`` without a request): it then counts as
        the stored attempt. ``replace_call`` lets this write replace the stored
        call (args, options) instead of only filling it.
        """
        connection = connections[using]
        sql, params = _build_upsert(
            self.model, connection, values, retries=retries, replace_call=replace_call
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)

    def record_publish(self, values: Mapping[str, Any], *, using: str) -> None:
        """Insert a PENDING row if none exists; otherwise only fill what is missing.

        One statement; it never changes the state of an existing row.
        """
        connection = connections[using]
        sql, params = _build_insert_or_fill(self.model, connection, values)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)

    def delete_expired(
        self, expires: timedelta | float, *, using: str, batch_size: int = 5000
    ) -> int:
        """Delete final rows done before ``now - expires``, in batches of ``batch_size``.

        Raw statements: no rows are loaded into Python and no delete signals fire.
        Unfinished rows (PENDING, STARTED, RETRY, SCHEDULED, ...) are never touched.
        """
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        cutoff = timezone.now() - expires
        return _delete_in_batches(
            self.model,
            connections[using],
            f"{{date_done}} < %s AND {{status}} IN ({_FINALS_SQL})",
            [cutoff],
            batch_size,
            datetime_field="date_done",
        )


class GroupResultManager(models.Manager):
    def delete_expired(
        self, expires: timedelta | float, *, using: str, batch_size: int = 5000
    ) -> int:
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        cutoff = timezone.now() - expires
        return _delete_in_batches(
            self.model,
            connections[using],
            "{date_done} < %s",
            [cutoff],
            batch_size,
            datetime_field="date_done",
        )


# -- SQL builders -----------------------------------------------------------


def _quote(connection, name: str) -> str:
    return connection.ops.quote_name(name)


def _placeholder(connection, column: str) -> str:
    if column in JSON_COLUMNS and connection.vendor == "postgresql":
        return "%s::jsonb"
    return "%s"


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
    table = _quote(connection, model._meta.db_table)
    if connection.vendor != "mysql":
        table = f"{table} AS {ROW_ALIAS}"
    names = ", ".join(_quote(connection, c) for c in columns)
    holders = ", ".join(_placeholder(connection, c) for c in columns)
    params = [_prep(model, connection, c, _insert_value(model, c, values.get(c))) for c in columns]
    return f"INSERT INTO {table} ({names}) VALUES ({holders})", params


def _precedence_sql(old_status: str, old_retries: str, new_status: str, retries: int | None) -> str:
    """SQL that is true when a write of ``new_status`` from attempt ``retries`` wins.

    ``old_status``/``old_retries`` are the SQL references to the stored values.

    * SUCCESS is final: nothing replaces it.
    * A write from an older attempt never wins.
    * A final state wins over anything (but SUCCESS) from the same or an older attempt.
    * A non-final state wins only over a non-final state of the same attempt,
      or over anything from an older attempt.
    """
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
) -> str:
    """The ``SET`` part of a state write; a pure function of its arguments, so cached.

    The incoming values are read back from the INSERT part (``EXCLUDED``/``VALUES()``),
    so the statement carries each value once, and only ``columns`` (what the
    writer knows, plus the state columns) appear at all.
    """

    def old(column: str) -> str:
        return _stored(vendor, column)

    wins = _precedence_sql(old("status"), old("retries"), SUCCESS if final else "PENDING", retries)
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
    model, connection, values: Mapping[str, Any], *, retries: int | None, replace_call: bool
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


def _build_insert_or_fill(model, connection, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
    columns = ["task_id", *PUBLISH_FILL_COLUMNS, "status", "retries", "date_modified"]
    insert_sql, params = _insert_clause(model, connection, columns, values)
    return f"{insert_sql} {_on_conflict(connection)} {_fill_update_sql(connection.vendor)}", params


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
