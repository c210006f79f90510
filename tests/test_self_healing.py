"""Self-healing delivery: a dead sender's claims are forwarded again by the others, a live
sender keeps its own, and each attempt of a task runs once at the workers however many
copies of its message arrive (``receipt``), while the worker that took it lives.

The in-process worker (threads pool, real broker and database) receives every copy; the
copies are made the way production makes them: a sender that dies after publishing part
of a batch, a second forward of the same claim, the same message published twice.
"""

from __future__ import annotations

import socket
import time
import uuid
from datetime import timedelta

import pytest
from celery import states
from celery.worker import state as worker_state
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT, heartbeat, scheduler
from django_celery_fulldbresult.models import TaskResultMeta, WorkerHeartbeat
from django_celery_fulldbresult.scheduler import claims
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import queue_name, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("worker", "worker_alive"),
]


@pytest.fixture
def worker_alive(worker):
    """The in-process worker's heartbeat rows at once (the table is emptied between tests;
    its heartbeat thread writes them again within WORKER_HEARTBEAT seconds). Celery's test
    worker takes a task under its node name and records STARTED under the machine's name
    (a `celery worker` uses its node name for both): both are alive."""
    for name in {worker.hostname, socket.gethostname()}:
        heartbeat.beat(name, heartbeat.process_started())


def runs(task_id: str) -> int:
    return Run.objects.filter(task_id=task_id).count()


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


def scheduled(count: int, task=tasks.record_run) -> list[str]:
    """``count`` tasks waiting in the database, due now."""
    ids = [task.apply_async((i,), countdown=0.2).id for i in range(count)]
    time.sleep(0.3)
    assert all(row(task_id).status == SCHEDULED for task_id in ids)
    return ids


def settled(task_ids: list[str], seconds: float = 1.0) -> None:
    """Every copy still on its way reaches the worker and is dealt with."""
    wait_for(lambda: all(runs(task_id) >= 1 for task_id in task_ids))
    time.sleep(seconds)
    assert not {request.id for request in worker_state.active_requests} & set(task_ids)
    assert not set(task_ids) & set(worker_state.revoked), "a skipped copy stayed revoked"


# -- the scheduler: claims of a dead sender come back ------------------------------------


def test_a_dead_senders_claims_are_forwarded_again_each_task_runs_once(
    patched, settings, celery_app
):
    """A sender claims 4 tasks, publishes 2 and dies. The worker that takes the 2 ends their
    claim; after SCHEDULER_RECLAIM_AFTER any sender takes the other 2 back and forwards them.
    (Copies of a message already in the queue: ``test_two_copies_...`` below.)"""
    # A lease longer than the worker can take to run the first two, however slow the machine
    # (CI's once took more than 1 s); then a short one, past which the claims are taken back.
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_RECLAIM_AFTER = 60.0
    ids = scheduled(4)
    with scheduler.Sender(celery_app) as dying:
        token = uuid.uuid4()
        rows = dying.database.run(claims.claim, dying.using, token, 10)
        assert len(rows) == 4
        dying.publisher.publish(rows[:2], token)  # ... and it is killed: nothing recorded
        dying.leases.drop(token)  # a dead sender renews nothing
    wait_for(lambda: all(runs(task_id) == 1 for task_id in ids[:2]))
    assert scheduler.forward_due(celery_app).reclaimed == 0  # the lease has not run out
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_RECLAIM_AFTER = 1.0
    time.sleep(1.1)
    outcome = scheduler.forward_due(celery_app)
    assert (outcome.reclaimed, outcome.sent) == (2, 2)
    settled(ids)
    assert [runs(task_id) for task_id in ids] == [1, 1, 1, 1]
    assert {row(task_id).status for task_id in ids} == {states.SUCCESS}


