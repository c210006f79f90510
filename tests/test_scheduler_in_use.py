"""The ETA scheduler the way users run it: retries inside ``atomic()``, transactions that
roll back, results nobody wants, values JSON cannot hold, chord members cancelled or
expired, ``AsyncResult.revoke()``, a long-lived sender's connections, async code, and a
process with more than one Celery app."""

from __future__ import annotations

import asyncio
import datetime
import math
import time
import uuid

import pytest
from asgiref.sync import async_to_sync
from celery import Celery, chord, states
from celery.exceptions import ChordError, TaskRevokedError
from django.db import transaction
from django.db.backends.signals import connection_created
from django.test import AsyncClient
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, db, replay, scheduler
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import claims
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import HELD, STACK, requires_server_db, take_messages, wait_for
from .test_scheduler import forward, row

pytestmark = pytest.mark.django_db(transaction=True)


def drain(app, queue: str = HELD) -> list[str]:
    return [message.headers["id"] for message in take_messages(app, queue)]


def runs(task_id: str) -> int:
    return Run.objects.filter(task_id=task_id).count()


# -- transactions --------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_retry_raised_inside_atomic_is_never_lost(patched, celery_app):
    """The task retries from inside ``transaction.atomic()``: the exception rolls that
    transaction back, and the retry must survive it (3 runs, then FAILURE)."""
    result = tasks.retry_in_atomic.delay()
    forward(celery_app, until=lambda: runs(result.id) == 3, timeout=30)
    with pytest.raises(RuntimeError, match="attempt 2"):
        result.get(timeout=20)
    stored = row(result.id)
    assert (stored.status, stored.retries) == (states.FAILURE, 2)


def test_a_delayed_call_is_not_bound_to_the_callers_transaction(patched, celery_app):
    """By default the row is committed at once, like a message handed to the broker: a
    rollback of the caller does not take it back."""
    with pytest.raises(RuntimeError), transaction.atomic():
        TaskResultMeta.objects.create(task_id=str(uuid.uuid4()))  # the caller's own writes
        result = tasks.add.apply_async((1, 1), countdown=0.2, queue=HELD)
        raise RuntimeError("the caller rolls back")
    if STACK == "sqlite":
        # SQLite's one writer cannot commit beside the caller: the broker keeps the ETA.
        assert not TaskResultMeta.objects.filter(task_id=result.id, status=SCHEDULED).exists()
        assert drain(celery_app) == [result.id]
        return
    assert row(result.id).status == SCHEDULED
    time.sleep(0.3)
    assert scheduler.forward_due(celery_app).sent == 1
    assert drain(celery_app) == [result.id]


def test_db_schedule_false_keeps_the_brokers_eta(patched, celery_app):
    result = tasks.add.apply_async((1, 1), countdown=3600, queue=HELD, db_schedule=False)
    assert not TaskResultMeta.objects.filter(task_id=result.id, status=SCHEDULED).exists()
    [message] = take_messages(celery_app, HELD)
    assert message.headers["id"] == result.id and message.headers["eta"]
    assert "db_schedule" not in message.headers and "db_schedule" not in message.properties


def test_db_schedule_false_holds_for_a_scheduled_task_of_an_installed_app(patched, celery_app):
    """``ScheduledTask`` on an app with interception installed: one decision, the app's."""
    result = tasks.scheduled_add.apply_async((1, 1), countdown=3600, queue=HELD, db_schedule=False)
    assert not TaskResultMeta.objects.filter(task_id=result.id, status=SCHEDULED).exists()
    assert drain(celery_app) == [result.id]


def test_send_now_in_a_transaction_that_rolls_back_sends_once(patched, celery_app):
    """The admin's Send now under ATOMIC_REQUESTS: the request's transaction rolls back
    after the publish. The claim and its record are not part of it: no second send."""
    result = tasks.add.apply_async((1, 1), countdown=3600, queue=HELD)
    if STACK == "sqlite":
        with transaction.atomic(), pytest.raises(transaction.TransactionManagementError):
            scheduler.send_now(celery_app, [result.id])
        return
    with pytest.raises(RuntimeError), transaction.atomic():
        assert scheduler.send_now(celery_app, [result.id]) == {result.id: "sent"}
        raise RuntimeError("the request fails after the action")
    TaskResultMeta.objects.filter(task_id=result.id).update(eta=timezone.now())
    assert scheduler.forward_due(celery_app).sent == 0
    assert drain(celery_app) == [result.id]


@requires_server_db
def test_forward_due_in_a_transaction_that_rolls_back_sends_once(patched, celery_app):
    result = tasks.add.apply_async((1, 1), countdown=0.2, queue=HELD)
    time.sleep(0.3)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert scheduler.forward_due(celery_app).sent == 1
        raise RuntimeError("the caller rolls back")
    assert scheduler.forward_due(celery_app).sent == 0
    assert drain(celery_app) == [result.id]


