"""A statement chosen as a deadlock victim is run again, not lost.

The soak suite's load scenario saw a worker's STARTED store on MariaDB end the task FAILURE
(0 runs) with ``Deadlock found when trying to get lock``; CI saw a sender's record of a
forwarded batch fail the same way (against the worker's receipt of a task of that batch).
Here each deadlock is made on purpose, on the real server: another transaction holds a lock
on a row, our statement waits for it, then that transaction asks for a row our statement
holds; the server rolls back one of the two, ours (InnoDB picks the smaller transaction,
PostgreSQL the one that waited first).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import states
from django.db import connections, transaction

from django_celery_fulldbresult import SCHEDULED_SENT, scheduler
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import claims
from testproject.demo import tasks

from .conftest import HELD, STACK, requires_server_db, wait_for
from .test_publish_tracking import drain

pytestmark = pytest.mark.django_db(transaction=True)
mariadb_only = pytest.mark.skipif(STACK != "maria-redis", reason="InnoDB's choice of victim")


@mariadb_only
def test_a_store_chosen_as_deadlock_victim_is_run_again(celery_app):
    backend = celery_app.backend
    task_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(task_id, None, states.PENDING)
    backend.store_result(other_id, None, states.PENDING)
    outcome: list[object] = []

    def store() -> None:
        try:
            backend.store_result(task_id, 42, states.SUCCESS)
            outcome.append("stored")
        except Exception as exc:  # noqa: BLE001 - what the worker would see
            outcome.append(exc)
        finally:
            connections.close_all()

    rows = TaskResultMeta.objects.using("default")
    with transaction.atomic(using="default"):
        rows.filter(task_id=other_id).update(hostname="bigger")  # makes us the bigger one
        with connections["default"].cursor() as cursor:  # a shared lock on the row
            cursor.execute(
                f"SELECT id FROM {TaskResultMeta._meta.db_table} WHERE task_id = %s "
                "LOCK IN SHARE MODE",
                [task_id],
            )
        writer = threading.Thread(target=store)
        writer.start()
        # INNODB_TRX is a cache refreshed when last read over 0.1 s ago: poll slower.
        wait_for(lambda: _waiting_for_a_lock() >= 1 or outcome, 10, interval=0.25)
        assert not outcome, outcome  # the store waits for our lock
        rows.filter(task_id=task_id).update(hostname="holder")  # the store is the victim
    writer.join(30)
    assert outcome == ["stored"], outcome
    assert celery_app.AsyncResult(task_id).get(timeout=5) == 42


@requires_server_db
def test_a_senders_record_chosen_as_deadlock_victim_is_run_again(patched, celery_app):
    """The sender marks a published batch SCHEDULED_SENT while another transaction holds
    one of its rows and then asks for another: the record is run again, not raised (the
    batch was forwarded; a raised record fails the sender's pass)."""
    ids = [tasks.add.apply_async((i, i), countdown=0.2, queue=HELD).id for i in range(2)]
    ballast = [tasks.add.apply_async((i, i), countdown=3600).id for i in range(20)]
    time.sleep(0.3)
    rows = TaskResultMeta.objects.using("default")
    first, last = rows.filter(task_id__in=ids).order_by("id").values_list("id", flat=True)
    outcome: list[object] = []
    with scheduler.Sender(celery_app) as sender:
        token = uuid.uuid4()
        claimed = sender.database.run(claims.claim, sender.using, token, 10)
        assert {row["id"] for row in claimed} == {first, last}
        published = sender.publisher.publish(claimed, token)
        assert sorted(published.sent) == [first, last]

        def record() -> None:
            try:
                sender.record(published)
                outcome.append("recorded")
            except Exception as exc:  # noqa: BLE001 - what the sender's pass would see
                outcome.append(exc)
            finally:
                connections.close_all()

        with transaction.atomic(using="default"):
            if STACK == "pg-rabbit":
                # PostgreSQL aborts the session whose deadlock check (deadlock_timeout after
                # it began to wait) finds the cycle; ours waits second, and on a loaded CI
                # machine more than the default 1 s later: it was chosen. Its check now comes
                # long after the record's.
                with connections["default"].cursor() as cursor:
                    cursor.execute("SET LOCAL deadlock_timeout = '60s'")
            rows.filter(task_id__in=ballast).update(hostname="bigger")  # the bigger one
            rows.filter(id=last).update(hostname="holder")  # the record waits for this row
            writer = threading.Thread(target=record)
            writer.start()
            wait_for(lambda: _waiting_for_a_lock() >= 1 or outcome, 10, interval=0.25)
            assert not outcome, outcome
            rows.filter(id=first).update(hostname="holder")  # held by the record: deadlock
        writer.join(30)
    assert outcome == ["recorded"], outcome
    assert set(rows.filter(id__in=[first, last]).values_list("status", flat=True)) == {
        SCHEDULED_SENT
    }
    assert sorted(drain(celery_app, HELD)) == sorted(ids)


def _waiting_for_a_lock() -> int:
    """Sessions waiting for a row lock."""
    if STACK == "pg-rabbit":
        statement = "SELECT count(*) FROM pg_locks WHERE NOT granted"
    else:
        statement = (
            "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
        )
    with connections["default"].cursor() as cursor:
        cursor.execute(statement)
        return cursor.fetchone()[0]
