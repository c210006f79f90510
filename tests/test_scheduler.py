"""The database ETA scheduler against a real worker, broker and database."""

from __future__ import annotations

import datetime
import io
import json
import time
import uuid

import pytest
from celery import chain, chord, states
from celery.exceptions import TaskRevokedError
from django.core.management import call_command
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT, db, scheduler
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import claims
from django_celery_fulldbresult.scheduler.rows import FORWARDED_HEADER
from testproject.demo import tasks
from testproject.demo.models import Run

from .beat_support import needs_beat
from .conftest import HELD, STACK, queue_name, wait_for
from .test_publish_tracking import drain

pytestmark = pytest.mark.django_db(transaction=True)


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


def forward(celery_app, until=None, timeout: float = 20.0):
    """Run sender passes (the real claim/publish/record protocol) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        total += scheduler.forward_due(celery_app).sent
        if until is None or until():
            return total
        if time.monotonic() > deadline:
            raise AssertionError("forwarding did not finish in time")
        time.sleep(0.1)


def test_base_class_holds_the_task_in_the_database_until_due(scheduling_on, celery_app):
    result = tasks.scheduled_add.apply_async((2, 3), countdown=1.5, queue=HELD)
    stored = row(result.id)
    assert stored.status == SCHEDULED and stored.eta > timezone.now()
    assert (stored.args, stored.queue) == ([2, 3], HELD)
    assert scheduler.forward_due(celery_app).sent == 0  # not due yet
    assert drain(celery_app, HELD) == []  # nothing reached the broker
    assert not result.ready()
    time.sleep(1.6)
    assert scheduler.forward_due(celery_app).sent == 1
    assert drain(celery_app, HELD) == [result.id]
    assert row(result.id).status == SCHEDULED_SENT
    assert scheduler.forward_due(celery_app).sent == 0  # exactly once


def test_monkey_patch_intercepts_every_way_of_sending(patched, celery_app):
    eta = timezone.now() + datetime.timedelta(hours=1)
    sent = [
        tasks.add.apply_async((1, 1), countdown=3600, queue=HELD),
        tasks.add.s(1, 2).set(queue=HELD).apply_async(eta=eta),
        celery_app.send_task("not.registered.here", args=[3], eta=eta, queue=HELD),
    ]
    for result in sent:
        assert row(result.id).status == SCHEDULED
    assert row(sent[2].id).task == "not.registered.here"
    assert drain(celery_app, HELD) == []


@pytest.mark.usefixtures("worker")
def test_countdown_result_becomes_ready_when_the_forwarded_task_finishes(patched, celery_app):
    result = tasks.record_run.apply_async(("done",), countdown=1)
    assert row(result.id).status == SCHEDULED
    forward(celery_app, until=lambda: row(result.id).status != SCHEDULED)
    assert result.get(timeout=20) == "done"
    stored = row(result.id)
    assert stored.status == states.SUCCESS and stored.date_started >= stored.eta
    assert Run.objects.filter(task_id=result.id).count() == 1


@pytest.mark.usefixtures("worker")
def test_an_eta_already_due_is_sent_at_once(patched, celery_app):
    result = tasks.add.apply_async((2, 2), eta=timezone.now() - datetime.timedelta(seconds=5))
    assert result.get(timeout=20) == 4  # no sender pass needed


def test_forwarding_keeps_the_id_and_every_option(patched, celery_app):
    expires = timezone.now() + datetime.timedelta(hours=2)
    call = dict(
        priority=5,
        expires=expires,
        headers={"tenant": "acme"},
        link=tasks.noop.si(),
        link_error=tasks.noop.si(),
        time_limit=30,
        soft_time_limit=20,
        shadow="shadowed-name",
    )
    result = tasks.add.apply_async((1, 2), countdown=0.5, queue=HELD, **call)
    time.sleep(0.6)
    captured = []
    with celery_app.connection_for_read() as conn:
        forward(celery_app)
        # The same call sent by Celery itself, to compare the two messages field by field.
        with scheduler.forwarding():
            plain = tasks.add.apply_async((1, 2), **{**call, "queue": HELD})
        simple = conn.SimpleQueue(HELD)
        for _ in range(2):
            message = simple.get(timeout=5)
            captured.append(message)
            message.ack()
        simple.close()
    forwarded, reference = sorted(captured, key=lambda m: m.headers["id"] != result.id)
    assert reference.headers["id"] == plain.id
    differ = {"id", "root_id", "origin"}  # the reference is another task, from this process
    # Every forwarded message says so: its worker checks the row was not revoked meanwhile.
    assert forwarded.headers.pop(FORWARDED_HEADER) is True
    assert {k: v for k, v in forwarded.headers.items() if k not in differ} == {
        k: v for k, v in reference.headers.items() if k not in differ
    }
    assert forwarded.decode() == reference.decode()
    same_properties = ("priority", "delivery_mode", "reply_to", "content_type")
    assert [forwarded.properties.get(k) for k in same_properties] == [
        reference.properties.get(k) for k in same_properties
    ]
    assert forwarded.delivery_info["routing_key"] == reference.delivery_info["routing_key"]
    assert float(forwarded.properties["expiration"]) == pytest.approx(
        float(reference.properties["expiration"]), abs=5000
    )
    headers = forwarded.headers
    args, kwargs, embed = forwarded.decode()
    assert headers["id"] == result.id and headers["task"] == "testproject.demo.tasks.add"
    assert (args, kwargs) == ([1, 2], {})
    assert headers["eta"] is None  # sent for now
    assert headers["tenant"] == "acme" and headers["shadow"] == "shadowed-name"
    assert headers["timelimit"] == [30, 20]
    assert datetime.datetime.fromisoformat(headers["expires"]) == expires
    assert headers["root_id"] == result.id
    assert forwarded.properties["priority"] == 5
    assert embed["callbacks"][0]["task"] == "testproject.demo.tasks.noop"
    assert embed["errbacks"][0]["task"] == "testproject.demo.tasks.noop"


@pytest.mark.usefixtures("worker")
def test_retries_wait_in_the_database_and_max_retries_holds(patched, celery_app):
    result = tasks.always_retry.delay()
    for attempt in (1, 2):
        wait_for(
            lambda a=attempt: row(result.id).retries == a and row(result.id).status == SCHEDULED
        )
        # The RETRY write of the attempt that just ran did not erase the scheduled retry.
        assert row(result.id).eta > row(result.id).date_submitted
        forward(
            celery_app, until=lambda a=attempt: Run.objects.filter(task_id=result.id).count() > a
        )
    with pytest.raises(RuntimeError, match="attempt 2"):
        result.get(timeout=20)
    stored = row(result.id)
    assert (stored.status, stored.retries) == (states.FAILURE, 2)
    assert Run.objects.filter(task_id=result.id).count() == 3


@pytest.mark.usefixtures("worker")
def test_chain_whose_first_task_is_delayed(patched, celery_app):
    result = chain(tasks.add.s(1, 1).set(countdown=1), tasks.add.s(10), tasks.add.s(100)).delay()
    first = result.parent.parent
    assert row(first.id).status == SCHEDULED
    forward(celery_app, until=lambda: row(first.id).status != SCHEDULED)
    assert result.get(timeout=30) == 112


@pytest.mark.usefixtures("worker")
def test_chord_whose_first_header_task_is_delayed(patched, celery_app):
    header = [tasks.add.s(1, 1).set(countdown=1), tasks.add.s(2, 2), tasks.add.s(3, 3)]
    result = chord(header)(tasks.tsum.s())
    delayed = TaskResultMeta.objects.filter(status=SCHEDULED)
    wait_for(lambda: delayed.exists())
    assert delayed.get().group_id is not None
    forward(celery_app, until=lambda: not delayed.exists())
    assert result.get(timeout=30) == 12


@pytest.mark.usefixtures("worker")
def test_expired_tasks_are_never_sent(patched, celery_app):
    result = tasks.record_run.apply_async(
        countdown=1, expires=timezone.now() + datetime.timedelta(seconds=0.5)
    )
    time.sleep(1.1)
    outcome = scheduler.forward_due(celery_app)
    assert (outcome.sent, outcome.expired) == (0, 1)
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=5)
    assert row(result.id).status == states.REVOKED
    assert not Run.objects.filter(task_id=result.id).exists()


def test_rollback_of_the_callers_transaction_means_never_sent(patched, celery_app):
    """``db_schedule="transaction"``: the row joins the caller's transaction."""
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.add.apply_async(
            (1, 1), countdown=0.2, queue=HELD, db_schedule=scheduler.IN_TRANSACTION
        )
        assert row(result.id).status == SCHEDULED  # visible inside the transaction
        raise RuntimeError("rollback")
    assert not TaskResultMeta.objects.filter(task_id=result.id).exists()
    time.sleep(0.3)
    assert scheduler.forward_due(celery_app).claimed == 0
    assert drain(celery_app, HELD) == []