# -- what the row becomes --------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_a_delayed_task_whose_result_is_ignored_leaves_no_row(patched, celery_app):
    result = tasks.record_ignored.apply_async(("x",), countdown=0.2)
    assert row(result.id).status == SCHEDULED
    forward(celery_app, until=lambda: runs(result.id) == 1)
    time.sleep(0.5)
    assert not TaskResultMeta.objects.filter(task_id=result.id).exists()
    assert not TaskResultMeta.objects.get_stale_tasks(datetime.timedelta(0)).filter(
        task_id=result.id
    )


@pytest.mark.usefixtures("worker")
def test_values_json_cannot_hold_are_forwarded_exactly_and_never_pickled(patched, celery_app):
    """NaN, Infinity and NUL travel in JSON task messages but not in JSON columns: they are
    kept as the message's own JSON, forwarded exactly, and retried from the admin."""
    args, kwargs = ("a\x00b", math.inf, -math.inf), {"ratio": math.nan}
    result = tasks.echo.apply_async(args, kwargs, countdown=0.2)
    stored = row(result.id)
    assert stored.packed_args_content_type == "application/json"
    forward(celery_app, until=lambda: row(result.id).status != SCHEDULED)
    returned = result.get(timeout=20)
    assert returned["args"] == list(args) and math.isnan(returned["kwargs"]["ratio"])
    [copy] = replay.retry(celery_app, [row(result.id)])
    assert copy.error is None, copy.error
    copied = celery_app.AsyncResult(copy.new_id).get(timeout=20)
    assert copied["args"] == list(args) and math.isnan(copied["kwargs"]["ratio"])


# -- revoking ------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_a_delayed_chord_member_that_never_runs_fails_the_chord(patched, celery_app, how):
    """Cancelled or expired before it was sent, a header member reports to its chord, as a
    worker does for a revoked task: the chord fails, its errbacks run, nothing hangs."""
    delay = {"countdown": 1}
    if how == "expire":
        delay["expires"] = timezone.now() + datetime.timedelta(seconds=0.5)
    body = tasks.tsum.s().on_error(tasks.record_run.si("errback"))
    result = chord([tasks.add.s(1, 1).set(**delay), tasks.add.s(2, 2)])(body)
    waiting = TaskResultMeta.objects.filter(status=SCHEDULED, group_id=result.parent.id)
    wait_for(lambda: waiting.exists())
    if how == "cancel":
        assert scheduler.cancel_scheduled(waiting.get().task_id, celery_app)
    else:
        time.sleep(1.2)
        assert scheduler.forward_due(celery_app).expired == 1
    detached = celery_app.AsyncResult(result.id)  # e.g. an id kept in a database row
    with pytest.raises(ChordError, match="TaskRevokedError"):
        detached.get(timeout=15)
    assert row(result.id).status == states.FAILURE
    wait_for(lambda: Run.objects.exists())  # the body's errback


def test_revoke_of_a_waiting_task_guarantees_it_never_runs(patched, celery_app):
    """``AsyncResult.revoke()`` with no worker up: the row is REVOKED at once, never sent."""
    result = tasks.add.apply_async((1, 1), countdown=0.2, queue=HELD)
    result.revoke()
    assert row(result.id).status == states.REVOKED
    time.sleep(0.3)
    assert scheduler.forward_due(celery_app).claimed == 0
    assert drain(celery_app) == []
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)


@pytest.mark.usefixtures("worker")
def test_a_task_revoked_while_a_sender_holds_it_never_runs(patched, celery_app):
    """The revoke lands while a sender is publishing the row: the message goes out, and
    the worker that receives it refuses it."""
    result = tasks.record_run.apply_async(("x",), countdown=0.2)
    time.sleep(0.3)
    token = uuid.uuid4()
    claimed = claims.claim(db.task_db_alias(), token, 10)
    assert [r["task_id"] for r in claimed] == [result.id]
    result.revoke()
    with scheduler.Sender(celery_app) as sender:
        published = sender.publisher.publish(claimed, token)
        assert published.sent == [claimed[0]["id"]]
        sender.database.run(sender.record, published)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=15)
    time.sleep(1)
    assert runs(result.id) == 0 and row(result.id).status == states.REVOKED


# -- connections -----------------------------------------------------------------------


