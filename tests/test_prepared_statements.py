"""The package's own PostgreSQL connection sends its repeated statements prepared: a state
write is parsed and planned once per session, then carries only its parameters
(``db.statement_cursor``). A project decides otherwise with ``PREPARED_STATEMENTS = False`` or a
``prepare_threshold`` of its own in ``OPTIONS`` (``None`` for PgBouncer in transaction mode);
Django's query logging still sees each statement's text.

Through the backend a worker uses, on the real database (every worker test of the PostgreSQL
suite also writes this way).
"""

from __future__ import annotations

import uuid

import pytest
from celery import states
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_celery_fulldbresult import db
from django_celery_fulldbresult.models import TaskResultMeta

from .conftest import requires_postgresql
from .test_backend_writes import request

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgresql]


def run_tasks(backend, count: int) -> list[str]:
    """What a worker writes for ``count`` tasks: STARTED, then SUCCESS."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for task_id in ids:
        attempt = request(task_id)
        backend.store_result(task_id, {"pid": 1}, states.STARTED, request=attempt)
        backend.store_result(task_id, 3, states.SUCCESS, request=attempt)
    return ids


def prepared_executions() -> dict[str, int]:
    """The own session's prepared statements: their text -> times executed."""
    with connections[db.write_alias()].cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements")
        return dict(cursor.fetchall())


@pytest.fixture
def fresh_session():
    """Each test starts with a new session of the package's own connection."""
    db.close_quietly(db.write_alias())
    yield
    db.close_quietly(db.write_alias())


@pytest.mark.usefixtures("fresh_session")
def test_state_writes_are_prepared_once_per_session(celery_app):
    ids = run_tasks(celery_app.backend, 10)
    executions = prepared_executions()
    writes = {text: runs for text, runs in executions.items() if text.startswith("INSERT INTO")}
    assert writes, executions
    # Each shape is sent as text the first time (PREPARE_THRESHOLD), prepared from then on.
    assert sum(writes.values()) >= 20 - 2 * db.PREPARE_THRESHOLD
    rows = TaskResultMeta.objects.filter(task_id__in=ids)
    assert [(row.status, row.args, row.task) for row in rows] == [
        (states.SUCCESS, [1, 2], "testproject.demo.tasks.add")
    ] * len(ids)
    assert {celery_app.AsyncResult(task_id).get(timeout=5) for task_id in ids} == {3}


@pytest.mark.usefixtures("fresh_session")
def test_prepared_statements_off_sends_text(celery_app, settings):
    settings.DJANGO_CELERY_FULLDBRESULT_PREPARED_STATEMENTS = False
    ids = run_tasks(celery_app.backend, 5)
    assert prepared_executions() == {}
    assert TaskResultMeta.objects.filter(task_id__in=ids, status=states.SUCCESS).count() == 5


@pytest.mark.usefixtures("fresh_session")
def test_a_projects_own_prepare_threshold_decides(celery_app):
    """``OPTIONS = {"prepare_threshold": None}`` (psycopg's advice for PgBouncer in
    transaction mode) leaves the package's statements unprepared too."""
    options = connections[db.write_alias()].settings_dict.setdefault("OPTIONS", {})
    options["prepare_threshold"] = None
    try:
        ids = run_tasks(celery_app.backend, 5)
        assert prepared_executions() == {}
    finally:
        del options["prepare_threshold"]
    assert TaskResultMeta.objects.filter(task_id__in=ids, status=states.SUCCESS).count() == 5


@pytest.mark.usefixtures("fresh_session")
def test_query_logging_sees_each_statements_text(celery_app):
    """A prepared execution leaves the driver no text for Django's log to read back: where
    Django logs queries (DEBUG, CaptureQueriesContext), the statement goes as text."""
    run_tasks(celery_app.backend, 5)  # every shape prepared in this session
    assert prepared_executions()
    with CaptureQueriesContext(connections[db.write_alias()]) as captured:
        run_tasks(celery_app.backend, 1)  # the same shapes, prepared
    assert len(captured) == 2
    assert all(query["sql"].startswith("INSERT INTO") for query in captured.captured_queries)