def test_cancel_guarantees_a_waiting_task_is_never_sent(patched, celery_app):
    result = tasks.add.apply_async((1, 1), countdown=0.3, queue=HELD)
    assert scheduler.cancel_scheduled(result.id) is True
    time.sleep(0.4)
    assert scheduler.forward_due(celery_app).claimed == 0
    assert drain(celery_app, HELD) == []
    assert row(result.id).status == states.REVOKED
    with pytest.raises(TaskRevokedError, match="cancelled"):
        result.get(timeout=5)
    assert scheduler.cancel_scheduled(result.id) is False  # already final


def test_what_is_not_intercepted(patched, settings, celery_app):
    assert not scheduler.wants_scheduling(celery_app, "celery.chord_unlock")
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_EXCLUDE = ["testproject.demo.tasks.noop"]
    assert not scheduler.wants_scheduling(celery_app, "testproject.demo.tasks.noop")
    assert not scheduler.wants_scheduling(celery_app, tasks.charge_card.name, tasks.charge_card)
    excluded = tasks.noop.apply_async(countdown=3600, queue=HELD)
    assert not TaskResultMeta.objects.filter(task_id=excluded.id, status=SCHEDULED).exists()
    assert drain(celery_app, HELD) == [excluded.id]  # kept its broker ETA


