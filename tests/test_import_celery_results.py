"""import_celery_results: django-celery-results' rows into the task table (issue 14).

The rows are written by django-celery-results itself: by a real worker whose result backend
is ``django-db``, and in-process by its ``DatabaseBackend`` (many rows, pickle, groups).
"""

from __future__ import annotations

import io
import sys
import uuid
from datetime import timedelta
from functools import partial

import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.result import AsyncResult, GroupResult
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from django_celery_results.backends import DatabaseBackend
from django_celery_results.models import GroupResult as SourceGroup
from django_celery_results.models import TaskResult as SourceTask
from kombu.exceptions import ContentDisallowed

from django_celery_fulldbresult import celery_results_import, db, secrecy
from django_celery_fulldbresult.models import GroupResultMeta, StatsHour, TaskResultMeta
from django_celery_fulldbresult.result_backends import DatabaseResultBackend
from testproject.demo import tasks

from .conftest import queue_name, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ADD = "testproject.demo.tasks.add"


@pytest.fixture(autouse=True)
def _no_publish_tracking(settings):
    """As before the switch: django-celery-results is the backend, publish tracking off."""
    settings.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False


def source_backend(serializer: str = "json") -> DatabaseBackend:
    """django-celery-results' backend, as a project with ``result_extended`` configures it."""
    app = Celery("django-celery-results-writer", set_as_current=False)
    app.conf.update(
        result_extended=True,
        result_serializer=serializer,
        accept_content=["json", serializer],
        result_accept_content=["json", serializer],
    )
    return DatabaseBackend(app=app)


def store(backend, state=states.SUCCESS, result=3, name=ADD, argsrepr="(1, 2)", **extra):
    task_id = str(uuid.uuid4())
    request = Context(
        id=task_id,
        task=name,
        argsrepr=argsrepr,
        kwargsrepr="{'z': 1}",
        hostname="old-worker@host",
        **extra,
    )
    traceback = (
        "Traceback (most recent call last):\nValueError: boom" if state == "FAILURE" else None
    )
    backend.store_result(task_id, result, state, traceback=traceback, request=request)
    return task_id


def run(*args: str, **options) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("import_celery_results", *args, stdout=out, stderr=err, **options)
    return out.getvalue() + err.getvalue()