def test_a_live_sender_keeps_its_claims_however_long_it_holds_them(patched, settings, celery_app):
    """A sender that holds a batch (a slow broker) three times longer than the lease keeps
    it: it renews the lease, and another sender takes nothing."""
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_RECLAIM_AFTER = 1.0
    ids = scheduled(3)
    with scheduler.Sender(celery_app) as slow:
        token = uuid.uuid4()
        rows = slow.database.run(slow._claim, token, 10)
        assert len(rows) == 3
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            outcome = scheduler.forward_due(celery_app)
            assert (outcome.reclaimed, outcome.sent) == (0, 0), "a live sender's claim taken"
            time.sleep(0.2)
        published = slow.publisher.publish(rows, token)
        slow.database.run(slow.record, published)
    settled(ids)
    assert [runs(task_id) for task_id in ids] == [1, 1, 1]


def test_without_a_lease_claims_stay_for_an_operator(patched, settings, celery_app):
    """SCHEDULER_RECLAIM_AFTER = 0: at most once, as before (reported stale)."""
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_RECLAIM_AFTER = 0
    [task_id] = scheduled(1)
    with scheduler.Sender(celery_app) as dying:
        dying.database.run(claims.claim, dying.using, uuid.uuid4(), 10)
    time.sleep(0.5)
    assert scheduler.forward_due(celery_app).reclaimed == 0
    assert TaskResultMeta.objects.get_stale_scheduled_tasks().filter(task_id=task_id).exists()


# -- the workers: each attempt runs once --------------------------------------------------


def publish_twice(celery_app, task_ids: list[str]) -> None:
    """A claim forwarded twice (its first sender died unrecorded, the copy is in the queue)."""
    with scheduler.Sender(celery_app) as sender:
        token = uuid.uuid4()
        rows = sender.database.run(claims.claim, sender.using, token, 10)
        assert sorted(r["task_id"] for r in rows) == sorted(task_ids)
        sender.publisher.publish(rows, token)
        published = sender.publisher.publish(rows, token)
        sender.database.run(sender.record, published)


def test_two_copies_of_a_forwarded_task_run_it_once(patched, celery_app):
    ids = scheduled(3)
    publish_twice(celery_app, ids)
    settled(ids)
    assert [runs(task_id) for task_id in ids] == [1, 1, 1]
    assert {row(task_id).status for task_id in ids} == {states.SUCCESS}


def test_two_copies_of_a_forwarded_task_whose_result_is_ignored_run_it_once(patched, celery_app):
    """Its row is deleted by the worker that takes it: the second copy finds none."""
    ids = scheduled(2, task=tasks.record_ignored)
    publish_twice(celery_app, ids)
    settled(ids)
    assert [runs(task_id) for task_id in ids] == [1, 1]
    assert not TaskResultMeta.objects.filter(task_id__in=ids).exists()


def test_a_copy_arriving_while_the_first_runs_is_not_run(patched, celery_app):
    """The first copy is still running (a live worker holds the attempt): the second is
    acknowledged and not run, and the first one's result stands."""
    result = tasks.record_then_sleep.apply_async((1.5,), countdown=0.2)
    time.sleep(0.3)
    publish_twice(celery_app, [result.id])
    assert result.get(timeout=20) == 1.5
    settled([result.id])
    assert runs(result.id) == 1


# -- RUN_ONCE: every task -----------------------------------------------------------------