def test_broker_down_releases_claims_and_nothing_is_lost(patched, celery_app):
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(5)]
    time.sleep(0.3)
    down = celery_app.__class__("down", set_as_current=False)
    down.config_from_object(celery_app.conf)
    down.conf.broker_url = "amqp://guest:guest@127.0.0.1:1//"
    down.conf.broker_transport_options = {}
    down.conf.broker_connection_timeout = 0.5
    down.conf.task_publish_retry = False
    outcome = scheduler.forward_due(down)
    assert (outcome.sent, outcome.released) == (0, 5)
    assert (
        TaskResultMeta.objects.filter(task_id__in=ids, status=SCHEDULED, scheduled_id=None).count()
        == 5
    )
    assert scheduler.forward_due(celery_app).sent == 5
    assert sorted(drain(celery_app, HELD)) == sorted(ids)


def broker_fails_after(celery_app, monkeypatch, sends: int) -> None:
    """Make every producer's ``publish`` raise a connection error after ``sends`` messages."""
    from kombu import Producer

    original = Producer.publish
    calls = []

    def flaky_publish(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > sends:
            raise ConnectionResetError("broker went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Producer, "publish", flaky_publish)


def test_broker_failing_in_the_middle_of_a_batch(patched, celery_app, monkeypatch):
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(6)]
    time.sleep(0.3)
    broker_fails_after(celery_app, monkeypatch, 2)
    outcome = scheduler.forward_due(celery_app)
    monkeypatch.undo()
    assert (outcome.sent, outcome.released) == (2, 4)
    assert scheduler.forward_due(celery_app).sent == 4
    received = drain(celery_app, HELD)
    assert sorted(received) == sorted(ids) and len(received) == len(set(received))


def test_broker_failing_while_the_next_batch_is_claimed_ahead(patched, celery_app, monkeypatch):
    """forward_due claims batch N+1 while it publishes batch N: when the broker fails,
    the batch claimed ahead goes back too, and nothing stays claimed."""
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(7)]
    time.sleep(0.3)
    broker_fails_after(celery_app, monkeypatch, 2)
    outcome = scheduler.forward_due(celery_app, batch_size=2)
    monkeypatch.undo()
    # Batch 1 sent; batch 2 failed on its first row; batch 3 was claimed ahead.
    assert (outcome.claimed, outcome.sent, outcome.released) == (6, 2, 4)
    rows = TaskResultMeta.objects.filter(task_id__in=ids)
    assert rows.filter(status=SCHEDULED, scheduled_id=None).count() == 5  # none held
    assert scheduler.forward_due(celery_app, batch_size=2).sent == 5
    received = drain(celery_app, HELD)
    assert sorted(received) == sorted(ids) and len(received) == len(set(received))


