"""The backend's writes: one statement each, state precedence, metadata kept.

These drive ``backend.store_result`` the way a worker does (with the worker's
request Context), in the orders that races produce, against the real database.
"""

from __future__ import annotations

import uuid

import pytest
from celery import states
from celery.app.task import Context
from django.test.utils import CaptureQueriesContext

from django_celery_fulldbresult.models import TaskResultMeta

pytestmark = pytest.mark.django_db(transaction=True)

NAME = "testproject.demo.tasks.add"


def request(task_id: str, retries: int = 0, **extra) -> Context:
    return Context(
        id=task_id,
        task=NAME,
        args=[1, 2],
        kwargs={"k": "v"},
        hostname="w1@host",
        delivery_info={"exchange": "", "routing_key": "celery", "priority": 3},
        retries=retries,
        root_id=task_id,
        parent_id=None,
        **extra,
    )


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


def test_every_state_write_is_one_statement(celery_app, task_db):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    counts = []
    for state, result, retries in [
        (states.PENDING, None, 0),
        (states.STARTED, {"pid": 1}, 0),
        (states.RETRY, RuntimeError("again"), 0),
        (states.STARTED, {"pid": 1}, 1),
        (states.SUCCESS, 3, 1),
    ]:
        with CaptureQueriesContext(task_db) as queries:
            backend.store_result(task_id, result, state, request=request(task_id, retries))
        counts.append(len(queries))
    assert counts == [1, 1, 1, 1, 1]
    assert row(task_id).status == states.SUCCESS


def test_update_state_without_request_is_one_statement_and_keeps_metadata(celery_app, task_db):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED, request=request(task_id))
    with CaptureQueriesContext(task_db) as queries:
        backend.store_result(task_id, {"done": 5}, "PROGRESS")
    assert len(queries) == 1
    stored = row(task_id)
    assert stored.status == "PROGRESS"
    assert stored.task == NAME
    assert stored.args == [1, 2] and stored.kwargs == {"k": "v"}
    assert stored.hostname == "w1@host"
    assert stored.routing_key == "celery" and stored.priority == 3
    assert celery_app.AsyncResult(task_id).info == {"done": 5}


def test_success_is_never_overwritten_by_late_started_or_retry(celery_app):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 42, states.SUCCESS, request=request(task_id))
    for late in (states.STARTED, states.RETRY, states.PENDING, states.RECEIVED, "PROGRESS"):
        backend.store_result(task_id, {"late": late}, late, request=request(task_id))
    backend.store_result(task_id, ValueError("late"), states.FAILURE, request=request(task_id))
    stored = row(task_id)
    assert stored.status == states.SUCCESS
    assert celery_app.AsyncResult(task_id).get(timeout=1) == 42
    assert stored.date_done is not None


def test_nonfinal_never_overwrites_final_of_same_attempt(celery_app):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.mark_as_failure(task_id, ValueError("x"), request=request(task_id))
    backend.store_result(task_id, {"pid": 1}, states.STARTED, request=request(task_id))
    backend.store_result(task_id, None, states.RETRY, request=request(task_id))
    assert row(task_id).status == states.FAILURE
    backend.mark_as_revoked(task_id, "terminated", request=request(task_id))
    assert row(task_id).status == states.REVOKED  # final over final (not SUCCESS) is allowed


def test_retry_of_same_id_late_retry_write_loses_to_next_attempt(celery_app):
    """Attempt 0 writes RETRY after attempt 1 already started or finished."""
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"pid": 1}, states.STARTED, request=request(task_id, retries=0))
    backend.store_result(task_id, {"pid": 2}, states.STARTED, request=request(task_id, retries=1))
    backend.store_result(task_id, RuntimeError("x"), states.RETRY, request=request(task_id, 0))
    stored = row(task_id)
    assert (stored.status, stored.retries) == (states.STARTED, 1)
    backend.store_result(task_id, 7, states.SUCCESS, request=request(task_id, retries=1))
    backend.store_result(task_id, RuntimeError("x"), states.RETRY, request=request(task_id, 0))
    stored = row(task_id)
    assert (stored.status, stored.retries) == (states.SUCCESS, 1)


def test_later_attempt_replaces_failure_of_an_earlier_one(celery_app):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.mark_as_failure(task_id, ValueError("x"), request=request(task_id, retries=0))
    backend.store_result(task_id, {"pid": 1}, states.STARTED, request=request(task_id, retries=1))
    stored = row(task_id)
    assert (stored.status, stored.retries, stored.date_done) == (states.STARTED, 1, None)


def test_metadata_first_writer_wins_and_is_never_wiped(celery_app):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED, request=request(task_id))
    other = request(task_id)
    other.args, other.kwargs, other.task = None, None, None
    backend.store_result(task_id, 1, states.SUCCESS, request=other)
    stored = row(task_id)
    assert (stored.task, stored.args, stored.kwargs) == (NAME, [1, 2], {"k": "v"})
    assert stored.date_started is not None and stored.date_done is not None


def test_update_state_for_another_task_does_not_copy_the_current_request(celery_app):
    backend = celery_app.backend
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(other, {"x": 1}, "PROGRESS", request=request(mine))
    stored = row(other)
    assert stored.task == "" and stored.args is None and stored.hostname is None


def test_retry_state_keeps_the_call_for_replay(celery_app):
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    req = request(task_id, callbacks=[{"task": "x", "args": [], "kwargs": {}, "options": {}}])
    backend.store_result(task_id, RuntimeError("again"), states.RETRY, request=req)
    stored = row(task_id)
    assert stored.status == states.RETRY
    assert stored.get_call() == ([1, 2], {"k": "v"})
    assert stored.options["link"][0]["task"] == "x"


def test_writes_without_any_request_on_an_existing_row(celery_app):
    """No writer knows the name: it stays '' (NOT NULL) instead of failing the store."""
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    backend.store_result(task_id, {"step": 1}, "PROGRESS")
    backend.store_result(task_id, 5, states.SUCCESS)
    stored = row(task_id)
    assert (stored.status, stored.task) == (states.SUCCESS, "")
