"""Publish tracking: a PENDING row per published task, never in the way of publishing."""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
import uuid

import pytest
from celery import states
from celery.signals import before_task_publish
from django.db import connection, transaction

from django_celery_fulldbresult import publish, publish_writer, records
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import REPO, STACK, queue_name, requires_server_db, take_messages, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NOBODY = queue_name("nobody")  # no test worker consumes it: its tasks stay PENDING


def drain(app, queue: str = NOBODY) -> list:
    """The ids of every message left in ``queue`` (proves what was really sent)."""
    return [message.headers["id"] for message in take_messages(app, queue)]


def test_pending_row_holds_everything_needed_to_resend(celery_app):
    eta = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    result = tasks.add.apply_async(
        (2, 3),
        queue=NOBODY,
        priority=7,
        eta=eta,
        expires=eta + datetime.timedelta(days=1),
        headers={"tenant": "acme"},
        link=tasks.noop.si(),
        link_error=tasks.noop.si(),
        time_limit=30,
        soft_time_limit=20,
    )
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.status == states.PENDING
    assert row.task == "testproject.demo.tasks.add"
    assert (row.args, row.kwargs) == ([2, 3], {})
    assert (row.queue, row.routing_key, row.priority) == (NOBODY, NOBODY, 7)
    assert row.eta == eta and row.expires == eta + datetime.timedelta(days=1)
    assert row.date_submitted is not None and row.root_id == result.id
    assert row.options["headers"] == {"tenant": "acme"}
    assert row.options["link"][0]["task"] == "testproject.demo.tasks.noop"
    assert row.options["link_error"][0]["task"] == "testproject.demo.tasks.noop"
    assert (row.options["time_limit"], row.options["soft_time_limit"]) == (30, 20)
    assert row.replayable
    assert drain(celery_app) == [result.id]


def test_send_task_by_name_is_tracked(celery_app):
    result = celery_app.send_task("not.registered.here", args=[1], kwargs={"a": 2}, queue=NOBODY)
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert (row.task, row.args, row.kwargs, row.status) == (
        "not.registered.here",
        [1],
        {"a": 2},
        states.PENDING,
    )
    drain(celery_app)


def test_not_tracked_when_the_result_is_ignored(celery_app):
    ignored_task = tasks.fire_and_forget.apply_async(queue=NOBODY)
    per_call = tasks.add.apply_async((1, 1), queue=NOBODY, ignore_result=True)
    celery_app.conf.task_ignore_result = True
    try:
        by_conf = celery_app.send_task("not.registered.here", queue=NOBODY)
    finally:
        celery_app.conf.task_ignore_result = False
    ids = {ignored_task.id, per_call.id, by_conf.id}
    assert not TaskResultMeta.objects.filter(task_id__in=ids).exists()
    assert set(drain(celery_app)) == ids


def test_not_tracked_when_the_setting_is_off(settings, celery_app):
    settings.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False
    result = tasks.add.apply_async((1, 1), queue=NOBODY)
    assert not TaskResultMeta.objects.filter(task_id=result.id).exists()
    drain(celery_app)


def test_a_database_error_never_stops_the_publish(celery_app, caplog):
    table = TaskResultMeta._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        with caplog.at_level(logging.ERROR, logger="django_celery_fulldbresult"):
            result = tasks.add.apply_async((1, 1), queue=NOBODY)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    assert drain(celery_app) == [result.id]  # the task was really sent
    assert f"the task {result.id}" in caplog.text and "could not be written" in caplog.text


def test_worker_finishing_before_the_pending_row_keeps_its_state(worker, celery_app):
    """The publish record arrives after the worker stored SUCCESS: it only fills gaps."""
    captured = {}

    def capture(sender=None, body=None, exchange=None, routing_key=None, headers=None, **kw):
        captured["values"] = records.from_message(
            celery_app,
            sender,
            body,
            headers,
            kw.get("properties") or {},
            exchange,
            routing_key,
            kw.get("declare"),
        )

    before_task_publish.connect(capture, weak=False)
    try:
        with override_tracking(False):
            result = tasks.add.delay(20, 22)
            assert result.get(timeout=20) == 42
    finally:
        before_task_publish.disconnect(capture)
    assert TaskResultMeta.objects.get(task_id=result.id).date_submitted is None
    publish.record(captured["values"])  # the late PENDING write (written behind)
    assert publish.flush()
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.status == states.SUCCESS and row.get_result() == 42
    assert row.date_submitted is not None and row.date_done is not None


