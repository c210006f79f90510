"""Django's Tasks framework on Celery (``django_tasks.CeleryBackend``): ``@task`` functions
enqueued from Django, run by a real Celery worker, read back from their row.

On Django 6.0+ through ``django.tasks``, on 4.2 / 5.2 through the django-tasks backport
(``compat.SOURCE`` says which one ran).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import uuid

import pytest
from celery import Celery, states
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, scheduler, stats
from django_celery_fulldbresult.models import TaskResultMeta

from .conftest import HELD, STACK, queue_name, take_messages, wait_for

compat = pytest.importorskip("django_celery_fulldbresult.django_tasks.compat")
from django_celery_fulldbresult.django_tasks import CeleryBackend, results, runner  # noqa: E402
from django_celery_fulldbresult.django_tasks.compat import (  # noqa: E402
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_backends,
    task_enqueued,
    task_finished,
    task_started,
)
from testproject.demo import jobs, tasks  # noqa: E402
from testproject.demo.models import Run  # noqa: E402

from .test_admin import act, changelist  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)
needs_options = pytest.mark.skipif(
    not jobs.TAKES_OPTIONS, reason="Django 6.0's @task takes no other keyword"
)


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


def finished(result, timeout: float = 20.0):
    def done():
        result.refresh()
        return result.is_finished

    wait_for(done, timeout)
    return result


@pytest.fixture
def signals():
    """Django's task signals, as a receiver sees them: (signal name, task result)."""
    received: list[tuple[str, object]] = []
    receivers = {}
    for name, signal in (
        ("enqueued", task_enqueued),
        ("started", task_started),
        ("finished", task_finished),
    ):
        # A copy: the enqueued result is the one the caller then refreshes.
        receivers[name] = lambda sender, task_result, _name=name, **kw: received.append(
            (_name, _snapshot(task_result))
        )
        signal.connect(receivers[name], weak=False)
    yield received
    for name, signal in (
        ("enqueued", task_enqueued),
        ("started", task_started),
        ("finished", task_finished),
    ):
        signal.disconnect(receivers[name])


def _snapshot(task_result):
    copy = dataclasses.replace(task_result)
    object.__setattr__(copy, "_return_value", task_result._return_value)
    object.__setattr__(copy, "status", task_result.status)
    return copy


def test_the_backend_is_django_tasks_own():
    backend = task_backends["default"]
    assert isinstance(backend, CeleryBackend)
    assert backend.supports_get_result and backend.supports_async_task
    assert compat.SOURCE in ("django.tasks", "django_tasks")


@pytest.mark.usefixtures("worker")
def test_enqueue_writes_the_row_then_the_worker_runs_it(celery_app):
    result = jobs.add.enqueue(2, 3)
    stored = row(result.id)  # written before enqueue returned
    assert stored.task == "testproject.demo.jobs.add"
    assert (stored.args, stored.kwargs) == ([2, 3], {})
    assert result.status == TaskResultStatus.READY
    assert result.enqueued_at == stored.date_submitted
    assert (result.args, result.kwargs) == ([2, 3], {})
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    fetched = jobs.add.get_result(result.id)
    assert fetched.return_value == 5 and fetched.args == [2, 3]
    assert fetched.enqueued_at == stored.date_submitted
    assert fetched.started_at is not None and fetched.finished_at >= fetched.started_at
    assert fetched.last_attempted_at == fetched.started_at
    assert fetched.worker_ids == [row(result.id).hostname] and fetched.attempts == 1
    assert fetched.task.func is jobs.add.func
    assert celery_app.AsyncResult(result.id).get(timeout=5) == 5  # Celery sees it too


@pytest.mark.usefixtures("worker")
def test_a_running_task_is_running_with_its_start_and_worker(celery_app):
    assert runner.celery_task(jobs.sleeps, celery_app).track_started  # whatever the app says
    result = jobs.sleeps.enqueue(1.5)
    wait_for(lambda: jobs.sleeps.get_result(result.id).status == TaskResultStatus.RUNNING)
    running = jobs.sleeps.get_result(result.id)
    assert running.started_at is not None and running.finished_at is None
    assert running.worker_ids == [row(result.id).hostname] and running.attempts == 1
    assert finished(result).return_value == 1.5


@pytest.mark.usefixtures("worker")
def test_a_failure_gives_the_exception_class_and_traceback():
    result = finished(jobs.fail.enqueue("boom"))
    assert result.status == TaskResultStatus.FAILED
    (error,) = result.errors
    assert error.exception_class_path == "builtins.ValueError"
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    assert row(result.id).status == states.FAILURE