def test_a_long_lived_sender_keeps_its_connections(patched, celery_app):
    """run_scheduler's sender: one database and one broker connection, not one per pass."""
    opened = []

    def count(sender, connection, **kwargs):
        opened.append(connection.alias)

    connection_created.connect(count, weak=False)
    try:
        with scheduler.Sender(celery_app) as sender:
            for _ in range(20):  # idle passes
                sender.forward_due()
            for i in range(5):  # a due task each
                tasks.add.apply_async((i, i), countdown=0.05, queue=HELD)
                time.sleep(0.1)
                assert sender.forward_due().sent == 1
            publisher = getattr(sender, "publisher", None)
    finally:
        connection_created.disconnect(count)
    assert len(opened) <= 1, opened  # the sender's database thread, once
    assert publisher.connections_opened == 1
    assert len(drain(celery_app)) == 5


# -- async code, other apps --------------------------------------------------------------


def test_apply_async_from_async_code_schedules_and_tracks(patched, celery_app):
    async def view_like() -> tuple[str, str]:
        delayed = tasks.add.apply_async((1, 2), countdown=3600, queue=HELD)
        now = tasks.add.apply_async((3, 4), queue=HELD)
        return delayed.id, now.id

    delayed, now = asyncio.run(view_like())
    assert row(delayed).status == SCHEDULED
    assert row(now).status == states.PENDING  # publish tracking wrote it
    assert drain(celery_app) == [now]


def test_an_async_view_schedules_and_tracks(patched, celery_app):
    response = async_to_sync(AsyncClient().get)("/demo/send-tasks/", {"queue": HELD})
    ids = response.json()
    assert row(ids["delayed"]).status == SCHEDULED
    assert row(ids["now"]).status == states.PENDING
    assert drain(celery_app) == [ids["now"]]


def test_only_the_installed_app_is_changed_and_it_is_not_finalized(patched, celery_app):
    other = Celery("other", set_as_current=False)
    other.config_from_object("django.conf:settings", namespace="CELERY")
    sent = other.send_task("testproject.demo.tasks.add", (1, 1), countdown=3600, queue=HELD)
    assert not TaskResultMeta.objects.filter(task_id=sent.id, status=SCHEDULED).exists()
    assert drain(celery_app) == [sent.id]  # the other app kept Celery's behaviour
    assert Celery.send_task.__module__ == "celery.app.base"

    fresh = Celery("fresh", set_as_current=False)
    fresh.config_from_object("django.conf:settings", namespace="CELERY")
    scheduler.install(fresh)
    try:
        held = fresh.send_task("testproject.demo.tasks.add", (1, 1), countdown=3600, queue=HELD)
        assert row(held.id).status == SCHEDULED
        assert not fresh.finalized  # sending by name does not finalize the app
    finally:
        scheduler.uninstall(fresh)
    assert drain(celery_app) == []


@requires_server_db
def test_a_long_lived_sender_reopens_a_broker_connection_closed_while_it_was_idle(
    patched, celery_app
):
    """A broker restart while ``run_scheduler`` waits for the next eta: its idle connection
    is dead. The next batch must go out on a new connection, not into the dead one (where
    its messages would never be confirmed and their rows would stay claimed)."""
    from kombu import Connection

    from soak.faultproxy import FaultProxy

    port = Connection(celery_app.conf.broker_url).port
    with FaultProxy(port) as proxy:
        through = Celery("through-proxy", set_as_current=False)
        through.config_from_object(celery_app.conf)
        through.conf.broker_url = celery_app.conf.broker_url.replace(f":{port}", f":{proxy.port}")
        with scheduler.Sender(through) as sender:
            first = tasks.add.apply_async((1, 1), countdown=0.1, queue=HELD)
            time.sleep(0.2)
            assert sender.forward_due().sent == 1
            proxy.drop_all()  # the broker went away and came back
            time.sleep(0.5)
            second = tasks.add.apply_async((2, 2), countdown=0.1, queue=HELD)
            time.sleep(0.2)
            outcome = sender.forward_due()
    assert (outcome.sent, outcome.released) == (1, 0), outcome
    assert not TaskResultMeta.objects.get_stale_scheduled_tasks().exists()
    assert sorted(drain(celery_app)) == sorted([first.id, second.id])


def test_an_async_view_keeps_no_session_of_ours_after_the_request(patched, celery_app):
    """ASGI: the helper thread that writes for async views follows Django's CONN_MAX_AGE
    (0 here) at the end of each request, as the request's own connection does."""

    def helpers_connection():
        def probe():
            own = db.own_connection()
            return own is not None and own.connection is not None

        return db._helper.submit(probe).result()

    response = async_to_sync(AsyncClient().get)("/demo/send-tasks/", {"queue": HELD})
    assert row(response.json()["delayed"]).status == SCHEDULED  # written by the helper
    wait_for(lambda: not helpers_connection(), 5)
    assert drain(celery_app) == [response.json()["now"]]
