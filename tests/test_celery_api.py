"""Celery's backend API on this backend, Celery 5.7's rules included: ``exists()``,
``result_failure_expires``, ``result_compression``, the first SUCCESS kept, a revoke never
ending a task another worker runs, hooks called by position or by keyword, and which
database errors are retried."""

from __future__ import annotations

import datetime
import threading
import time
import uuid

import celery
import pytest
from celery import states
from celery.app.task import Context
from celery.exceptions import ImproperlyConfigured
from django.db import OperationalError, connections, transaction
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, db
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.result_backends import DatabaseResultBackend
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import queue_name, requires_server_db, take_messages, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NOBODY = queue_name("api-nobody")  # no worker consumes it: its tasks stay PENDING
CELERY_57 = tuple(int(part) for part in celery.__version__.split(".")[:2]) >= (5, 7)


def state_of(task_id: str) -> str:
    return TaskResultMeta.objects.get(task_id=task_id).status


def test_exists_answers_from_the_row_in_one_statement_without_decoding(celery_app, task_db):
    backend = celery_app.backend
    pending = tasks.add.apply_async((1, 1), queue=NOBODY)  # publish tracking: a PENDING row
    take_messages(celery_app, NOBODY)
    scheduled = str(uuid.uuid4())
    TaskResultMeta.objects.create(task_id=scheduled, status=SCHEDULED)
    # A result nobody may decode here (pickle, which the app does not accept).
    undecodable = str(uuid.uuid4())
    TaskResultMeta.objects.create(
        task_id=undecodable,
        status=states.SUCCESS,
        result="gASVBQAAAAAAAACMAXiULg==",
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    with CaptureQueriesContext(task_db) as queries:
        assert backend.task_result_exists(pending.id)
    assert len(queries) == 1
    assert backend.task_result_exists(scheduled)
    assert backend.task_result_exists(undecodable)
    assert not backend.task_result_exists(str(uuid.uuid4()))
    if CELERY_57:
        assert pending.exists() and not celery_app.AsyncResult(str(uuid.uuid4())).exists()


def _finished_row(state: str, age: datetime.timedelta) -> str:
    task_id = str(uuid.uuid4())
    TaskResultMeta.objects.create(
        task_id=task_id, status=state, date_done=timezone.now() - age, result="null"
    )
    return task_id


@pytest.mark.parametrize("failure_expires", [3600, 0])
def test_failures_expire_after_their_own_period(celery_app, failure_expires):
    """``result_failure_expires``: 1 hour keeps a 10 s old FAILURE that ``result_expires``
    (1 s) would delete; 0 keeps failures for ever."""
    celery_app.conf.result_failure_expires = failure_expires
    try:
        backend = DatabaseResultBackend(app=celery_app, expires=1)
    finally:
        celery_app.conf.result_failure_expires = None
    old = datetime.timedelta(seconds=10)
    success, revoked = _finished_row(states.SUCCESS, old), _finished_row(states.REVOKED, old)
    failure = _finished_row(states.FAILURE, old)
    backend.cleanup()
    assert TaskResultMeta.objects.filter(task_id=failure).exists()
    assert not TaskResultMeta.objects.filter(task_id__in=[success, revoked]).exists()


def test_failures_expire_with_the_results_by_default(celery_app):
    backend = DatabaseResultBackend(app=celery_app, expires=1)
    failure = _finished_row(states.FAILURE, datetime.timedelta(seconds=10))
    backend.cleanup()
    assert not TaskResultMeta.objects.filter(task_id=failure).exists()


@pytest.mark.skipif(not CELERY_57, reason="Celery applies result_compression from 5.7 on")
def test_result_compression_is_refused_with_a_clear_error(celery_app, recwarn):
    celery_app.conf.result_compression = "zlib"
    try:
        with pytest.raises(ImproperlyConfigured, match="result_compression='zlib'"):
            DatabaseResultBackend(app=celery_app)
    finally:
        celery_app.conf.result_compression = None
    assert not [w for w in recwarn if "compress" in str(w.message)]


@pytest.mark.usefixtures("worker")
def test_the_first_success_is_kept(celery_app):
    first = tasks.record_run.delay("first")
    assert first.get(timeout=20) == "first"
    # The same task id runs again (a redelivery that raced the ack) and returns otherwise.
    tasks.record_run.apply_async(("second",), task_id=first.id)
    wait_for(lambda: Run.objects.filter(task_id=first.id).count() == 2)
    time.sleep(1.0)  # its stores
    assert celery_app.AsyncResult(first.id).get(timeout=5) == "first"
    assert TaskResultMeta.objects.get(task_id=first.id).get_result() == "first"


@pytest.mark.usefixtures("worker")
def test_a_revoke_from_outside_never_ends_a_task_another_worker_runs(celery_app):
    """What a worker that does not run the task does on ``revoke`` (Celery 5.4-5.6 write it
    unconditionally; 5.7 checks the state first, which races): the running task stays
    STARTED and ends SUCCESS."""
    running = tasks.sleep.delay(2)
    wait_for(lambda: TaskResultMeta.objects.filter(task_id=running.id, status="STARTED"))
    celery_app.backend.mark_as_revoked(running.id, reason="revoked", store_result=True)
    assert state_of(running.id) == states.STARTED
    assert running.get(timeout=20) == 2


@pytest.mark.usefixtures("worker")
def test_a_revoke_from_outside_never_replaces_a_result(celery_app):
    failed = tasks.fail.delay("kept")
    with pytest.raises(ValueError):
        failed.get(timeout=20)
    celery_app.backend.mark_as_revoked(failed.id, reason="revoked", store_result=True)
    assert state_of(failed.id) == states.FAILURE


def test_a_revoke_ends_a_task_that_is_still_waiting(celery_app):
    waiting = tasks.add.apply_async((1, 1), queue=NOBODY)
    take_messages(celery_app, NOBODY)
    scheduled = str(uuid.uuid4())
    TaskResultMeta.objects.create(task_id=scheduled, status=SCHEDULED)
    unknown = str(uuid.uuid4())
    for task_id in (waiting.id, scheduled, unknown):
        celery_app.backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        assert state_of(task_id) == states.REVOKED


def test_the_worker_running_a_task_may_revoke_it(celery_app):
    """The worker that terminates its own task passes the request: that REVOKED wins."""
    task_id = str(uuid.uuid4())
    request = Context(id=task_id, task="testproject.demo.tasks.sleep", args=[9], retries=0)
    celery_app.backend.store_result(task_id, None, states.STARTED, request=request)
    celery_app.backend.mark_as_revoked(task_id, reason="terminated", request=request)
    assert state_of(task_id) == states.REVOKED


def test_hooks_accept_their_values_by_position_and_by_keyword(celery_app):
    """Celery 5.7.0 passes by position (``store_result``); other callers, and Celery's
    development branch, by keyword."""
    backend = celery_app.backend
    by_position, by_keyword = str(uuid.uuid4()), str(uuid.uuid4())
    request = Context(id=by_position, task="testproject.demo.tasks.add", args=[4, 5])
    backend._store_result(by_position, 9, states.SUCCESS, None, request)
    backend._store_result(
        task_id=by_keyword, result=9, state=states.SUCCESS, traceback=None, request=None
    )
    for task_id in (by_position, by_keyword):
        assert backend._get_task_meta_for(task_id)["result"] == 9
        assert backend._get_task_meta_for(task_id=task_id)["status"] == states.SUCCESS
    assert backend.get_task_meta(by_position, cache=False)["args"] == [4, 5]
    # A part of no chord: both call forms return quietly.
    plain = Context(id=by_keyword, group=None, chord=None)
    assert backend.on_chord_part_return(plain, states.SUCCESS, 9) is None
    assert backend.on_chord_part_return(request=plain, state=states.SUCCESS, result=9) is None


# -- which errors are retried ------------------------------------------------------------


def _terminate_own_session(using: str) -> None:
    """A statement after which the server ends this very session (a restart would)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        else:
            cursor.execute("KILL CONNECTION CONNECTION_ID()")
        cursor.execute("SELECT 1")


@requires_server_db
def test_a_lost_connection_is_retried_on_a_new_one_a_bounded_number_of_times():
    attempts = []

    def operation(using):
        attempts.append(using)
        _terminate_own_session(using)

    with pytest.raises(OperationalError) as info:
        db.run_with_reconnect(operation)
    assert db.is_connection_error(info.value)
    assert len(attempts) == 1 + db.RECONNECT_ATTEMPTS
    with connections[db.write_alias()].cursor() as cursor:  # the next statement reconnects
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.fixture
def short_lock_waits():
    """Every new connection waits at most 0.3 s (PostgreSQL) or 1 s (MySQL) for a row lock."""

    def configure(sender, connection, **_):
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SET lock_timeout = '300ms'")
            else:
                cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")

    connection_created.connect(configure, weak=False)
    db.close_quietly(db.write_alias())
    try:
        yield
    finally:
        connection_created.disconnect(configure)
        db.close_quietly(db.write_alias())


@requires_server_db
@pytest.mark.usefixtures("short_lock_waits")
def test_a_lock_timeout_reaches_the_caller_and_is_never_looped_on(celery_app):
    """With ``result_backend_always_retry`` and Celery's default of unlimited retries, a
    store waiting on a row another transaction holds fails once its lock timeout passes."""
    backend = DatabaseResultBackend(app=celery_app)
    backend.always_retry, backend.max_retries = True, float("inf")
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    outcome: dict[str, BaseException | None] = {}

    def store():
        try:
            backend.store_result(task_id, 1, states.SUCCESS)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc
        finally:
            db.close_quietly(db.write_alias())

    with transaction.atomic():
        TaskResultMeta.objects.select_for_update().get(task_id=task_id)
        writer = threading.Thread(target=store)
        writer.start()
        writer.join(10)
        alive = writer.is_alive()
    writer.join(30)
    assert not alive, "the store looped on the lock instead of failing"
    assert isinstance(outcome["error"], OperationalError)
    assert not backend.exception_safe_to_retry(outcome["error"])
    assert state_of(task_id) == states.STARTED