def ours(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


@pytest.mark.slow  # a worker subprocess
def test_rows_a_real_worker_wrote(worker_processes, celery_app, admin_client):
    """A worker with django-celery-results' backend runs tasks; once imported, our backend
    answers for them: state, result, exception and traceback, name, worker, times, reprs,
    periodic task name, and why they cannot be retried."""
    queue = queue_name("dcr-import")
    worker_processes.start("dcr", pool="solo", concurrency=1, queues=queue,
                           env={"FULLDB_BACKEND": "django-db"})  # fmt: skip
    sent = {
        "add": tasks.add.apply_async((2, 3), queue=queue),
        "echo": tasks.echo.apply_async(
            ("text",), {"n": 1}, queue=queue, headers={"periodic_task_name": "nightly echo"}
        ),
        "fail": tasks.fail.apply_async(("kaput",), queue=queue),
        "secret": tasks.charge_card.apply_async(("4111 1111 1111 1111", 10), queue=queue),
    }
    ids = [result.id for result in sent.values()]
    wait_for(
        lambda: (
            SourceTask.objects.filter(task_id__in=ids, status__in=states.READY_STATES).count()
            == len(ids)
        ),
        60,
    )
    assert not TaskResultMeta.objects.filter(task_id__in=ids).exists()

    output = run("--batch-size", "3")
    assert "Imported 4 of 4 task rows read" in output

    backend = DatabaseResultBackend(app=celery_app)
    added = AsyncResult(sent["add"].id, app=celery_app, backend=backend)
    assert added.state == states.SUCCESS
    assert added.get(timeout=1) == 5
    assert added.name == ADD
    assert added.worker.startswith("dcr@")
    assert added.date_done is not None
    failed = AsyncResult(sent["fail"].id, app=celery_app, backend=backend)
    assert failed.state == states.FAILURE
    assert isinstance(failed.result, ValueError)
    assert str(failed.result) == "kaput"
    assert "ValueError: kaput" in failed.traceback

    echo = ours(sent["echo"].id)
    assert (echo.argsrepr, echo.kwargsrepr) == ("('text',)", "{'n': 1}")
    assert echo.periodic_task_name == "nightly echo"
    assert echo.get_result() == {"args": ["text"], "kwargs": {"n": 1}}
    assert echo.args is None and echo.kwargs is None and echo.packed_args is None
    assert not echo.replayable
    assert echo.date_submitted is not None and echo.date_started is not None
    assert (
        echo.meta["django_celery_results"]["id"] == SourceTask.objects.get(task_id=echo.task_id).pk
    )

    secret = ours(sent["secret"].id)
    assert "4111" not in (secret.argsrepr or "") + (secret.kwargsrepr or "")
    assert secret.status == states.SUCCESS

    page = admin_client.get(
        reverse("admin:django_celery_fulldbresult_taskresultmeta_change", args=[echo.pk])
    )
    assert page.status_code == 200
    html = page.content.decode()
    assert "imported from django-celery-results" in html
    assert "nightly echo" in html


def test_idempotent_and_never_overwrites_ours(celery_app):
    backend = source_backend()
    ids = [store(backend, result=i) for i in range(7)]
    ids.append(store(backend, state=states.FAILURE, result=ValueError("boom")))
    # A task already in our table (ours is newer or the same): left as it is.
    DatabaseResultBackend(app=celery_app).store_result(ids[0], 42, states.SUCCESS)
    before = ours(ids[0])

    first = run("--batch-size", "3")
    assert "Imported 7 of 8 task rows read (1 already in the task table" in first
    snapshot = {row.task_id: row for row in TaskResultMeta.objects.all()}
    assert len(snapshot) == 8
    after = ours(ids[0])
    assert (after.result, after.meta, after.date_done) == (
        before.result,
        before.meta,
        before.date_done,
    )

    second = run("--batch-size", "3", "--from-start")
    assert "Imported 0 of 8 task rows read (8 already in the task table" in second
    third = run("--batch-size", "3")  # continues after the last id: nothing left to read
    assert "Imported 0 of 0 task rows read" in third
    assert TaskResultMeta.objects.count() == 8
    for row in TaskResultMeta.objects.all():
        old = snapshot[row.task_id]
        assert (row.pk, row.status, row.result, row.date_done, row.meta) == (
            old.pk,
            old.status,
            old.result,
            old.date_done,
            old.meta,
        )


def test_a_row_our_backend_writes_while_a_batch_is_converted_is_kept(celery_app):
    """The switch-over's second import runs while workers store through our backend: a task
    id absent when the batch looked may be there when the batch is written. The insert
    skips it (never an error, never an overwrite) and writes the rest."""
    backend = source_backend()
    ids = [store(backend, result=i) for i in range(3)]
    app = celery_app
    converter = celery_results_import.Converter(app, celery_results_import.result_accept(app))
    converted = [converter.task(row)[0] for row in SourceTask.objects.filter(task_id__in=ids)]
    DatabaseResultBackend(app=celery_app).store_result(ids[1], 42, states.SUCCESS)  # meanwhile
    before = ours(ids[1])

    db.run_with_reconnect(partial(db.insert_all_absent, TaskResultMeta, converted))

    assert TaskResultMeta.objects.filter(task_id__in=ids).count() == 3
    after = ours(ids[1])
    assert (after.pk, after.result, after.meta, after.replayable) == (
        before.pk,
        before.result,
        before.meta,
        before.replayable,
    )
    assert ours(ids[0]).options == {secrecy.IMPORTED_KEY: "django-celery-results"}


def test_an_interrupted_import_continues_where_it_stopped():
    backend = source_backend()
    ids = [store(backend, result=i) for i in range(45)]
    keys = list(SourceTask.objects.order_by("pk").values_list("pk", flat=True))

    first = run("--batch-size", "4", "--limit", "10")
    assert "Imported 10 of 10 task rows read" in first
    assert f"last id {keys[9]}" in first
    assert "Stopped after --limit 10 rows" in first
    assert TaskResultMeta.objects.count() == 10
    assert not GroupResultMeta.objects.exists()

    second = run()  # one batch: statements of 20 rows, then the rest
    assert f"continuing after id {keys[9]}" in second
    assert "35 task rows to read" in second
    assert "Imported 35 of 35 task rows read (0 already" in second
    assert sorted(TaskResultMeta.objects.values_list("task_id", flat=True)) == sorted(ids)
    assert celery_results_import.resume_point(SourceTask.objects.all(), "default") == keys[-1]
    assert {row.get_result() for row in TaskResultMeta.objects.all()} == set(range(45))


def test_resume_point_with_a_task_that_was_already_ours(celery_app):
    """A task id ours before the import counts as not imported: the search stops at or
    before it, and the rows after it are read again and skipped, never lost."""
    backend = source_backend()
    ids = [store(backend, result=i) for i in range(9)]
    DatabaseResultBackend(app=celery_app).store_result(ids[4], 1, states.SUCCESS)
    run("--limit", "7", "--batch-size", "2")
    second = run()
    assert "Imported 2 of" in second
    assert TaskResultMeta.objects.count() == 9


def test_dry_run_writes_nothing():
    backend = source_backend()
    for i in range(5):
        store(backend, result=i)
    output = run("--dry-run")
    assert "Would import 5 of 5 task rows read" in output
    assert not TaskResultMeta.objects.exists()


def test_imported_history_is_counted_by_stats():
    """stats() has sealed the day's past hours (nothing in them) before the import brings
    rows done 3 hours ago: they are counted (the import forgets the rollups)."""
    assert TaskResultMeta.objects.stats()["total"] == 0
    assert StatsHour.objects.exists()
    backend = source_backend()
    ids = [store(backend, result=i) for i in range(3)]
    SourceTask.objects.filter(task_id__in=ids).update(date_done=timezone.now() - timedelta(hours=3))
    assert "Imported 3 of 3" in run()
    assert TaskResultMeta.objects.stats()["states"] == {states.SUCCESS: 3}


def test_since_and_unfinished_states():
    backend = source_backend()
    started = store(backend, state=states.STARTED, result=None)
    done = store(backend)
    SourceTask.objects.filter(task_id=done).update(date_done="2020-01-01T00:00:00Z")
    output = run("--since", "2024-01-01")
    assert "Imported 1 of 1" in output
    row = ours(started)
    assert row.status == states.STARTED
    assert row.date_done is None and row.date_modified is not None


def test_pickle_is_never_decoded_unless_accepted(celery_app):
    """Rows django-celery-results wrote with the pickle serializer: the app accepts JSON
    only, so nothing is unpickled; the result stays as stored (refused when read), the
    reprs are kept as text in meta and say so."""
    backend = source_backend("pickle")
    task_id = store(backend, result={"when": "now"})
    output = run()
    assert "1 rows hold reprs or meta stored with a serializer the app does not accept" in output
    row = ours(task_id)
    assert row.content_type == "application/x-python-serialize"
    assert row.argsrepr.startswith("<not decoded: stored as application/x-python-serialize")
    source = SourceTask.objects.get(task_id=task_id)
    kept = row.meta["django_celery_results"]
    assert kept["undecoded"]["task_args"] == source.task_args
    assert row.result == source.result
    with pytest.raises(ContentDisallowed):
        row.get_result()

    # Once the app accepts pickle, the stored value decodes, and a new import decodes reprs.
    assert row.get_result(accept=["pickle"]) == {"when": "now"}
    TaskResultMeta.objects.all().delete()
    previous = celery_app.conf.result_accept_content
    celery_app.conf.result_accept_content = ["json", "pickle"]
    try:
        run("--from-start")
    finally:
        celery_app.conf.result_accept_content = previous
    assert ours(task_id).argsrepr == "(1, 2)"
    assert "undecoded" not in ours(task_id).meta["django_celery_results"]


def test_secret_tasks_keep_no_arguments(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_TASKS = ["billing.*"]
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_RESULTS = False
    backend = source_backend()
    secret = store(
        backend,
        state=states.FAILURE,
        result=ValueError("card 4111 declined"),
        name="billing.charge",
        argsrepr="('4111 1111 1111 1111',)",
    )
    plain = store(backend, name="reports.build")
    run()
    row = ours(secret)
    assert (row.argsrepr, row.kwargsrepr) == ("<arguments hidden>", "<arguments hidden>")
    assert row.traceback is None
    assert "4111" not in (row.result or "")
    assert row.get_result()["exc_type"] == "ValueError"
    assert secrecy.refusal(row) == secrecy.REFUSALS["secret"]
    assert ours(plain).argsrepr == "(1, 2)"
    assert secrecy.refusal(ours(plain)) == secrecy.REFUSALS["imported"]


def test_groups_and_their_members(celery_app):
    backend = source_backend()
    members = [store(backend, result=i) for i in range(3)]
    group_id = str(uuid.uuid4())
    backend.save_group(
        group_id,
        GroupResult(group_id, [AsyncResult(m, app=backend.app) for m in members], app=backend.app),
    )
    output = run("--batch-size", "2")
    assert "Imported 1 of 1 groups" in output
    assert "3 imported tasks got their group id" in output
    assert set(
        TaskResultMeta.objects.filter(group_id=group_id).values_list("task_id", flat=True)
    ) == set(members)
    restored = DatabaseResultBackend(app=celery_app).restore_group(group_id)
    assert [r.id for r in restored.results] == members
    assert restored.join(timeout=5) == [0, 1, 2]
    assert "Imported 0 of 1 groups (1 already there); 0 imported" in run("--from-start")
    assert SourceGroup.objects.count() == GroupResultMeta.objects.count() == 1


def test_errors_say_what_to_do(settings, monkeypatch):
    with pytest.raises(CommandError, match="'nowhere' is not an alias of DATABASES"):
        run("--source-database", "nowhere")
    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        run("--batch-size", "0")
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "django_celery_results"]
    with pytest.raises(CommandError, match="not in INSTALLED_APPS"):
        run()
    monkeypatch.setitem(sys.modules, "django_celery_results", None)
    with pytest.raises(CommandError, match="pip install django-celery-results"):
        run()


def test_missing_tables_are_named(monkeypatch):
    monkeypatch.setattr(SourceTask._meta, "db_table", "no_such_table_here")
    with pytest.raises(CommandError, match="has no table no_such_table_here"):
        run()
