"""Transactional publish (the outbox): a call made inside ``transaction.atomic()`` is held in
that transaction and published after commit, by the on-commit hook or, if the process died
first, by a sender. A rollback means never sent. Real worker, broker and database."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from celery import states
from django.db import connections, transaction
from django.test import Client

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT, scheduler
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import outbox as held_calls
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import HELD, STACK, run_script, take_messages, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

#: Short, so the tests that wait for the sender's fallback stay short.
GRACE = 0.5


@pytest.fixture
def outbox(patched):
    """``TRANSACTIONAL_PUBLISH`` on, every call of the test app intercepted."""
    patched.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH = True
    patched.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH_GRACE = GRACE
    yield patched
    held_calls.close()


def drain(app, queue: str = HELD) -> list[str]:
    return [message.headers["id"] for message in take_messages(app, queue)]


def status(task_id: str) -> str | None:
    row = TaskResultMeta.objects.filter(task_id=task_id).first()
    return None if row is None else row.status


def sender_pass(app) -> int:
    """What one sender pass (run_scheduler's) sends once every held row is due."""
    time.sleep(GRACE + 0.2)
    return scheduler.forward_due(app).sent


# -- commit, rollback ---------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_call_in_a_transaction_runs_once_after_commit(outbox, celery_app):
    with transaction.atomic():
        result = tasks.record_run.delay(7)
        assert status(result.id) == SCHEDULED  # held in the caller's transaction
        assert Run.objects.filter(task_id=result.id).count() == 0
    # The on-commit hook published it: no sender ran.
    assert result.get(timeout=20) == 7
    assert status(result.id) == states.SUCCESS
    assert sender_pass(celery_app) == 0  # claimed exactly once: the sender finds nothing
    assert Run.objects.filter(task_id=result.id).count() == 1


def test_a_rollback_means_never_sent(outbox, celery_app, caplog):
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.add.apply_async((1, 1), queue=HELD)
        assert status(result.id) == SCHEDULED
        raise RuntimeError("the caller rolls back")
    assert status(result.id) is None
    assert sender_pass(celery_app) == 0
    assert drain(celery_app) == []
    # Nothing of the rolled-back call is left in the thread for the next commit's hook.
    with caplog.at_level("INFO", "django_celery_fulldbresult"), transaction.atomic():
        later = tasks.add.apply_async((2, 2), queue=HELD)
    assert drain(celery_app) == [later.id]
    assert result.id not in caplog.text


def test_every_call_of_a_transaction_is_published_at_its_commit(outbox, celery_app):
    with transaction.atomic():
        ids = [tasks.add.apply_async((i, i), queue=HELD).id for i in range(5)]
        assert drain(celery_app) == []  # nothing before the commit
    assert sorted(drain(celery_app)) == sorted(ids)
    assert {status(task_id) for task_id in ids} == {SCHEDULED_SENT}
    assert sender_pass(celery_app) == 0


def test_a_savepoint_rolled_back_drops_only_its_calls(outbox, celery_app):
    with transaction.atomic():
        # The first call's hook is discarded with its savepoint: the later ones still go.
        with pytest.raises(RuntimeError), transaction.atomic():
            dropped = tasks.add.apply_async((1, 1), queue=HELD)
            raise RuntimeError("savepoint rolled back")
        kept = tasks.add.apply_async((2, 2), queue=HELD)
        with pytest.raises(RuntimeError), transaction.atomic():
            dropped_too = tasks.add.apply_async((3, 3), queue=HELD)
            raise RuntimeError("savepoint rolled back")
        with transaction.atomic():
            nested = tasks.add.apply_async((4, 4), queue=HELD)
    assert sorted(drain(celery_app)) == sorted([kept.id, nested.id])
    assert status(dropped.id) is None and status(dropped_too.id) is None
    assert sender_pass(celery_app) == 0
    assert drain(celery_app) == []


def test_a_call_outside_a_transaction_is_published_at_once(outbox, celery_app):
    result = tasks.add.apply_async((1, 1), queue=HELD)
    assert drain(celery_app) == [result.id]
    assert status(result.id) in (None, states.PENDING)  # publish tracking's row, if any


# -- the process dies between commit and publish -------------------------------------------

CRASH = """
import os, sys
import django
django.setup()
from celery import current_app
from django.db import transaction
from django.test import override_settings
from django_celery_fulldbresult import scheduler
from testproject.demo import tasks

override_settings(
    DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA=True,
    DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH=True,
    DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH_GRACE=float(sys.argv[2]),
).enable()
scheduler.install(current_app)
with transaction.atomic():
    # Registered first, run first after the commit: the process dies before our hook.
    transaction.on_commit(lambda: os._exit(3))
    print("ID " + tasks.add.apply_async((2, 3), queue=sys.argv[1]).id, flush=True)
"""


def test_a_process_that_dies_after_commit_loses_nothing(outbox, celery_app):
    run = run_script(CRASH, HELD, "2")
    assert run.returncode == 3, run.stderr[-4000:]  # died between commit and publish
    task_id = run.stdout.split("ID ", 1)[1].strip()
    row = TaskResultMeta.objects.get(task_id=task_id)
    assert (row.status, row.scheduled_id) == (SCHEDULED, None)  # committed, never published
    assert drain(celery_app) == []
    # The grace keeps a sender from racing the hook: not yet due.
    assert scheduler.forward_due(celery_app).sent == 0
    wait_for(lambda: scheduler.forward_due(celery_app).sent == 1, timeout=10, interval=0.2)
    assert drain(celery_app) == [task_id]
    assert status(task_id) == SCHEDULED_SENT


def test_a_hook_that_fails_leaves_the_task_to_the_sender(outbox, celery_app, monkeypatch):
    """The broker unreachable at commit (the edge: a publisher that cannot connect)."""

    def unreachable(self):
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(scheduler.publishing.Publisher, "_ready", unreachable)
    with transaction.atomic():
        result = tasks.add.apply_async((1, 1), queue=HELD)
    assert status(result.id) == SCHEDULED  # released by the hook's sender, still waiting
    monkeypatch.undo()
    assert sender_pass(celery_app) == 1
    assert drain(celery_app) == [result.id]


# -- the per-call choice ------------------------------------------------------------------


def test_per_call_opt_in_without_the_setting(patched, celery_app):
    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = tasks.add.apply_async((1, 1), queue=HELD, db_schedule=scheduler.IN_TRANSACTION)
        raise RuntimeError("rollback")
    with transaction.atomic():
        kept = tasks.add.apply_async((2, 2), queue=HELD, db_schedule=scheduler.IN_TRANSACTION)
        plain = tasks.add.apply_async((3, 3), queue=HELD)  # the default: at once
        assert drain(celery_app) == [plain.id]
    assert drain(celery_app) == [kept.id]
    assert status(dropped.id) is None
    scheduler.outbox.close()


@pytest.mark.parametrize("choice", [scheduler.AT_ONCE, False])
def test_per_call_opt_out(outbox, celery_app, choice):
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.add.apply_async((1, 1), queue=HELD, db_schedule=choice)
        raise RuntimeError("rollback")
    assert drain(celery_app) == [result.id]  # sent before the rollback, as without the setting
    assert status(result.id) != SCHEDULED


def test_a_delayed_call_joins_the_transaction_with_the_setting(outbox, celery_app):
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.add.apply_async((1, 1), countdown=0.2, queue=HELD)
        raise RuntimeError("rollback")
    assert status(result.id) is None
    assert sender_pass(celery_app) == 0
    assert drain(celery_app) == []


def test_the_scheduled_task_base_class_holds_too(scheduling_on, celery_app):
    scheduling_on.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH = True
    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = tasks.scheduled_add.apply_async((1, 1), queue=HELD)
        raise RuntimeError("rollback")
    with transaction.atomic():
        kept = tasks.scheduled_add.apply_async((2, 2), queue=HELD)
        assert drain(celery_app) == []
    assert drain(celery_app) == [kept.id]
    assert status(dropped.id) is None
    scheduler.outbox.close()


# -- what is not held ---------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_retry_inside_atomic_is_not_bound(outbox, celery_app):
    """The retry is raised inside the task's own ``atomic()``, which the exception rolls
    back: bound to it, the retry would be lost and the task stay RETRY for ever."""
    result = tasks.retry_in_atomic.delay()
    deadline = time.monotonic() + 30
    while Run.objects.filter(task_id=result.id).count() < 3:
        assert time.monotonic() < deadline, "the retries were lost"
        scheduler.forward_due(celery_app)
        time.sleep(0.1)
    with pytest.raises(RuntimeError, match="attempt 2"):
        result.get(timeout=20)


def test_a_secret_task_is_refused_inside_a_transaction(outbox, celery_app):
    refused = pytest.raises(scheduler.TransactionalPublishError, match="db_schedule=True")
    with refused, transaction.atomic():
        tasks.charge_card.apply_async(("4111", 10), queue=HELD)
    assert drain(celery_app) == []
    outside = tasks.charge_card.apply_async(("4111", 10), queue=HELD)
    assert drain(celery_app) == [outside.id]


def test_async_code_is_not_held(outbox, celery_app):
    async def send():
        return tasks.add.apply_async((1, 1), queue=HELD).id

    task_id = asyncio.run(send())
    assert drain(celery_app) == [task_id]


def test_celerys_apply_async_on_commit_still_works(outbox, celery_app):
    assert hasattr(tasks.add, "apply_async_on_commit")  # Celery's DjangoTask
    dropped, kept = str(uuid.uuid4()), str(uuid.uuid4())
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.add.apply_async_on_commit((1, 1), queue=HELD, task_id=dropped)
        raise RuntimeError("rollback")
    with transaction.atomic():
        tasks.add.apply_async_on_commit((2, 2), queue=HELD, task_id=kept)
    assert drain(celery_app) == [kept]  # published from memory after the commit
    assert status(kept) in (None, states.PENDING)  # not held: published at once
    assert status(dropped) is None


# -- a web request under ATOMIC_REQUESTS --------------------------------------------------


def test_atomic_requests(outbox, celery_app, monkeypatch):
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)
    client = Client(raise_request_exception=False)
    failed, succeeded = str(uuid.uuid4()), str(uuid.uuid4())
    response = client.get("/demo/publish-in-request/", {"queue": HELD, "id": failed, "fail": 1})
    assert response.status_code == 500
    response = client.get("/demo/publish-in-request/", {"queue": HELD, "id": succeeded})
    assert json.loads(response.content) == {"id": succeeded}
    assert drain(celery_app) == [succeeded]
    assert status(failed) is None
    assert sender_pass(celery_app) == 0


