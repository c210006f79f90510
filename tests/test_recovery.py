"""Recovering the tasks of a lost worker: resend, fail or report (recovery.py).

The lost worker is simulated at its edge (a RECEIVED/STARTED row naming a worker with no
heartbeat) and, once, for real: a worker process SIGKILLed mid-task. The resent messages are
run by real workers on the real broker.
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from billiard.exceptions import WorkerLostError
from celery import chord, states
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.utils import timezone

from django_celery_fulldbresult import checks, db, recovery
from django_celery_fulldbresult.models import TaskResultMeta, WorkerHeartbeat
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import HELD, a_worker_commits_after_reads, queue_name, take_messages, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

AGE = timedelta(minutes=5)
RECORD_RUN = tasks.record_run.name


def runs(task_id: str) -> int:
    return Run.objects.filter(task_id=task_id).count()


def lost(
    celery_app,
    signature=None,
    status: str = states.STARTED,
    hostname: str = "dead@host",
    age: timedelta = timedelta(minutes=10),
) -> str:
    """A task whose worker died while it held it: published (its row written by publish
    tracking, as in production), its message gone with the worker, the row left RECEIVED or
    STARTED naming a worker that sends no heartbeat."""
    signature = signature if signature is not None else tasks.record_run.s(7)
    result = signature.apply_async(queue=HELD)
    take_messages(celery_app, HELD)
    queue = celery_app.conf.task_default_queue
    then = timezone.now() - age
    TaskResultMeta.objects.filter(task_id=result.id).update(
        status=status,
        hostname=hostname,
        queue=queue,
        routing_key=queue,
        date_started=then if status == states.STARTED else None,
        date_modified=then,
    )
    return result.id


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


@pytest.fixture
def policy(settings):
    def set_policy(value, pattern: str = "*") -> None:
        settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = {pattern: value}

    return set_policy


# -- the policy --------------------------------------------------------------------------


def test_policy_task_attribute_then_setting_then_report(celery_app, settings, monkeypatch):
    assert recovery.policy_for(celery_app, RECORD_RUN) == "report"
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = [
        ("testproject.demo.tasks.record_*", "fail"),
        ("*", "resend"),
    ]
    assert recovery.policy_for(celery_app, RECORD_RUN) == "fail"  # first match wins
    assert recovery.policy_for(celery_app, tasks.add.name) == "resend"
    assert recovery.policy_for(celery_app, "not.registered") == "resend"
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = {"testproject.*": "report"}
    assert recovery.policy_for(celery_app, tasks.add.name) == "report"
    monkeypatch.setattr(tasks.add, "recover", "resend", raising=False)
    assert recovery.policy_for(celery_app, tasks.add.name) == "resend"  # the task's own
    monkeypatch.setattr(tasks.add, "recover", "retry", raising=False)
    with pytest.raises(ImproperlyConfigured, match=r"testproject.demo.tasks.add.recover.*'retry'"):
        recovery.policy_for(celery_app, tasks.add.name)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"*": "again"}, "must be one of 'resend', 'fail', 'report', not 'again'"),
        ([("*",)], "is not a (pattern, policy) pair"),
        ("resend", "must be a dict or a sequence"),
    ],
)
def test_a_bad_policy_setting_is_refused_and_checked(settings, celery_app, value, message):
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = value
    with pytest.raises(ImproperlyConfigured) as refused:
        recovery.policy_rules()
    assert message in str(refused.value)
    errors = checks.check_recovery_policies()
    assert [error.id for error in errors] == ["django_celery_fulldbresult.E002"]
    assert message in errors[0].msg
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = {"*": "resend"}
    assert checks.check_recovery_policies() == []


# -- each policy, the dead worker at its edge --------------------------------------------


def test_resend_runs_the_task_again_once(worker, celery_app, policy):
    policy("resend", RECORD_RUN)
    task_id = lost(celery_app)
    before = row(task_id)
    outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert outcome.resent == [task_id] and outcome.counts["resent"] == 1
    assert outcome.sends[task_id] in ("sent", "not claimed")
    assert celery_app.AsyncResult(task_id).get(timeout=30) == 7
    assert runs(task_id) == 1
    after = row(task_id)
    assert after.status == states.SUCCESS and after.retries == before.retries
    assert after.meta["recovered"]["action"] == "resent"  # what the admin's meta shows
    assert after.hostname != "dead@host"
    # Nothing left to recover: a second pass sends nothing.
    assert recovery.recover_stale(celery_app, max_age=AGE).counts["resent"] == 0
    assert runs(task_id) == 1


def test_resend_through_a_sender_the_caller_keeps(worker, celery_app, policy):
    """A running sender passes its own ``Sender``: no connection of the call's own."""
    from django_celery_fulldbresult import db, scheduler

    policy("resend")
    task_id = lost(celery_app)
    with scheduler.Sender(celery_app, db.task_db_alias()) as sender:
        outcome = recovery.recover_stale(celery_app, max_age=AGE, sender=sender)
        assert outcome.resent == [task_id] and outcome.sends == {task_id: "sent"}
    assert celery_app.AsyncResult(task_id).get(timeout=30) == 7
    assert runs(task_id) == 1