@pytest.fixture
def run_once(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_RUN_ONCE = True
    return settings


def test_run_once_a_message_for_a_finished_attempt_is_not_run(run_once, celery_app):
    """Redis/SQS redelivery after the visibility timeout, a duplicated publish: the same
    message again once the attempt finished."""
    first = tasks.record_run.delay("once")
    assert first.get(timeout=20) == "once"
    again = tasks.record_run.apply_async(("twice",), task_id=first.id)
    settled([again.id])
    assert runs(first.id) == 1
    assert (row(first.id).status, first.get(timeout=5)) == (states.SUCCESS, "once")


def test_without_run_once_a_copy_runs_again(settings, celery_app):
    """What RUN_ONCE guards against: by default a second message runs (Celery's behaviour)."""
    first = tasks.record_run.delay("once")
    first.get(timeout=20)
    tasks.record_run.apply_async(("twice",), task_id=first.id)
    wait_for(lambda: runs(first.id) == 2)


def test_run_once_a_revoked_row_never_runs(run_once, celery_app):
    """Revoked while no worker was up (Celery's revoke lives in worker memory): the row says
    REVOKED, and the message that arrives later does not run."""
    task_id = str(uuid.uuid4())
    TaskResultMeta.objects.create(task_id=task_id, task=tasks.record_run.name, status="REVOKED")
    tasks.record_run.apply_async(("x",), task_id=task_id)
    time.sleep(1.5)
    assert runs(task_id) == 0
    assert row(task_id).status == states.REVOKED


def held_by(hostname: str, taken: timedelta, status: str = states.STARTED) -> str:
    task_id = str(uuid.uuid4())
    TaskResultMeta.objects.create(
        task_id=task_id,
        task=tasks.record_run.name,
        status=status,
        hostname=hostname,
        date_modified=timezone.now() - taken,
    )
    return task_id


def test_run_once_an_attempt_held_by_a_live_worker_is_not_run_again(run_once, celery_app):
    WorkerHeartbeat.objects.create(
        hostname="alive@host",
        last_seen=timezone.now(),
        started=timezone.now() - timedelta(hours=1),
    )
    task_id = held_by("alive@host", timedelta(minutes=5))
    tasks.record_run.apply_async(("copy",), task_id=task_id)
    time.sleep(1.5)
    assert runs(task_id) == 0
    assert (row(task_id).status, row(task_id).hostname) == (states.STARTED, "alive@host")


@pytest.mark.parametrize(
    "heartbeat",
    [
        pytest.param({"last_seen": timedelta(hours=1), "started": timedelta(hours=2)}, id="gone"),
        # Restarted under the same name after it took the task: not the one that holds it.
        pytest.param({"last_seen": timedelta(0), "started": timedelta(minutes=1)}, id="restarted"),
        pytest.param(None, id="no-heartbeat"),
    ],
)
@pytest.mark.parametrize("status", [states.STARTED, states.RECEIVED])
def test_run_once_an_attempt_whose_worker_died_runs_again(run_once, celery_app, heartbeat, status):
    if heartbeat is not None:
        now = timezone.now()
        WorkerHeartbeat.objects.create(
            hostname="dead@host",
            last_seen=now - heartbeat["last_seen"],
            started=now - heartbeat["started"],
        )
    task_id = held_by("dead@host", timedelta(minutes=5), status)
    result = tasks.record_run.apply_async(("again",), task_id=task_id)
    assert result.get(timeout=20) == "again"
    assert runs(task_id) == 1


def test_run_once_a_newer_attempt_runs(run_once, celery_app):
    """A retry (a higher ``retries``) of an attempt that ended in RETRY is a new attempt."""
    task_id = held_by("somewhere@host", timedelta(0), states.RETRY)
    result = tasks.record_run.apply_async(("retried",), task_id=task_id, retries=1)
    assert result.get(timeout=20) == "retried"
    assert row(task_id).retries == 1
    # ... and the old attempt's copy is not run.
    tasks.record_run.apply_async(("old",), task_id=task_id, retries=0)
    settled([task_id])
    assert runs(task_id) == 1


def test_run_once_without_a_row_the_first_receipt_writes_it(run_once, celery_app):
    """Publish tracking off: the worker's receipt writes the row, a copy then finds it."""
    task_id = str(uuid.uuid4())
    tasks.record_run.apply_async(("a",), task_id=task_id)
    tasks.record_run.apply_async(("b",), task_id=task_id)
    settled([task_id])
    assert runs(task_id) == 1
    assert row(task_id).status == states.SUCCESS


def test_a_taken_forwarded_row_is_no_longer_claimed(patched, celery_app):
    """The worker's take ends a sender's claim: a reclaim can never send a task a worker
    already has."""
    [task_id] = scheduled(1)
    with scheduler.Sender(celery_app) as sender:
        token = uuid.uuid4()
        rows = sender.database.run(claims.claim, sender.using, token, 10)
        sender.publisher.publish(rows, token)
        wait_for(lambda: runs(task_id) == 1)
        stored = row(task_id)
        assert stored.status not in (SCHEDULED, SCHEDULED_SENT) and stored.scheduled_id is None


def test_run_once_the_first_receipt_stores_the_call_as_the_worker_would(
    run_once, celery_app, caplog
):
    """Publish tracking off: the row the receipt writes holds the exact call, replayable (it
    used to lack ``replayable``, a NOT NULL column: PostgreSQL refused the row and the task ran
    unchecked, MariaDB stored it not replayable for good). A secret task's call is not kept."""
    run_once.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False
    result = tasks.echo.apply_async((1, "two"), {"three": 3.0})
    result.get(timeout=20)
    stored = row(result.id)
    assert stored.replayable and stored.get_call() == ([1, "two"], {"three": 3.0})
    secret = tasks.charge_card.apply_async(("4111 1111 1111 1111", 10))
    secret.get(timeout=20)
    stored = row(secret.id)
    assert not stored.replayable and stored.get_call() == ([], {})
    assert "4111" not in str(stored.argsrepr) + str(stored.args)
    assert "could not take" not in caplog.text  # each receipt wrote its row


def test_run_once_a_row_written_just_after_a_failed_take_is_taken(
    run_once, celery_app, monkeypatch
):
    """Publish tracking writes behind: the row may appear between the take that found none
    and the read that asks why. The task must run (it used to be refused as a copy of an
    attempt "PENDING on no worker", and never ran)."""
    from django_celery_fulldbresult.managers import TaskResultQuerySet

    run_once.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False
    task_id = str(uuid.uuid4())
    take = TaskResultQuerySet.take

    def take_then_tracking_writes(self, retries, hostname):
        taken = take(self, retries, hostname)
        if not taken and not TaskResultMeta.objects.filter(task_id=task_id).exists():
            # The publisher's PENDING row lands right now (the race; an edge, simulated).
            TaskResultMeta.objects.create(
                task_id=task_id, task=tasks.record_run.name, status=states.PENDING
            )
        return taken

    monkeypatch.setattr(TaskResultQuerySet, "take", take_then_tracking_writes)
    result = tasks.record_run.apply_async(("late row",), task_id=task_id)
    assert result.get(timeout=20) == "late row"
    assert runs(task_id) == 1


def test_run_once_under_a_gevent_worker(worker_processes, celery_app):
    """The receipt claim in a gevent worker (its statements on the statement runner): a
    second message for a finished attempt, and one for a REVOKED row, do not run."""
    queue = queue_name("run-once-gevent")
    worker_processes.start(
        "once", pool="gevent", concurrency=20, queues=queue, env={"FULLDB_RUN_ONCE": "1"}
    )
    first = tasks.record_run.apply_async(("g",), queue=queue)
    assert first.get(timeout=60) == "g"
    tasks.record_run.apply_async(("again",), task_id=first.id, queue=queue)
    revoked = str(uuid.uuid4())
    TaskResultMeta.objects.create(task_id=revoked, task=tasks.record_run.name, status="REVOKED")
    tasks.record_run.apply_async(("x",), task_id=revoked, queue=queue)
    control = tasks.record_run.apply_async(("after",), queue=queue)  # runs after both copies
    assert control.get(timeout=30) == "after"
    time.sleep(1)
    assert (runs(first.id), runs(revoked)) == (1, 0)
    assert first.get(timeout=5) == "g" and row(revoked).status == states.REVOKED
    log = worker_processes.procs[0].log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
