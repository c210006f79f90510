"""Database sessions of a real worker, per pool: a budget that does not grow with the
number of tasks. PostgreSQL counts a worker's sessions by application name (``PGAPPNAME``),
MariaDB by account (the worker logs in as a user of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import django
import pytest
from django.db import connections

from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks
from testproject.demo.models import Run

from .conftest import REPO, queue_name, requires_server_db, take_messages, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), requires_server_db, pytest.mark.slow]

#: Sessions a worker holds after its tasks, per pool and concurrency (docs/design.md).
BUDGETS = [
    # pool, concurrency, sessions: the worker's heartbeat thread has one, and each pool
    # process or thread its own; under gevent and eventlet one OS thread runs every
    # statement of the process, the heartbeat's too.
    ("prefork", 4, 5),
    ("threads", 4, 5),
    ("solo", 1, 2),
    ("gevent", 50, 1),
    ("eventlet", 50, 1),
]


def _session_env(name: str) -> dict[str, str]:
    """The worker's environment: its sessions carry ``name``."""
    connection = connections["default"]
    if connection.vendor == "postgresql":
        return {"PGAPPNAME": name}
    database = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE USER IF NOT EXISTS '{name}'@'%%'")
        cursor.execute(f"GRANT ALL ON `{database}`.* TO '{name}'@'%%'")
    return {"FULLDB_DB_USER": name}


def _sessions(name: str) -> int:
    connection = connections["default"]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]
            )
        else:
            cursor.execute(
                "SELECT count(*) FROM information_schema.processlist WHERE user = %s", [name]
            )
        return cursor.fetchone()[0]


@pytest.mark.parametrize(("pool", "concurrency", "budget"), BUDGETS)
def test_a_workers_sessions_do_not_grow_with_its_tasks(worker_processes, pool, concurrency, budget):
    queue = queue_name(f"sessions-{pool}")
    name = f"fulldb_sessions_{pool}"
    worker = worker_processes.start(
        f"sessions-{pool}",
        pool=pool,
        concurrency=concurrency,
        queues=queue,
        env=_session_env(name),
    )
    # Every process or thread of the pool runs a task first (as many half-second tasks as
    # it has, at once): 200 quick tasks may leave one of them idle, whose first task would
    # open its session in a later round (CI rehearsal 31, threads: 4 then 5 sessions).
    warm = [tasks.sleep.apply_async((0.5,), queue=queue) for _ in range(concurrency)]
    for result in warm:
        result.get(timeout=120)
    counts = []
    for _ in range(2):
        results = [tasks.add.apply_async((i, i), queue=queue) for i in range(200)]
        assert [result.get(timeout=120) for result in results] == [2 * i for i in range(200)]
        counts.append(_sessions(name))
    log = worker.log_path.read_text()[-3000:]
    assert counts[-1] <= budget, (counts, log)
    assert counts[-1] == counts[0], (counts, log)  # 200 more tasks, no more sessions