def database_fails(
    monkeypatch, name: str, times: int = 1, when=lambda *a, **kw: True, committed: bool = True
) -> list:
    """Make ``claims.<name>`` raise OperationalError ``times`` times when ``when(...)`` holds:
    after its work (``committed``: the connection dropped after COMMIT, the answer was lost)
    or instead of it (the statement never reached the database)."""
    from django.db.utils import OperationalError

    original = getattr(claims, name)
    raised = []

    def dropped(*args, **kwargs):
        fails = len(raised) < times and when(*args, **kwargs)
        value = original(*args, **kwargs) if committed or not fails else None
        if fails:
            raised.append(args)
            raise OperationalError("server closed the connection unexpectedly")
        return value

    monkeypatch.setattr(claims, name, dropped)
    return raised


def assert_each_received_once(celery_app, ids: list[str]) -> None:
    received = drain(celery_app, HELD)
    assert sorted(received) == sorted(ids) and len(received) == len(set(received))


def test_a_claim_whose_answer_was_lost_is_given_back_when_the_database_answers(
    patched, celery_app, monkeypatch
):
    """The claim committed but the sender never heard: its rows would stay claimed (never
    sent) until an operator resends them. The sender remembers the token and gives them back."""
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(5)]
    time.sleep(0.3)
    database_fails(monkeypatch, "claim")
    with scheduler.Sender(celery_app) as sender:  # as run_scheduler keeps one
        with pytest.raises(Exception, match="closed the connection"):
            sender.forward_due()
        rows = TaskResultMeta.objects.filter(task_id__in=ids)
        assert rows.filter(status=SCHEDULED, scheduled_id__isnull=False).count() == 5
        assert sender.unrecorded == 1
        assert sender.forward_due().sent == 5
        assert sender.unrecorded == 0
    assert rows.filter(status=SCHEDULED_SENT).count() == 5
    assert_each_received_once(celery_app, ids)


def test_a_record_the_database_refused_is_made_later_and_nothing_is_sent_twice(
    patched, celery_app, monkeypatch
):
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(5)]
    time.sleep(0.3)
    failed = database_fails(monkeypatch, "mark_sent", committed=False)
    with scheduler.Sender(celery_app) as sender:
        with pytest.raises(Exception, match="closed the connection"):
            sender.forward_due(batch_size=2)
        assert len(failed) == 1
        rows = TaskResultMeta.objects.filter(task_id__in=ids)
        # The first batch reached the broker but its record did not reach the database.
        assert rows.filter(status=SCHEDULED, scheduled_id__isnull=False).count() == 2
        assert rows.filter(status=SCHEDULED_SENT).count() == 3
        assert sender.forward_due(batch_size=2).sent == 0
    assert rows.filter(status=SCHEDULED_SENT).count() == 5
    assert_each_received_once(celery_app, ids)