def test_a_pass_takes_at_most_its_limit_oldest_first(celery_app, policy):
    policy("fail")
    newer = lost(celery_app, age=timedelta(minutes=10))
    older = lost(celery_app, age=timedelta(minutes=20))
    assert recovery.recover_stale(celery_app, max_age=AGE, limit=1).failed == [older]
    assert recovery.recover_stale(celery_app, max_age=AGE, limit=1).failed == [newer]


def test_fail_records_a_worker_lost_error(celery_app, policy):
    policy("fail")
    task_id = lost(celery_app)
    outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert outcome.failed == [task_id]
    with pytest.raises(WorkerLostError, match="worker lost: dead@host stopped"):
        celery_app.AsyncResult(task_id).get(timeout=5)
    failed = row(task_id)
    assert failed.status == states.FAILURE and failed.date_done is not None
    assert "recovered by the scheduler's sender" in failed.traceback
    assert failed.meta["recovered"]["action"] == "failed"
    assert failed.scheduled_id is None


def test_report_leaves_the_row_and_lists_it(celery_app, caplog):
    task_id = lost(celery_app)
    before = row(task_id)
    with caplog.at_level("INFO", logger="django_celery_fulldbresult.recovery"):
        outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert outcome.reported == [task_id] and not outcome.acted
    after = row(task_id)
    assert (after.status, after.hostname, after.date_modified) == (
        before.status,
        before.hostname,
        before.date_modified,
    )
    assert task_id in caplog.text and "reported 1" in caplog.text
    many = recovery.RecoveryResult(failed=[f"id{n}" for n in range(60)])
    assert many.summary(limit=2) == "failed 60 [id0, id1, ... 58 more]"
    assert many.summary(limit=None).count("id") == 60


def test_received_of_a_task_that_tracks_its_start_is_always_resent(worker, celery_app):
    """Never started (the worker writes STARTED before it runs a task): safe to send again
    whatever the policy ("report" here)."""
    task_id = lost(celery_app, status=states.RECEIVED)
    assert recovery.recover_stale(celery_app, max_age=AGE).resent == [task_id]
    assert celery_app.AsyncResult(task_id).get(timeout=30) == 7
    assert runs(task_id) == 1


def test_received_without_start_tracking_follows_the_policy(celery_app, monkeypatch):
    monkeypatch.setattr(tasks.record_run, "track_started", False)
    task_id = lost(celery_app, status=states.RECEIVED)
    assert recovery.recover_stale(celery_app, max_age=AGE).reported == [task_id]


def test_not_replayable_is_never_resent(celery_app, policy):
    policy("resend")
    task_id = lost(celery_app)
    TaskResultMeta.objects.filter(task_id=task_id).update(replayable=False)  # e.g. secret
    outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert outcome.not_replayable == [task_id] and not outcome.resent
    assert row(task_id).status == states.STARTED


def test_a_live_worker_and_a_young_row_are_left_alone(celery_app, policy):
    policy("fail")
    WorkerHeartbeat.objects.create(hostname="alive@host", last_seen=timezone.now())
    running = lost(celery_app, hostname="alive@host")
    young = lost(celery_app, age=timedelta(minutes=1))
    outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert outcome.counts == dict.fromkeys(recovery.RecoveryResult.OUTCOMES, 0)
    assert {row(running).status, row(young).status} == {states.STARTED}


def test_nothing_is_recovered_without_heartbeats(celery_app, policy, settings):
    policy("fail")
    task_id = lost(celery_app)
    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 0
    assert not recovery.recover_stale(celery_app, max_age=AGE).failed
    assert row(task_id).status == states.STARTED


