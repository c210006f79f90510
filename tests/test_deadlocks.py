"""A store chosen as a deadlock victim is run again, not lost: the soak suite's load
scenario saw a worker's STARTED store on MariaDB end the task FAILURE (0 runs) with
``Deadlock found when trying to get lock``. Here the deadlock is made on purpose, on the real
server: another transaction holds a shared lock on the row, the backend's upsert waits for
it, then that transaction updates the row; InnoDB rolls back the smaller one, the store."""

from __future__ import annotations

import threading
import uuid

import pytest
from celery import states
from django.db import connections, transaction

from django_celery_fulldbresult.models import TaskResultMeta

from .conftest import STACK, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(STACK != "maria-redis", reason="InnoDB's choice of victim (MariaDB)"),
]


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


def _waiting_for_a_lock() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
        )
        return cursor.fetchone()[0]
