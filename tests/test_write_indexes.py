"""The task table's indexes: what each write pays for, and that the queries still use them.

Every state a task goes through is a new row version, which adds an entry to every index
whose condition it meets. The indexes only some rows need are partial (migration 0009):
these tests keep the write path light and check, on a table of 200,000 old rows, that the
statements that read through the partial indexes still do (the 1M-row timings are in
bench/).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from django_celery_fulldbresult import SCHEDULED, db
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import claims

from .conftest import requires_postgresql

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgresql]

TABLE = TaskResultMeta._meta.db_table
#: The only indexes every row version enters: the rest are partial.
FULL_INDEXES = {
    f"{TABLE}_pkey",
    f"{TABLE}_task_id_key",  # the unique task id (no varchar_pattern_ops twin)
    "fdr_state_modified_idx",  # state filters of the admin, stale queries on MySQL
    "fdr_submitted_idx",  # the admin's "submitted" filter
    "fdr_task_idx",  # the admin's task-name filter and search
}


def indexes() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [TABLE])
        return dict(cursor.fetchall())


def test_only_the_indexes_every_row_needs_are_full():
    found = indexes()
    full = {name for name, definition in found.items() if " WHERE " not in definition}
    assert full == FULL_INDEXES, found
    assert not [d for d in found.values() if "varchar_pattern_ops" in d and "(task_id" in d]
    # So a typical task's three writes (PENDING, STARTED, SUCCESS) enter the five full
    # indexes each, fdr_unfinished_idx twice (unfinished) and fdr_done_idx once (final): 18.


def plan(sql: str, params) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def captured(alias: str, run) -> list[str]:
    with CaptureQueriesContext(connections[alias]) as queries:
        run()
    return [
        q["sql"]
        for q in queries
        if q["sql"].lstrip().upper().startswith(("DELETE", "WITH", "SELECT", "UPDATE"))
    ]


@pytest.fixture
def old_table():
    """200,000 SUCCESS rows done three days ago, 2,000 SCHEDULED rows due next month."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {TABLE}
              (task_id, task, status, replayable, retries, date_started, date_done, date_modified)
            SELECT 'old-' || g, 'demo.add', 'SUCCESS', true, 0, now() - interval '3 days',
                   now() - interval '3 days', now() - interval '3 days'
            FROM generate_series(1, 200000) AS g
            """
        )
        cursor.execute(
            f"""
            INSERT INTO {TABLE}
              (task_id, task, status, replayable, retries, eta, date_modified)
            SELECT 'later-' || g, 'demo.add', %s, true, 0,
                   now() + interval '30 days' + interval '1 minute' * g, now()
            FROM generate_series(1, 2000) AS g
            """,
            [SCHEDULED],
        )
        cursor.execute(f"ANALYZE {TABLE}")


def assert_reads_through(statements: list[str], index: str) -> None:
    assert statements
    for sql in statements:
        text = plan(sql, None)
        assert f"Seq Scan on {TABLE}" not in text, text
    assert any(index in plan(sql, None) for sql in statements), [plan(s, None) for s in statements]


def test_retention_reads_final_rows_through_the_done_index(old_table):
    alias = db.task_db_alias()
    statements = captured(
        alias, lambda: TaskResultMeta.objects.delete_expired(timedelta(days=30), using=alias)
    )
    assert_reads_through(
        [s for s in statements if s.lstrip().upper().startswith("DELETE")], "fdr_done_idx"
    )


def test_the_due_claim_reads_scheduled_rows_through_their_index(old_table):
    alias = db.task_db_alias()
    statements = captured(alias, lambda: claims.claim(alias, uuid.uuid4(), 500))
    assert TaskResultMeta.objects.filter(status=SCHEDULED, scheduled_id__isnull=False).count() == 0
    assert_reads_through(statements, "fdr_scheduled_eta_idx")


def test_the_copies_of_a_retried_task_are_found_through_their_index(old_table):
    sql, params = TaskResultMeta.objects.filter(retried_from="old-17").query.sql_with_params()
    text = plan(sql, params)
    assert f"Seq Scan on {TABLE}" not in text and "fdr_retried_from_idx" in text, text
