"""Dropped connections and database restarts do not lose results."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
from celery import states
from django.db import OperationalError, connection, connections

from django_celery_fulldbresult import db
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import requires_postgresql, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgresql]


def terminate(pid: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_store_after_the_server_dropped_the_connection(celery_app):
    """The server ends our session between two stores: the next store reconnects."""
    backend = celery_app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    dedicated = connections[db.write_alias()]
    terminate(dedicated.connection.info.backend_pid)
    backend.store_result(task_id, 5, states.SUCCESS)
    assert TaskResultMeta.objects.get(task_id=task_id).status == states.SUCCESS
    assert backend.get_task_meta(task_id, cache=False)["result"] == 5


def _pg_cluster() -> tuple[str, str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return version, "main"


def _restart_postgresql() -> None:
    version, cluster = _pg_cluster()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart", "-m", "fast"],
        check=True,
        timeout=60,
    )


def _count_success(ids: list[str]) -> int:
    while True:
        try:
            return TaskResultMeta.objects.filter(task_id__in=ids, status=states.SUCCESS).count()
        except OperationalError:
            connection.close()
            time.sleep(0.2)


@pytest.mark.slow
def test_postgresql_restart_during_stores_loses_nothing(worker_processes):
    """A worker process stores results while PostgreSQL restarts (fast shutdown kills every
    session); with result_backend_always_retry every result still arrives."""
    worker_processes.start("restart", pool="prefork", concurrency=2)
    results = [tasks.sleep.delay(0.02) for _ in range(300)]
    ids = [r.id for r in results]
    wait_for(lambda: _count_success(ids) >= 30, 60)
    _restart_postgresql()
    connection.close()
    db.close_all()
    wait_for(lambda: _count_success(ids) == len(ids), 120, interval=0.5)
    log = worker_processes.procs[0].log_path.read_text()
    assert "Retrying" in log or "retrying on a new connection" in log