@pytest.mark.skipif(
    connections["default"].vendor != "postgresql" or django.VERSION < (5, 1),
    reason="Django's psycopg connection pool: PostgreSQL, Django 5.1+",
)
@pytest.mark.parametrize("reuse_max", ["", "1000"])
def test_a_worker_with_djangos_connection_pool(worker_processes, reuse_max):
    """OPTIONS["pool"]: the package's connection is drawn from the task database's pool
    (it is created from the alias's settings). Celery's fixup closes every connection, and
    under prefork the pool itself, after each task unless CELERY_DB_REUSE_MAX is set: the
    tasks, which query through Django's pooled connection too, still all run and store, and
    the sessions stay within the pools' sizes whatever the number of tasks."""
    queue = queue_name(f"pool-{reuse_max or 0}")
    name = f"fulldb_pool_{reuse_max or 0}"
    env = {**_session_env(name), "FULLDB_DB_POOL": "1", "FULLDB_DB_REUSE_MAX": reuse_max}
    worker = worker_processes.start(
        f"pool-{reuse_max or 0}", pool="prefork", concurrency=2, queues=queue, env=env
    )
    counts = []
    for _ in range(3):
        recorded = [tasks.record_run.apply_async((i,), queue=queue) for i in range(50)]
        added = [tasks.add.apply_async((i, i), queue=queue) for i in range(50)]
        assert [result.get(timeout=120) for result in recorded] == list(range(50))
        assert [result.get(timeout=120) for result in added] == [2 * i for i in range(50)]
        assert Run.objects.filter(task_id__in=[r.id for r in recorded]).count() == 50
        counts.append(_sessions(name))
    log = worker.log_path.read_text()[-3000:]
    # Three processes (the parent's heartbeat, two children), each a pool of at most 4.
    assert max(counts) <= 12, (counts, log)
    assert counts[2] <= counts[1], (counts, log)  # 100 more tasks, no more sessions
    assert "Traceback" not in worker.log_path.read_text(), log


def _session_ids(name: str) -> set[int]:
    connection = connections["default"]
    if connection.vendor == "postgresql":
        sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    else:
        sql = "SELECT id FROM information_schema.processlist WHERE user = %s"
    with connection.cursor() as cursor:
        cursor.execute(sql, [name])
        return {row[0] for row in cursor.fetchall()}


@pytest.mark.parametrize("max_age", [None, 1])
def test_a_worker_honours_conn_max_age(worker_processes, max_age):
    """CONN_MAX_AGE: the worker's connection is replaced at the end of a task once it is
    older; without it (0, Django's default) the worker keeps it (no connection per task)."""
    queue = queue_name(f"max-age-{max_age}")
    name = f"fulldb_max_age_{max_age or 0}"
    env = _session_env(name)
    if max_age:
        env["FULLDB_CONN_MAX_AGE"] = str(max_age)
    worker = worker_processes.start(
        f"max-age-{max_age}", pool="solo", concurrency=1, queues=queue, env=env
    )
    rounds = []
    for _ in range(3):
        results = [tasks.add.apply_async((i, i), queue=queue) for i in range(20)]
        assert [result.get(timeout=60) for result in results] == [2 * i for i in range(20)]
        rounds.append(_session_ids(name))
        time.sleep(1.5)
    log = worker.log_path.read_text()[-3000:]
    assert all(len(ids) <= 2 for ids in rounds), (rounds, log)
    if max_age:
        # The task's connection is replaced at the end of a task, the heartbeat thread's
        # after a beat (every 2 s in the testproject).
        assert rounds[0] != rounds[1] != rounds[2], (rounds, log)
    else:
        assert rounds[0] == rounds[1] == rounds[2], (rounds, log)  # kept


def test_a_threaded_web_server_keeps_no_idle_session_per_thread(celery_app, tmp_path):
    """A thread per request publishing with tracking on: with CONN_MAX_AGE = 0 no session
    of ours outlives its request (the review saw one more never-recycled session per
    publishing thread)."""
    name = "fulldb_web"
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "FULLDB_TEST_DB": "1", **_session_env(name)}
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "testproject.webserver", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    queue = queue_name("web")
    try:
        wait_for(lambda: "serving" in (tmp_path / "web.log").read_text(), 30)
        url = f"http://127.0.0.1:{port}/demo/publish/?queue={queue}"
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: json.load(urllib.request.urlopen(url))["id"], range(40)))
        assert len(set(ids)) == 40
        # Tracked: the rows are written behind, by the server process's one writer thread,
        # whose connection is closed once it has been idle a moment (CONN_MAX_AGE = 0).
        wait_for(lambda: TaskResultMeta.objects.filter(task_id__in=ids).count() == 40, 10)
        wait_for(lambda: _sessions(name) == 0, 10)
    finally:
        server.terminate()
        server.wait(10)
        take_messages(celery_app, queue)