def test_a_sender_closing_records_what_an_outage_kept_it_from_recording(
    patched, celery_app, monkeypatch
):
    """A one-run sender (the beat task) settles its ledger before it closes."""
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(3)]
    time.sleep(0.3)
    database_fails(monkeypatch, "mark_sent", committed=False)
    with pytest.raises(Exception, match="closed the connection"):
        scheduler.forward_due(celery_app)
    assert TaskResultMeta.objects.filter(task_id__in=ids, status=SCHEDULED_SENT).count() == 3
    assert_each_received_once(celery_app, ids)


def test_broker_and_database_failing_together_strand_nothing(patched, celery_app, monkeypatch):
    """The broker fails mid-batch and the database refuses the releases (of the unsent rows
    and of the batch claimed ahead): the next pass gives them back, and each is sent once."""
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(7)]
    time.sleep(0.3)
    broker_fails_after(celery_app, monkeypatch, 2)
    database_fails(
        monkeypatch,
        "release",
        times=2,
        when=lambda using, token, ids=None: bool(ids),
        committed=False,
    )
    with scheduler.Sender(celery_app) as sender:
        with pytest.raises(Exception, match="closed the connection"):
            sender.forward_due(batch_size=2)
        monkeypatch.undo()
        rows = TaskResultMeta.objects.filter(task_id__in=ids)
        assert rows.filter(status=SCHEDULED_SENT).count() == 2
        assert rows.filter(status=SCHEDULED, scheduled_id__isnull=False).count() == 4
        assert sender.unrecorded == 2
        assert sender.forward_due(batch_size=2).sent == 5
    assert rows.filter(status=SCHEDULED_SENT).count() == 7
    assert_each_received_once(celery_app, ids)


@pytest.mark.skipif(STACK != "pg-rabbit", reason="publisher confirms are an AMQP feature")
def test_a_task_the_broker_refuses_is_not_marked_sent(patched, celery_app):
    """RabbitMQ nacks publishes to a full queue with overflow=reject-publish: those rows go
    back to SCHEDULED instead of claiming SCHEDULED_SENT."""
    from kombu import Queue

    name = queue_name("full")
    queue = Queue(name, queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    celery_app.amqp.queues.select_add(queue)
    try:
        with celery_app.connection_for_write() as conn:
            queue.bind(conn.default_channel).declare()
            queue.bind(conn.default_channel).purge()
        ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=name).id for i in range(3)]
        time.sleep(0.3)
        outcome = scheduler.forward_due(celery_app)
        assert (outcome.sent, outcome.released) == (1, 2)
        rows = TaskResultMeta.objects.filter(task_id__in=ids)
        assert rows.filter(status=SCHEDULED_SENT).count() == 1
        assert rows.filter(status=SCHEDULED, scheduled_id=None).count() == 2
        with celery_app.connection_for_write() as conn:
            declared = queue.bind(conn.default_channel).queue_declare(passive=True)
        assert declared.message_count == 1
    finally:
        with celery_app.connection_for_write() as conn:
            queue.bind(conn.default_channel).delete()