@pytest.mark.usefixtures("worker")
def test_a_return_value_django_cannot_store_fails_the_task_clearly():
    result = finished(jobs.not_json.enqueue())
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "builtins.TypeError"


def test_arguments_are_checked_at_enqueue_and_nothing_is_sent():
    before = TaskResultMeta.objects.count()
    with pytest.raises(TypeError, match="add"):
        jobs.add.enqueue(1, 2, 3)
    with pytest.raises(TypeError):
        jobs.add.enqueue(1, object())  # not JSON
    assert TaskResultMeta.objects.count() == before


def test_unknown_ids_and_plain_celery_tasks_do_not_exist_for_django():
    with pytest.raises(TaskResultDoesNotExist):
        jobs.add.get_result(str(uuid.uuid4()))
    plain = tasks.add.apply_async((1, 1), queue=HELD, ignore_result=False)
    assert row(plain.id)  # a row, but no Django task's
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(plain.id)


@pytest.mark.usefixtures("worker")
def test_the_context_has_the_attempt_and_the_running_result():
    result = finished(jobs.with_context.enqueue("x"))
    assert result.return_value == {"attempt": 1, "id": result.id, "args": ["x"], "value": "x"}


@pytest.mark.usefixtures("worker")
def test_a_task_that_enqueues_another_keeps_its_record():
    """The parent's final write also stores its children: its workers stay in the row."""
    parent = finished(jobs.enqueues_another.enqueue(2, 2))
    child = finished(jobs.add.get_result(parent.return_value))
    assert child.return_value == 4
    assert parent.attempts == 1 and parent.worker_ids == child.worker_ids
    meta = row(parent.id).meta
    assert meta["workers"] == parent.worker_ids and meta["children"]  # both kept


@pytest.mark.usefixtures("worker")
def test_async_task_functions_run_on_the_worker():
    result = finished(jobs.async_add.enqueue(4, 5))
    assert result.return_value == 9


@pytest.mark.usefixtures("worker")
def test_async_enqueue_and_get_result():
    async def scenario():
        result = await jobs.add.aenqueue(1, 2)
        for _ in range(400):
            await result.arefresh()
            if result.is_finished:
                break
            await asyncio.sleep(0.05)
        again = await jobs.add.aget_result(result.id)
        return result, again

    result, again = asyncio.run(scenario())
    assert result.return_value == 3 and again.return_value == 3


@pytest.mark.usefixtures("worker")
def test_django_signals_carry_full_results(signals):
    result = finished(jobs.add.enqueue(20, 22))
    wait_for(lambda: any(name == "finished" for name, _ in signals))
    by_name = {name: task_result for name, task_result in signals if task_result.id == result.id}
    enqueued, started, done = by_name["enqueued"], by_name["started"], by_name["finished"]
    assert enqueued.status == TaskResultStatus.READY and enqueued.args == [20, 22]
    assert started.status == TaskResultStatus.RUNNING
    assert started.enqueued_at == result.enqueued_at and started.worker_ids == result.worker_ids
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 42
    assert done.finished_at is not None and done.attempts == 1


@pytest.mark.usefixtures("worker")
def test_a_failed_task_sends_finished_with_its_error(signals):
    result = finished(jobs.fail.enqueue("signalled"))
    wait_for(lambda: any(name == "finished" for name, _ in signals))
    done = next(r for name, r in signals if name == "finished" and r.id == result.id)
    assert done.status == TaskResultStatus.FAILED
    assert done.errors[0].exception_class_path == "builtins.ValueError"
    assert "signalled" in done.errors[0].traceback


def test_queue_names_map_onto_celery_queues(celery_app, settings):
    take_messages(celery_app, HELD)  # what an earlier test left there
    default = jobs.add.enqueue(1, 1)
    assert row(default.id).queue == settings.CELERY_TASK_DEFAULT_QUEUE
    held = jobs.add.using(queue_name=HELD).enqueue(1, 2)
    assert row(held.id).queue == HELD
    assert [m.headers["id"] for m in take_messages(celery_app, HELD)] == [held.id]
    assert task_backends["default"].get_result(held.id).task.queue_name == HELD
    with pytest.raises(InvalidTask):
        jobs.add.using(queue_name="nowhere")


