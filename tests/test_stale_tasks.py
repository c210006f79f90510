"""What counts as stale, the command that lists it, and the index behind it."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta

import pytest
from celery import states
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT
from django_celery_fulldbresult.models import TaskResultMeta, WorkerHeartbeat

from .conftest import queue_name, requires_postgresql, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def make(status: str, age: timedelta, **fields) -> TaskResultMeta:
    return TaskResultMeta.objects.create(
        task_id=str(uuid.uuid4()),
        task=f"demo.{status.lower()}",
        status=status,
        date_modified=timezone.now() - age,
        **fields,
    )


def stale_ids(delta=timedelta(hours=1), acceptable=None) -> set[str]:
    return set(
        TaskResultMeta.objects.get_stale_tasks(delta, acceptable).values_list("task_id", flat=True)
    )


def test_stale_rules_per_state():
    old, young = timedelta(hours=2), timedelta(minutes=5)
    stale = {
        make(states.PENDING, old),
        make(states.RECEIVED, old),
        make(states.RETRY, old),
        make(SCHEDULED_SENT, old),
        make("PROGRESS", old),  # custom state with no update for too long
        make(states.STARTED, old, hostname="gone@host"),
        make(SCHEDULED, timedelta(days=3), eta=timezone.now() - old),  # never forwarded
    }
    fresh = {
        make(states.PENDING, young),
        make(states.STARTED, young, hostname="gone@host"),
        make(SCHEDULED, timedelta(days=3), eta=timezone.now() + timedelta(days=1)),
        make(states.SUCCESS, old, date_done=timezone.now() - old),
        make(states.FAILURE, old, date_done=timezone.now() - old),
        make(states.REVOKED, old, date_done=timezone.now() - old),
    }
    assert stale_ids() == {row.task_id for row in stale}
    assert not stale_ids() & {row.task_id for row in fresh}


def test_started_on_a_live_worker_is_not_stale(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 10
    long_task = make(states.STARTED, timedelta(hours=5), hostname="alive@host")
    lost_task = make(states.STARTED, timedelta(hours=5), hostname="dead@host")
    WorkerHeartbeat.objects.create(hostname="alive@host", last_seen=timezone.now())
    WorkerHeartbeat.objects.create(hostname="dead@host", last_seen=timezone.now() - timedelta(1))
    assert stale_ids() == {lost_task.task_id}
    # A worker that started before it took the row holds it; one restarted under the same
    # name since then does not (its former self took the row).
    held = make(states.STARTED, timedelta(hours=5), hostname="older@host")
    orphan = make(states.STARTED, timedelta(hours=5), hostname="reborn@host")
    for hostname, hours in (("older@host", 6), ("reborn@host", 1)):
        WorkerHeartbeat.objects.create(
            hostname=hostname,
            last_seen=timezone.now(),
            started=timezone.now() - timedelta(hours=hours),
        )
    assert stale_ids() == {lost_task.task_id, orphan.task_id}
    WorkerHeartbeat.objects.exclude(hostname="dead@host").update(
        last_seen=timezone.now() - timedelta(1)
    )  # nobody alive
    assert stale_ids() == {lost_task.task_id, long_task.task_id, held.task_id, orphan.task_id}
    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 0  # heartbeats off: age only
    assert stale_ids() == {lost_task.task_id, long_task.task_id, held.task_id, orphan.task_id}


def test_acceptable_states_are_added_to_the_final_ones():
    pending = make(states.PENDING, timedelta(hours=2))
    retry = make(states.RETRY, timedelta(hours=2))
    assert stale_ids(acceptable=[states.PENDING]) == {retry.task_id}
    assert stale_ids(acceptable=[]) == {pending.task_id, retry.task_id}
    assert stale_ids(timedelta(days=1)) == set()


def test_find_stale_tasks_prints_the_05x_format():
    row = make(states.PENDING, timedelta(hours=3))
    make(states.PENDING, timedelta(minutes=1))
    out = io.StringIO()
    call_command("find_stale_tasks", hours=1, stdout=out)
    lines = out.getvalue().splitlines()
    assert lines == ["Stale tasks:", f"  {row.date_modified} - {row.task_id}: {row.task}"]


def test_find_stale_tasks_options_and_json():
    pending = make(states.PENDING, timedelta(days=8))
    retry = make(states.RETRY, timedelta(days=8))
    out = io.StringIO()
    call_command("find_stale_tasks", "--weeks=1", "--terminal-state=PENDING", "--json", stdout=out)
    items = json.loads(out.getvalue())
    assert [item["task_id"] for item in items] == [retry.task_id]
    assert items[0]["status"] == states.RETRY and items[0]["task"] == retry.task
    out = io.StringIO()
    call_command("find_stale_tasks", "--days=9", stdout=out)
    assert out.getvalue().splitlines() == ["Stale tasks:", "  none"]
    out = io.StringIO()
    call_command("find_stale_tasks", "--minutes=1", "--seconds=1", "--microseconds=1", stdout=out)
    assert pending.task_id in out.getvalue() and retry.task_id in out.getvalue()


@requires_postgresql
def test_stale_query_uses_indexes_on_postgresql():
    """At scale the planner must not scan the table (the 1M-row timing is in bench/)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {TaskResultMeta._meta.db_table}
              (task_id, task, status, replayable, retries, date_modified, date_done)
            SELECT 'done-' || g, 'demo.add', 'SUCCESS', true, 0,
                   now() - interval '1 hour' * (g % 48), now() - interval '1 hour' * (g % 48)
            FROM generate_series(1, 200000) AS g
            """
        )
        cursor.execute(f"ANALYZE {TaskResultMeta._meta.db_table}")
    make(states.PENDING, timedelta(hours=3))
    sql, params = TaskResultMeta.objects.get_stale_tasks(timedelta(hours=1)).query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(r[0] for r in cursor.fetchall())
    assert "Seq Scan on django_celery_fulldbresult_taskresultmeta" not in plan, plan
    assert "fdr_unfinished_idx" in plan, plan


@pytest.mark.slow
def test_started_task_of_a_killed_worker_becomes_stale(worker_processes, settings):
    """A real worker process is SIGKILLed mid-task: its STARTED task turns stale once the
    worker's heartbeat stops; the task of a live worker running longer does not."""
    from testproject.demo import tasks

    settings.DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = 1
    fast_beat = {"FULLDB_HEARTBEAT": "1"}
    doomed = worker_processes.start(
        "doomed", pool="solo", concurrency=1, queues=queue_name("doomed"), env=fast_beat
    )
    alive = worker_processes.start(
        "alive", pool="solo", concurrency=1, queues=queue_name("alive"), env=fast_beat
    )
    lost = tasks.sleep.apply_async((60,), queue=queue_name("doomed"))
    running = tasks.sleep.apply_async((60,), queue=queue_name("alive"))
    for result in (lost, running):
        wait_for(lambda r=result: r.state == states.STARTED, 30)
    assert stale_ids(timedelta(0)) == set()
    worker_processes.kill(doomed)
    wait_for(lambda: lost.id in stale_ids(timedelta(0)), 15)
    assert running.id not in stale_ids(timedelta(0))
    row = TaskResultMeta.objects.get(task_id=lost.id)
    assert row.status == states.STARTED and row.hostname.startswith("doomed@")
    worker_processes.kill(alive)  # do not wait a minute for its task


def test_the_stale_commands_refuse_negative_ages_and_say_their_rule():
    for command in ("find_stale_tasks", "find_stale_scheduled_tasks", "task_stats"):
        with pytest.raises(CommandError, match="must be zero or more, not -1"):
            call_command(command, "--hours=-1")
    out, err = io.StringIO(), io.StringIO()
    call_command("find_stale_tasks", stdout=out, stderr=err)
    assert "No age given" in err.getvalue() and "every unfinished task counts" in err.getvalue()
