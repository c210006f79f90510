"""The sender's SQL: claim due rows, then record what became of each (one statement each).

The conditions ("due, unclaimed, unexpired", "claimed by this token") are the task
QuerySet's (``managers.TaskResultQuerySet``); the PostgreSQL claim compiles the same
QuerySet into its single statement. Every function takes the database alias to run on:
the sender's own connection, never a caller's transaction. Each is one statement or one
short transaction of its own, safe to repeat: a deadlock victim is run again at once
(``db.retry_deadlocks``; MariaDB picks a sender's record when a worker's receipt updates a
row of its batch at the same moment).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from .. import db
from ..models import TaskResultMeta
from .rows import CLAIM_COLUMNS, JSON_CLAIM_COLUMNS, ClaimedRow, claimed_values, failed_columns

_EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)


def rows(using: str):
    return TaskResultMeta.objects.using(using)


@db.retry_deadlocks
def claim(using: str, token: uuid.UUID, batch_size: int) -> list[ClaimedRow]:
    """Atomically claim up to ``batch_size`` rows ready to send for ``token``; by eta.

    PostgreSQL: one ``WITH due AS MATERIALIZED (SELECT ... FOR UPDATE SKIP LOCKED)
    UPDATE ... RETURNING``. MySQL/MariaDB: ``SELECT ... FOR UPDATE SKIP LOCKED`` and an
    UPDATE in one short transaction (no ``UPDATE ... RETURNING`` there), then a read of what
    the token holds. SQLite: one UPDATE whose subquery picks the rows (write first), then
    the read. Due is decided by the database's clock.
    """
    connection = connections[using]
    if connection.vendor == "postgresql":
        return _claim_returning(using, token, batch_size)
    if connection.vendor == "sqlite":
        return _claim_write_first(using, token, batch_size)
    with transaction.atomic(using=using):
        ready = rows(using).ready_to_send().order_by("eta")
        if connection.features.has_select_for_update_skip_locked:
            ready = ready.select_for_update(skip_locked=True)
        ids = list(ready.values_list("id", flat=True)[:batch_size])
        if not ids:
            return []
        rows(using).filter(id__in=ids).scheduled().unclaimed().claim(token)
    # By primary key (the token alone has no index); the token keeps only what we won.
    return claimed_values(rows(using).filter(id__in=ids).claimed(token).order_by("eta"))


def _claim_write_first(using: str, token: uuid.UUID, batch_size: int) -> list[ClaimedRow]:
    """The SQLite claim: one UPDATE whose subquery picks the due rows.

    A deferred transaction that reads and then writes must upgrade its lock, and SQLite
    refuses the upgrade at once ("database is locked", no busy wait) while another
    connection writes: concurrent senders then kept failing while one sender took every
    batch. A single UPDATE asks for the write lock first and waits its turn.
    """
    due = rows(using).ready_to_send().order_by("eta").values("id")[:batch_size]
    if not rows(using).filter(id__in=due).claim(token):
        return []
    return claimed_values(rows(using).scheduled().claimed(token).order_by("eta"))


def _claim_returning(using: str, token: uuid.UUID, batch_size: int) -> list[ClaimedRow]:
    """The PostgreSQL claim: one statement, one round trip (see ``claim``)."""
    connection = connections[using]
    meta = TaskResultMeta._meta
    fields = [meta.get_field(name) for name in CLAIM_COLUMNS]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    # The rule is the QuerySet's: its WHERE clause (table-qualified), compiled here.
    where, params = db.compiled_where(rows(using).ready_to_send())
    # JSON columns come back as text, decoded row by row (see JSON_CLAIM_COLUMNS).
    returning = ", ".join(
        [f"claimed.{quote(field.column)}" for field in fields]
        + [f"claimed.{quote(name)}::text" for name in JSON_CLAIM_COLUMNS]
    )
    # MATERIALIZED, so that the LIMIT holds: an `id IN (SELECT ... LIMIT n FOR UPDATE SKIP
    # LOCKED)` subquery may be rescanned by the plan and claim more than n rows. The WHERE
    # matches the partial index fdr_scheduled_eta_idx (status = SCHEDULED).
    statement = f"""
        WITH due AS MATERIALIZED (
            SELECT id FROM {table}
            WHERE {where}
            ORDER BY eta
            LIMIT %s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE {table} AS claimed
        SET scheduled_id = %s, date_claimed = STATEMENT_TIMESTAMP()
        FROM due
        WHERE claimed.id = due.id AND claimed.scheduled_id IS NULL
        RETURNING {returning}
    """
    with connection.cursor() as cursor:
        cursor.execute(statement, [*params, batch_size, token])
        fetched = cursor.fetchall()
    names = [field.name for field in fields] + [f"{name}_json" for name in JSON_CLAIM_COLUMNS]
    claimed = [dict(zip(names, values, strict=True)) for values in fetched]
    claimed.sort(key=lambda row: row["eta"] or _EPOCH)
    return claimed  # type: ignore[return-value]


@db.retry_deadlocks
def claim_tasks(using: str, token: uuid.UUID, task_ids: list[str]) -> list[ClaimedRow]:
    """Claim these tasks for ``token`` when they wait unclaimed and unexpired (``send_now``:
    sent before their eta); what was claimed."""
    waiting = rows(using).filter(task_id__in=task_ids).scheduled().unclaimed()
    waiting.unexpired().claim(token)
    return claimed_values(rows(using).filter(task_id__in=task_ids).claimed(token))


@db.retry_deadlocks
def claim_expired(using: str, token: uuid.UUID) -> list[dict[str, Any]]:
    """Claim due rows whose ``expires`` passed (to revoke them); one UPDATE when none."""
    if not rows(using).expired_unsent().claim(token):
        return []
    return list(
        rows(using).scheduled().claimed(token).values("id", "task_id", "group_id", "options")
    )


@db.retry_deadlocks
def mark_sent(using: str, token: uuid.UUID, ids: list[int]) -> int:
    """Rows still SCHEDULED under our claim become SCHEDULED_SENT (a row the worker, a
    revoke or a cancel already moved on is left as it is)."""
    if not ids:
        return 0
    return rows(using).filter(id__in=ids).scheduled().claimed(token).mark_sent()


@db.retry_deadlocks
def release(using: str, token: uuid.UUID, ids: list[int] | None = None) -> int:
    """Give rows back to later passes: these ids, or every row ``token`` still holds."""
    held = rows(using).scheduled().claimed(token)
    if ids is not None:
        if not ids:
            return 0
        held = held.filter(id__in=ids)
    return held.release()


@db.retry_deadlocks
def release_except(using: str, token: uuid.UUID, kept: list[int]) -> int:
    """Give back every row ``token`` holds but ``kept`` (the ledger's settling)."""
    return rows(using).scheduled().claimed(token).exclude(id__in=kept).release()


@db.retry_deadlocks
def fail(using: str, token: uuid.UUID, row_id: int, error: BaseException) -> int:
    """A claimed row that cannot be forwarded becomes FAILURE, with the reason."""
    return rows(using).filter(id=row_id).scheduled().claimed(token).update(**failed_columns(error))


@db.retry_deadlocks
def renew(using: str, tokens: list[uuid.UUID]) -> int:
    """The lease of every row these tokens still hold starts again (a live sender)."""
    if not tokens:
        return 0
    return rows(using).scheduled().filter(scheduled_id__in=tokens).renew()


@db.retry_deadlocks
def reclaim(using: str, lease: timedelta) -> tuple[int, list[str]]:
    """Give back the claims of senders gone for ``lease`` (they stopped renewing them): how
    many, and up to 20 of their task ids (for the log). The rows become ready to send again:
    some may have reached the broker before their sender died, and the worker's receipt
    claim (``receipt``) runs such an attempt once."""
    sample = list(rows(using).lease_expired(lease).values_list("task_id", flat=True)[:20])
    if not sample:
        return 0, []
    # One UPDATE, on rows still past the lease: a sender renewing meanwhile keeps its rows.
    return rows(using).lease_expired(lease).release(), sample


def seconds_until_next(using: str, cap: float = 1.0) -> float:
    """How long a sender may sleep: until the next eta, at most ``cap`` seconds."""
    next_eta = (
        rows(using).scheduled().unclaimed().order_by("eta").values_list("eta", flat=True).first()
    )
    if next_eta is None:
        return cap
    now = timezone.now()
    if timezone.is_naive(next_eta) and timezone.is_aware(now):
        now = timezone.make_naive(now)
    return max(0.0, min(cap, (next_eta - now).total_seconds()))