def test_run_after_is_a_scheduled_row_never_a_broker_eta(scheduling_on, celery_app):
    due = timezone.now() + datetime.timedelta(hours=1)
    result = jobs.add.using(run_after=due, queue_name=HELD).enqueue(3, 4)
    stored = row(result.id)
    assert stored.status == SCHEDULED and stored.eta == due
    assert take_messages(celery_app, HELD) == []  # nothing reached the broker
    fetched = jobs.add.get_result(result.id)
    assert fetched.status == TaskResultStatus.READY and fetched.task.run_after == due


@pytest.mark.usefixtures("worker")
def test_a_due_run_after_is_forwarded_by_the_scheduler_and_runs(scheduling_on, celery_app):
    soon = timezone.now() + datetime.timedelta(seconds=0.5)
    result = jobs.add.using(run_after=soon).enqueue(5, 6)
    assert row(result.id).status == SCHEDULED
    wait_for(lambda: scheduler.forward_due(celery_app).sent or None, 10, interval=0.2)
    assert finished(result).return_value == 11


def test_run_after_without_the_database_scheduler_is_refused(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = False
    assert not task_backends["default"].supports_defer
    with pytest.raises(InvalidTask):
        jobs.add.using(run_after=timezone.now() + datetime.timedelta(hours=1))


def test_priority_maps_onto_the_brokers_own_range(celery_app):
    backend = task_backends["default"]
    if STACK == "maria-redis":  # Redis: 0 is served first, 9 last
        assert backend.supports_priority
        assert [backend.broker_priority(p) for p in (100, 0, -100)] == [0, 4, 9]
        urgent = jobs.add.using(priority=100, queue_name=HELD).enqueue(1, 1)
        (message,) = take_messages(celery_app, HELD)
        assert message.headers["id"] == urgent.id and message.properties["priority"] == 0
    else:  # the filesystem broker, RabbitMQ queues without a maximum priority
        assert not backend.supports_priority
        with pytest.raises(InvalidTask):
            jobs.add.using(priority=100)


def test_rabbitmq_priorities_with_a_queue_maximum(celery_app):
    backend = CeleryBackend("prio", {"OPTIONS": {"CELERY_APP": "testproject.celery_app.app"}})
    if backend.driver != "amqp":
        pytest.skip("RabbitMQ")
    celery_app.conf.task_queue_max_priority = 10
    name = queue_name("django-tasks-priority")
    try:
        assert backend.supports_priority
        assert [backend.broker_priority(p) for p in (-100, 0, 100)] == [0, 5, 10]
        urgent = jobs.add.using(priority=100, queue_name=name).enqueue(1, 1)
        # Read through the queue Celery declared (with or without x-max-priority).
        declared = celery_app.amqp.queues[name]
        with celery_app.connection_for_read() as conn:
            simple = conn.SimpleQueue(declared)
            message = simple.get(timeout=5)
            message.ack()
            simple.close()
            declared(conn.default_channel).delete()
        assert message.headers["id"] == urgent.id and message.properties["priority"] == 10
    finally:
        celery_app.conf.task_queue_max_priority = None


def test_an_attempt_records_its_worker_in_one_statement_on_postgresql():
    """Each attempt appends its worker to the row's workers and reads what it reports; on
    PostgreSQL one ``UPDATE ... RETURNING`` (it was a SELECT and an UPDATE), elsewhere both."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from django_celery_fulldbresult import db

    task_id = str(uuid.uuid4())  # a PENDING row that no worker runs (one may be up)
    TaskResultMeta.objects.create(
        task_id=task_id,
        task=jobs.add.module_path,
        status=states.PENDING,
        date_submitted=timezone.now(),
    )
    with CaptureQueriesContext(connections[db.write_alias()]) as captured:
        first = runner.begin_attempt(task_id, "w1@host")
    second = runner.begin_attempt(task_id, "w2@host")
    expected = 1 if connections[db.write_alias()].vendor == "postgresql" else 2
    assert len(captured) == expected, [q["sql"] for q in captured.captured_queries]
    assert first.worker_ids == ["w1@host"] and second.worker_ids == ["w1@host", "w2@host"]
    assert second.enqueued_at == row(task_id).date_submitted is not None
    assert row(task_id).meta["workers"] == ["w1@host", "w2@host"]
    missing = runner.begin_attempt(str(uuid.uuid4()), "w3@host")  # no row: nothing written
    assert missing.worker_ids == ["w3@host"] and missing.enqueued_at is None


@needs_options
@pytest.mark.usefixtures("worker")
def test_celery_retries_count_as_attempts_with_their_workers(signals):
    result = finished(jobs.flaky.enqueue(2), timeout=30)
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 3
    assert result.attempts == 3 and len(result.worker_ids) == 3
    assert row(result.id).retries == 2
    wait_for(lambda: any(name == "finished" for name, _ in signals))
    mine = [(name, r.status, r.attempts) for name, r in signals if r.id == result.id]
    assert [entry for entry in mine if entry[0] != "enqueued"] == [
        ("started", TaskResultStatus.RUNNING, 1),
        ("started", TaskResultStatus.RUNNING, 2),
        ("started", TaskResultStatus.RUNNING, 3),
        ("finished", TaskResultStatus.SUCCESSFUL, 3),  # a retried attempt did not finish
    ]


@needs_options
def test_task_options_are_celery_options(celery_app):
    limited = runner.celery_task(jobs.limited, celery_app)
    assert (limited.time_limit, limited.soft_time_limit, limited.acks_late) == (30, 20, True)
    flaky = runner.celery_task(jobs.flaky, celery_app)
    assert flaky.autoretry_for == (ValueError,) and flaky.max_retries == 3
    with pytest.raises(TypeError, match="no_such_option"):
        jobs.task(no_such_option=1)(lambda: None)


@needs_options
@pytest.mark.usefixtures("worker")
def test_a_secret_tasks_arguments_are_never_stored():
    result = finished(jobs.secret.enqueue("hunter2"))
    assert result.return_value == 7
    assert "hunter2" not in repr(TaskResultMeta.objects.filter(task_id=result.id).values())
    assert jobs.secret.get_result(result.id).args == []  # not stored: unknown


# -- the rest of the package applies to Django tasks ---------------------------------------


@pytest.mark.usefixtures("worker")
def test_the_admin_shows_and_retries_a_failed_django_task(admin_client):
    result = finished(jobs.needs_marker.enqueue("dj-1"))
    assert result.status == TaskResultStatus.FAILED
    page = admin_client.get(changelist(q=result.id)).content.decode()
    assert "testproject.demo.jobs.needs_marker" in page
    Run.objects.create(task_id="dj-1", pid=0)  # the operator fixes the cause
    act(admin_client, "retry_tasks", [row(result.id)])
    copy = TaskResultMeta.objects.get(retried_from=result.id)
    retried = finished(jobs.needs_marker.get_result(copy.task_id))
    assert retried.status == TaskResultStatus.SUCCESSFUL and retried.return_value == "dj-1"
    assert retried.args == ["dj-1"] and retried.attempts == 1
    assert jobs.needs_marker.get_result(result.id).status == TaskResultStatus.FAILED


def test_the_admin_cancels_and_sends_now_waiting_django_tasks(
    admin_client, scheduling_on, celery_app
):
    later = timezone.now() + datetime.timedelta(hours=1)
    cancelled = jobs.add.using(run_after=later, queue_name=HELD).enqueue(1, 1)
    sent = jobs.add.using(run_after=later, queue_name=HELD).enqueue(2, 2)
    act(admin_client, "cancel_scheduled_tasks", [row(cancelled.id)])
    act(admin_client, "send_scheduled_now", [row(sent.id)])
    revoked = jobs.add.get_result(cancelled.id)
    assert revoked.status == TaskResultStatus.FAILED
    assert revoked.errors[0].exception_class_path.endswith("TaskRevokedError")
    assert [m.headers["id"] for m in take_messages(celery_app, HELD)] == [sent.id]
    assert jobs.add.get_result(sent.id).status == TaskResultStatus.READY  # sent, not run


def test_stale_reports_and_stats_count_django_tasks(celery_app):
    take_messages(celery_app, HELD)
    waiting = jobs.add.using(queue_name=HELD).enqueue(1, 1)  # no worker takes it
    TaskResultMeta.objects.filter(task_id=waiting.id).update(
        date_modified=timezone.now() - datetime.timedelta(hours=2)
    )
    out = io.StringIO()
    call_command("find_stale_tasks", "--hours", "1", stdout=out)
    assert waiting.id in out.getvalue()
    figures = stats.collect(TaskResultMeta.objects.all(), datetime.timedelta(days=1))
    assert figures["tasks"]["testproject.demo.jobs.add"]["total"] >= 1


@needs_options
def test_a_secret_task_cannot_wait_in_the_database(scheduling_on):
    with pytest.raises(InvalidTask, match="secret"):
        jobs.secret.using(run_after=timezone.now() + datetime.timedelta(hours=1))


def test_enqueue_inside_a_transaction_follows_transactional_publish(scheduling_on, celery_app):
    """With TRANSACTIONAL_PUBLISH a task enqueued in atomic() is sent only if it commits."""
    scheduling_on.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH = True
    take_messages(celery_app, HELD)
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = jobs.add.using(queue_name=HELD).enqueue(1, 1)
        raise RuntimeError("rollback")
    with transaction.atomic():
        committed = jobs.add.using(queue_name=HELD).enqueue(2, 2)
    assert not TaskResultMeta.objects.filter(task_id=rolled_back.id).exists()
    assert [m.headers["id"] for m in take_messages(celery_app, HELD)] == [committed.id]
    assert jobs.add.get_result(committed.id).args == [2, 2]


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_an_ordinary_celery_worker_runs_django_tasks(worker_processes, pool):
    """A `celery worker` process (no registration by the user: the module is in
    CELERY_IMPORTS) runs sync, async and context-taking Django tasks."""
    queue = queue_name("django-tasks")  # only this worker consumes it
    worker_processes.start("djt", pool=pool, concurrency=2, queues=queue)
    sync, coroutine, context = (
        jobs.add.using(queue_name=queue).enqueue(1, 2),
        jobs.async_add.using(queue_name=queue).enqueue(3, 4),
        jobs.with_context.using(queue_name=queue).enqueue("p"),
    )
    assert finished(sync, 60).return_value == 3
    assert finished(coroutine, 30).return_value == 7
    assert finished(context, 30).return_value["attempt"] == 1
    assert sync.worker_ids[0].startswith("djt@")


def test_enqueue_writes_the_row_even_without_publish_tracking(settings, celery_app):
    settings.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False
    take_messages(celery_app, HELD)
    result = jobs.add.using(queue_name=HELD).enqueue(8, 9)
    assert row(result.id).status == states.PENDING  # before enqueue returned
    assert jobs.add.get_result(result.id).enqueued_at == result.enqueued_at
    plain = tasks.add.apply_async((1, 1), queue=HELD, ignore_result=False)
    assert not TaskResultMeta.objects.filter(task_id=plain.id).exists()  # the setting holds


def test_the_status_mapping():
    expected = {
        "PENDING": "READY",
        "SCHEDULED": "READY",
        "SCHEDULED_SENT": "READY",
        "RECEIVED": "READY",
        "RETRY": "READY",
        "STARTED": "RUNNING",
        "PROGRESS": "RUNNING",  # a custom state: update_state() from the running task
        "SUCCESS": "SUCCESSFUL",
        "FAILURE": "FAILED",
        "REVOKED": "FAILED",
        "REJECTED": "FAILED",
    }
    assert {state: results.status_of(state).value for state in expected} == expected


#: A Celery app whose results go elsewhere: Django could not read them back.
OTHER_APP = Celery("other", backend="cache+memory://", set_as_current=False)


def test_a_celery_app_without_the_packages_result_backend_fails_the_check():
    backend = CeleryBackend("other", {"OPTIONS": {"CELERY_APP": f"{__name__}.OTHER_APP"}})
    assert not backend.supports_get_result
    assert [message.id for message in backend.check()] == ["django_celery_fulldbresult.E003"]
    with pytest.raises(NotImplementedError, match="result backend"):
        backend.get_result(str(uuid.uuid4()))
    with pytest.raises(ImproperlyConfigured, match="CELERY_APPS"):
        CeleryBackend("typo", {"OPTIONS": {"CELERY_APPS": "proj.celery.app"}})
    assert task_backends["default"].check() == []


def test_celery_eager_mode_runs_django_tasks_at_enqueue(celery_app, monkeypatch):
    """A project's test settings with CELERY_TASK_ALWAYS_EAGER (and the result stored): the
    task runs inside enqueue and get_result reads it back."""
    for task in (jobs.add, jobs.fail):  # CELERY_TASK_STORE_EAGER_RESULT, read at binding
        monkeypatch.setattr(runner.celery_task(task, celery_app), "store_eager_result", True)
    celery_app.conf.task_always_eager = True
    try:
        result = jobs.add.enqueue(6, 7)
        failed = jobs.fail.enqueue("eager")
    finally:
        celery_app.conf.task_always_eager = False
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 13
    assert result.args == [6, 7] and result.attempts == 1
    failed.refresh()
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class_path == "builtins.ValueError"