@pytest.mark.skipif(STACK != "sqlite", reason="SQLite's single writer")
def test_sqlite_holds_in_the_callers_transaction(outbox, celery_app):
    """The row joins the caller's transaction (no second writer waits for it) and the hook
    runs after the commit, when SQLite's lock is free."""
    with transaction.atomic():
        TaskResultMeta.objects.create(task_id=str(uuid.uuid4()))  # the caller writes first
        result = tasks.add.apply_async((1, 1), queue=HELD)
    assert drain(celery_app) == [result.id]


def test_a_test_cases_own_transaction_does_not_hold(outbox, celery_app):
    """``TestCase`` wraps each test in atomic blocks of its own: a call there is published at
    once, as in production outside a transaction (a hook would never run: no commit)."""
    block = transaction.atomic()
    block._from_testcase = True
    with pytest.raises(RuntimeError), block:
        outside = tasks.add.apply_async((1, 1), queue=HELD)
        assert drain(celery_app) == [outside.id]
        with transaction.atomic():  # the test's own atomic() holds as usual
            held = tasks.add.apply_async((2, 2), queue=HELD)
        assert status(held.id) == SCHEDULED
        assert drain(celery_app) == []
        raise RuntimeError("the test case rolls back")
    assert status(held.id) is None


def test_w007_the_setting_without_the_scheduler(settings):
    from django.core.checks import run_checks

    from django_celery_fulldbresult import checks

    def ours() -> list[str]:
        return [
            m.id for m in run_checks(tags=[checks.TAG]) if m.id == "django_celery_fulldbresult.W007"
        ]

    settings.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH = True
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = False
    assert ours() == ["django_celery_fulldbresult.W007"]
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
    assert ours() == []
    settings.DJANGO_CELERY_FULLDBRESULT_TRANSACTIONAL_PUBLISH = False
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = False
    assert ours() == []