def override_tracking(enabled: bool):
    from django.test import override_settings

    return override_settings(DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH=enabled)


@requires_server_db
def test_publishing_inside_atomic_does_not_stall_the_worker(worker):
    """The worker stores its result while the caller's transaction is still open."""
    with transaction.atomic():
        # Hold locks of our own in the caller's transaction, as a request would.
        TaskResultMeta.objects.create(task_id=str(uuid.uuid4()), task="caller.own.row")
        result = tasks.add.delay(1, 2)
        started = time.monotonic()
        assert result.get(timeout=15) == 3
        assert time.monotonic() - started < 10
    assert TaskResultMeta.objects.get(task_id=result.id).status == states.SUCCESS


@requires_server_db
def test_rollback_keeps_the_record_of_a_task_that_was_sent(celery_app):
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.add.apply_async((1, 2), queue=NOBODY)
        raise RuntimeError("the caller rolls back")
    assert TaskResultMeta.objects.filter(task_id=result.id, status=states.PENDING).exists()
    assert drain(celery_app) == [result.id]


@pytest.mark.skipif(STACK != "sqlite", reason="SQLite-only behaviour")
def test_sqlite_publishing_inside_atomic_joins_the_callers_transaction(celery_app):
    """SQLite has one writer at a time: the row joins the caller's transaction instead of
    waiting for it (documented); the publish itself never blocks."""
    started = time.monotonic()
    with transaction.atomic():
        TaskResultMeta.objects.create(task_id=str(uuid.uuid4()), task="caller.own.row")
        result = tasks.add.apply_async((1, 2), queue=NOBODY)
        assert TaskResultMeta.objects.filter(task_id=result.id).exists()
    assert time.monotonic() - started < 5
    drain(celery_app)


# -- written behind (publish_writer) ------------------------------------------------------


def test_rows_are_written_behind_many_per_statement(written_behind, celery_app):
    """apply_async only queues its row; the writer thread writes the queue in batches."""
    before = publish_writer.writer.batches
    ids = [tasks.add.apply_async((i, i), queue=NOBODY).id for i in range(300)]
    wait_for(lambda: TaskResultMeta.objects.filter(task_id__in=ids).count() == 300, 30)
    assert publish.flush()
    batches = publish_writer.writer.batches - before
    assert 1 <= batches < 100, batches
    row = TaskResultMeta.objects.get(task_id=ids[7])
    assert row.status == states.PENDING and row.task == tasks.add.name
    assert row.get_call() == ([7, 7], {}) and row.queue == NOBODY
    assert sorted(drain(celery_app)) == sorted(ids)


def test_a_process_that_exits_right_after_publishing_leaves_every_row(celery_app, tmp_path):
    """The rows still queued when the process exits are written first (atexit)."""
    script = (
        "import django, sys; django.setup()\n"
        "from testproject.demo import tasks\n"
        f"ids = [tasks.add.apply_async((i, i), queue={NOBODY!r}).id for i in range(500)]\n"
        f"open({str(tmp_path / 'ids')!r}, 'w').write(' '.join(ids))\n"
        "sys.exit(0)\n"
    )
    env = {**os.environ, "FULLDB_TEST_DB": "1", "PYTHONPATH": str(REPO)}
    env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ids = (tmp_path / "ids").read_text().split()
    assert len(ids) == 500
    assert TaskResultMeta.objects.filter(task_id__in=ids, status=states.PENDING).count() == 500
    assert len(drain(celery_app)) == 500


@requires_server_db
def test_a_row_the_database_refuses_costs_only_that_row(written_behind, caplog):
    """A batch with one row the database refuses (a queue name too long for its column):
    the other rows of the batch are written, the refused one is logged with its task id."""
    good = [{"task_id": str(uuid.uuid4()), "task": "demo.good", "status": states.PENDING}]
    good.append({**good[0], "task_id": str(uuid.uuid4())})
    bad = {"task_id": str(uuid.uuid4()), "task": "demo.bad", "queue": "q" * 300}
    with caplog.at_level(logging.ERROR, logger="django_celery_fulldbresult"):
        for row in (good[0], {**bad, "status": states.PENDING}, good[1]):
            assert publish_writer.writer.submit(row)
        assert publish.flush()
    found = set(TaskResultMeta.objects.values_list("task_id", flat=True))
    assert {row["task_id"] for row in good} <= found and bad["task_id"] not in found
    assert f"the task {bad['task_id']} (demo.bad)" in caplog.text
    assert good[0]["task_id"] not in caplog.text