def test_stale_scheduled_tasks_command_and_resend(patched, celery_app):
    result = tasks.add.apply_async((1, 1), countdown=0.1, queue=HELD)
    time.sleep(0.2)
    # A sender claims the row and dies before publishing.
    claims.claim(db.task_db_alias(), uuid.uuid4(), 10)
    stale = TaskResultMeta.objects.get_stale_scheduled_tasks(datetime.timedelta(0))
    assert [r.task_id for r in stale] == [result.id]
    assert scheduler.forward_due(celery_app).claimed == 0  # never resent by itself
    out = io.StringIO()
    call_command("find_stale_scheduled_tasks", "--seconds=0", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "Stale scheduled tasks:" and result.id in lines[1]
    out = io.StringIO()
    call_command("find_stale_scheduled_tasks", "--json", stdout=out)
    assert json.loads(out.getvalue())[0]["task_id"] == result.id
    # A claim this young may be a live sender's batch in flight: --resend leaves it.
    err = io.StringIO()
    call_command("find_stale_scheduled_tasks", "--resend", stdout=io.StringIO(), stderr=err)
    assert "only claims older than" in err.getvalue()
    assert drain(celery_app, HELD) == []
    # Once the claim is older than the safe age, it is the dead sender's: resent.
    old = timezone.now() - scheduler.safe_resend_age() - datetime.timedelta(seconds=1)
    TaskResultMeta.objects.filter(task_id=result.id).update(date_claimed=old)
    call_command(
        "find_stale_scheduled_tasks", "--resend", stdout=io.StringIO(), stderr=io.StringIO()
    )
    assert drain(celery_app, HELD) == [result.id]
    assert row(result.id).status == SCHEDULED_SENT
    assert not TaskResultMeta.objects.get_stale_scheduled_tasks().exists()


@needs_beat
def test_setup_scheduler_beat_creates_the_periodic_task(db):
    from django_celery_beat.models import PeriodicTask

    call_command("setup_scheduler_beat", "--every=30", stdout=io.StringIO())
    call_command("setup_scheduler_beat", "--every=15", stdout=io.StringIO())
    entry = PeriodicTask.objects.get(task="django_celery_fulldbresult.tasks.send_scheduled_task")
    assert (entry.interval.every, entry.interval.period, entry.enabled) == (15, "seconds", True)
    assert entry.expire_seconds == 15


@pytest.mark.usefixtures("worker")
def test_send_scheduled_task_runs_on_a_worker(patched, celery_app):
    from django_celery_fulldbresult.tasks import send_scheduled_task

    result = tasks.add.apply_async((5, 5), countdown=0.2)
    time.sleep(0.3)
    send_scheduled_task.delay()
    assert result.get(timeout=20) == 10


def duplicates(ids: list[str]) -> list:
    return list(
        Run.objects.filter(task_id__in=ids)
        .values("task_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values_list("task_id", "n")
    )


def make_due(count: int, queue: str | None = None) -> list[str]:
    """``count`` SCHEDULED rows of ``record_run``, already due (as after a long wait)."""
    now = timezone.now()
    rows = [
        TaskResultMeta(
            task_id=str(uuid.uuid4()),
            task="testproject.demo.tasks.record_run",
            status=SCHEDULED,
            args=[],
            kwargs={},
            queue=queue,
            eta=now - datetime.timedelta(seconds=1),
            date_submitted=now,
            date_modified=now,
        )
        for _ in range(count)
    ]
    TaskResultMeta.objects.bulk_create(rows, batch_size=2000)
    return [r.task_id for r in rows]


def start_senders(tmp_path, count: int, extra: tuple[str, ...] = ()):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "FULLDB_TEST_DB": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(count):
        log = (tmp_path / f"sender{i}.log").open("w")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "testproject/manage.py",
                    "run_scheduler",
                    "--interval=0.2",
                    *extra,
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def stop(procs, sig=None):
    import os
    import signal

    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, sig or signal.SIGTERM)
    for proc in procs:
        proc.wait(30)


#: The subprocess workers' own queue: the in-thread ``worker`` of other tests (session
#: scoped) consumes the default queue and must not take these tasks.
RUNNER = queue_name("runner")

#: kombu's filesystem broker lists its folder for every message (quadratic in the
#: backlog), so the embedded stack runs the same scenario at a tenth of the size.
CONCURRENT_TASKS = 2_000 if STACK == "sqlite" else 20_000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_concurrent_senders_send_20000_tasks_exactly_once(worker_processes, tmp_path):
    ids = make_due(CONCURRENT_TASKS, RUNNER)
    worker_processes.start("runner", pool="prefork", concurrency=2, queues=RUNNER)
    senders = start_senders(tmp_path, 4, ("--batch-size=250",))
    try:
        wait_for(lambda: Run.objects.filter(task_id__in=ids).count() >= len(ids), 800, 1.0)
    finally:
        stop(senders)
    time.sleep(1)
    assert Run.objects.filter(task_id__in=ids).count() == len(ids)
    assert duplicates(ids) == []
    assert not TaskResultMeta.objects.filter(task_id__in=ids, status=SCHEDULED).exists()
    logs = [(tmp_path / f"sender{i}.log").read_text() for i in range(4)]
    assert sum("sent" in log for log in logs) >= 2, logs  # the work was really shared
    # No sender lost its turn to a lock: on SQLite a claim that read before it wrote was
    # refused the write lock at once ("database is locked") while another sender wrote.
    assert not any("locked" in log for log in logs), logs


@pytest.mark.slow
def test_sender_killed_mid_batch_never_duplicates(worker_processes, tmp_path, celery_app):
    """SIGKILL a sender while it publishes one big batch: nothing runs twice; every task
    either ran once or is still claimed and reported by get_stale_scheduled_tasks."""
    import signal

    ids = make_due(3000, RUNNER)
    worker_processes.start("runner", pool="prefork", concurrency=2, queues=RUNNER)
    [sender] = start_senders(tmp_path, 1, ("--batch-size=3000",))
    wait_for(lambda: Run.objects.filter(task_id__in=ids).exists(), 60)
    stop([sender], signal.SIGKILL)
    rows = TaskResultMeta.objects.filter(task_id__in=ids)
    stale = TaskResultMeta.objects.get_stale_scheduled_tasks().filter(task_id__in=ids)
    [again] = start_senders(tmp_path, 1)
    try:
        # Done when every row either finished or is a claim the killed sender left.
        wait_for(lambda: rows.exclude(status=states.SUCCESS).count() == stale.count(), 300, 0.5)
    finally:
        stop([again])
    # The live sender's own fresh claims (it claims the next batch ahead) also count as
    # stale with a zero delta: once it stopped, wait for what it sent to finish.
    wait_for(lambda: rows.exclude(status=states.SUCCESS).count() == stale.count(), 60, 0.5)
    ran = set(Run.objects.filter(task_id__in=ids).values_list("task_id", flat=True))
    left = set(stale.values_list("task_id", flat=True))
    assert duplicates(ids) == []
    assert ran | left == set(ids) and not ran & left
    assert len(left) < len(ids)  # the second sender did its part
    print(f"killed sender left {len(left)} claimed rows; {len(ran)} ran once")


def test_a_corrupt_stored_row_fails_alone_and_the_rest_of_its_batch_is_sent(patched, celery_app):
    """Found by the soak suite: one row whose stored JSON could not be decoded made the
    re-read of the claimed batch raise, so the whole batch stayed claimed and was never sent;
    and reading that row (admin, AsyncResult) raised too."""
    good = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(3)]
    corrupt = {
        "args": [{"__type__": "datetime", "__value__": "not a date"}],
        "kwargs": [1, 2],
        "options": "oops",
    }
    bad = {}
    for column, value in corrupt.items():
        bad[column] = tasks.add.apply_async((0, 0), countdown=0.2, queue=HELD).id
        TaskResultMeta.objects.filter(task_id=bad[column]).update(**{column: value})
    time.sleep(0.3)
    outcome = scheduler.forward_due(celery_app)
    assert (outcome.sent, outcome.failed) == (3, 3)
    assert sorted(drain(celery_app, HELD)) == sorted(good)
    for column, task_id in bad.items():
        stored = row(task_id)
        assert stored.status == states.FAILURE
        assert "cannot forward the scheduled task" in stored.traceback
        assert column in stored.traceback or "decode" in stored.traceback
    assert all(row(task_id).status == SCHEDULED_SENT for task_id in good)
    # Reading the corrupt row (model instance, AsyncResult) works: the bad value as stored.
    assert row(bad["args"]).args == corrupt["args"]
    assert celery_app.AsyncResult(bad["args"]).state == states.FAILURE


def test_run_scheduler_once_exits_with_an_error_instead_of_looping(patched, monkeypatch):
    """Found by the soak suite: ``run_scheduler --once`` retried a failing pass forever."""
    from django.core.management.base import CommandError

    def broken(*args, **kwargs):
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(scheduler.Sender, "forward_due", broken)
    with pytest.raises(CommandError, match="database unreachable"):
        call_command("run_scheduler", "--once", stdout=io.StringIO(), stderr=io.StringIO())