def test_a_failed_chord_part_fails_its_chord(celery_app, policy):
    policy("fail")
    header = [tasks.record_run.s(1), tasks.record_run.s(2)]
    result = chord(header, queue=HELD)(tasks.tsum.s().set(queue=HELD))
    take_messages(celery_app, HELD)
    parts = [part.id for part in result.parent.results]
    queue = celery_app.conf.task_default_queue
    TaskResultMeta.objects.filter(task_id__in=parts).update(
        status=states.STARTED,
        hostname="dead@host",
        queue=queue,
        date_modified=timezone.now() - timedelta(hours=1),
    )
    assert sorted(recovery.recover_stale(celery_app, max_age=AGE).failed) == sorted(parts)
    body = row(result.id)
    assert body.status == states.FAILURE
    assert "WorkerLostError" in str(body.result)


def test_a_result_stored_between_recoverys_read_and_its_write(worker, celery_app, policy):
    """Recovery reads the live workers, then changes the lost rows. A worker stores results
    all the time; here a real worker's SUCCESS is committed right after each read of the
    live workers. On SQLite (Django's default deferred transactions, WAL) a transaction
    that read and then writes is refused at once ("database is locked", no busy wait) when
    another connection committed in between: the read must come before the transaction,
    whose first statement then writes (CI, Django 6.1 on SQLite, while the session's worker
    wrote)."""
    policy("fail")
    task_id = lost(celery_app)
    heartbeats = WorkerHeartbeat._meta.db_table
    with a_worker_commits_after_reads(db.write_alias(), heartbeats) as stored:
        outcome = recovery.recover_stale(celery_app, max_age=AGE)
    assert stored and set(stored) == {5}
    assert outcome.failed == [task_id]
    assert row(task_id).status == states.FAILURE


# -- the guard: rows that moved on are left alone ----------------------------------------


def test_a_recoverer_with_an_old_read_acts_on_nothing(worker, celery_app, policy):
    """Two senders (or a sender and an operator) read the same lost row: one resends it,
    the other's transition finds it moved on and sends nothing (the task runs once)."""
    policy("resend")
    task_id = lost(celery_app)
    read_by_the_slow_one = recovery.lost_rows(None, AGE)
    assert recovery.recover_stale(celery_app, max_age=AGE).resent == [task_id]
    assert celery_app.AsyncResult(task_id).get(timeout=30) == 7
    late = recovery.resend(recovery.Scope(celery_app, AGE), read_by_the_slow_one)
    assert late.moved_on == [task_id] and not late.resent and not late.sends
    late = recovery.mark_failed(recovery.Scope(celery_app, AGE), read_by_the_slow_one)
    assert late.moved_on == [task_id] and not late.failed
    assert row(task_id).status == states.SUCCESS
    assert runs(task_id) == 1


def test_a_row_read_in_one_state_is_not_acted_on_in_another(celery_app):
    """Read RECEIVED; meanwhile another worker took it and died too (STARTED): still lost,
    but not as it was read; the next pass decides again."""
    task_id = lost(celery_app, status=states.RECEIVED)
    read = recovery.lost_rows(None, AGE)
    TaskResultMeta.objects.filter(task_id=task_id).update(
        status=states.STARTED, hostname="dead-too@host"
    )
    assert recovery.mark_failed(recovery.Scope(celery_app, AGE), read).moved_on == [task_id]
    assert row(task_id).status == states.STARTED


def test_a_row_a_live_worker_took_meanwhile_is_left_to_it(celery_app):
    """Read STARTED on a dead worker; meanwhile a live worker took the same attempt (the
    broker redelivered it): same state, same attempt, but no longer lost."""
    task_id = lost(celery_app)
    read = recovery.lost_rows(None, AGE)
    WorkerHeartbeat.objects.create(hostname="alive@host", last_seen=timezone.now())
    TaskResultMeta.objects.filter(task_id=task_id).update(
        hostname="alive@host", date_modified=timezone.now()
    )
    assert recovery.mark_failed(recovery.Scope(celery_app, AGE), read).moved_on == [task_id]
    assert recovery.resend(recovery.Scope(celery_app, AGE), read).moved_on == [task_id]
    assert row(task_id).status == states.STARTED


def test_recovery_refuses_a_zero_age(celery_app, settings):
    for age in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="positive"):
            recovery.recover_stale(celery_app, max_age=age)
        with pytest.raises(ValueError, match="positive"):
            TaskResultMeta.objects.recoverable(age)
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER_AFTER = 0
    assert recovery.recover_after() is None
    with pytest.raises(ValueError, match="RECOVER_AFTER is 0: off"):
        recovery.recover_stale(celery_app)
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER_AFTER = 600
    task_id = lost(celery_app, age=timedelta(minutes=9))
    assert recovery.recover_stale(celery_app).reported == []  # younger than RECOVER_AFTER
    TaskResultMeta.objects.filter(task_id=task_id).update(
        date_modified=timezone.now() - timedelta(minutes=11)
    )
    assert recovery.recover_stale(celery_app).reported == [task_id]


# -- the command -------------------------------------------------------------------------


def test_command_resend(worker, celery_app):
    task_id = lost(celery_app)
    out, err = io.StringIO(), io.StringIO()
    call_command("find_stale_tasks", "--minutes=5", "--resend", stdout=out, stderr=err)
    assert task_id in out.getvalue()  # listed
    assert f"resent 1 [{task_id}]" in err.getvalue()
    assert "resent 1, marked failed 0" in err.getvalue()
    assert celery_app.AsyncResult(task_id).get(timeout=30) == 7
    assert runs(task_id) == 1
    assert row(task_id).meta["recovered"]["by"] == "manage.py find_stale_tasks --resend"


def test_command_mark_failed(celery_app):
    task_id = lost(celery_app)
    err = io.StringIO()
    call_command(
        "find_stale_tasks", "--minutes=5", "--mark-failed", stdout=io.StringIO(), stderr=err
    )
    assert "marked failed 1" in err.getvalue()
    with pytest.raises(WorkerLostError, match="find_stale_tasks --mark-failed"):
        celery_app.AsyncResult(task_id).get(timeout=5)


def test_command_refuses_no_age_both_actions_and_no_heartbeats(celery_app, settings):
    task_id = lost(celery_app)
    for action in ("--resend", "--mark-failed"):
        with pytest.raises(CommandError, match="needs an age"):
            call_command("find_stale_tasks", action, stdout=io.StringIO())
        with pytest.raises(CommandError, match="needs an age"):
            call_command("find_stale_tasks", action, "--minutes=0", stdout=io.StringIO())
    with pytest.raises(CommandError, match="not allowed with"):
        call_command("find_stale_tasks", "--minutes=5", "--resend", "--mark-failed")
    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 0
    with pytest.raises(CommandError, match="needs worker heartbeats"):
        call_command("find_stale_tasks", "--minutes=5", "--mark-failed", stdout=io.StringIO())
    assert row(task_id).status == states.STARTED


# -- a real worker killed mid-task ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy_name", ["resend", "fail", "report"])
def test_a_worker_killed_mid_task_under_each_policy(
    worker_processes, celery_app, settings, policy_name
):
    """A worker process is SIGKILLed while it runs a task; once its heartbeat stops, the
    task's policy applies: resent (a new worker runs it, SUCCESS, once more), failed
    (WorkerLostError), or reported (left STARTED)."""
    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 1
    settings.DJANGO_CELERY_FULLDBRESULT_RECOVER = {tasks.record_then_sleep.name: policy_name}
    fast_beat = {"FULLDB_HEARTBEAT": "1"}
    queue = queue_name("lost")
    doomed = worker_processes.start("doomed", pool="solo", queues=queue, env=fast_beat)
    result = tasks.record_then_sleep.apply_async((60,), queue=queue)
    wait_for(lambda: result.state == states.STARTED and runs(result.id) == 1, 30)  # mid-task
    worker_processes.kill(doomed)
    age = timedelta(seconds=1)
    wait_for(lambda: recovery.lost_rows(None, age), 15)
    if policy_name == "resend":
        worker_processes.start("replacement", pool="solo", queues=queue, env=fast_beat)
    outcome = recovery.recover_stale(celery_app, max_age=age)
    if policy_name == "resend":
        assert outcome.resent == [result.id]
        assert result.get(timeout=30) == 60
        assert runs(result.id) == 2  # the killed run, and the one resent
        assert row(result.id).hostname.startswith("replacement@")
    elif policy_name == "fail":
        assert outcome.failed == [result.id]
        with pytest.raises(WorkerLostError, match="worker lost: doomed@"):
            result.get(timeout=5)
    else:
        assert outcome.reported == [result.id]
        assert row(result.id).status == states.STARTED and runs(result.id) == 1
