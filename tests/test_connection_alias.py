"""DJANGO_CELERY_FULLDBRESULT_CONNECTION: the package's own connection as a DATABASES alias
of the project's (Django manages it), with what the built-in one gives: a publish inside
``atomic()`` does not stall the worker, a rollback keeps the record of a task really sent.
Run from a script outside Django's test environment, as a web process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from celery import states

from django_celery_fulldbresult.models import TaskResultMeta

from .conftest import REPO, queue_name, requires_server_db, take_messages

pytestmark = [pytest.mark.django_db(transaction=True), requires_server_db, pytest.mark.slow]

SCRIPT = """
import json, sys, time, uuid
import django
django.setup()
from django.db import connections, transaction
from django_celery_fulldbresult import db, publish
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

queue, nobody = sys.argv[1], sys.argv[2]
out = {}
with transaction.atomic():
    # Locks of the caller's own, as a request's transaction would hold.
    TaskResultMeta.objects.create(task_id=str(uuid.uuid4()), task="caller.own.row")
    result = tasks.add.apply_async((1, 2), queue=queue)
    started = time.monotonic()
    out["value"] = result.get(timeout=20)
    out["waited"] = time.monotonic() - started
out["ran"] = result.id
try:
    with transaction.atomic():
        out["rolled_back"] = tasks.add.apply_async((3, 4), queue=nobody).id
        raise RuntimeError("the caller rolls back")
except RuntimeError:
    pass
assert publish.flush()
out["write_alias"] = db.write_alias()
out["managed"] = sorted(c.alias for c in connections.all(initialized_only=True))
print("RESULT " + json.dumps(out))
"""


def _script_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "FULLDB_TEST_DB": "1", "PYTHONPATH": str(REPO), **extra}


def test_a_databases_alias_as_the_packages_connection(worker_processes, celery_app):
    queue, nobody = queue_name("alias"), queue_name("alias-nobody")
    env = {"FULLDB_CONNECTION_ALIAS": "1"}
    worker_processes.start("alias", pool="prefork", concurrency=2, queues=queue, env=env)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, queue, nobody],
        cwd=REPO,
        env={**_script_env(env), "DJANGO_SETTINGS_MODULE": "testproject.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert out["value"] == 3 and out["waited"] < 10  # the worker stored inside our atomic()
    assert out["write_alias"] == "fulldb_autocommit"
    assert "fulldb_autocommit" in out["managed"]  # a connection Django manages
    assert TaskResultMeta.objects.get(task_id=out["ran"]).status == states.SUCCESS
    kept = TaskResultMeta.objects.get(task_id=out["rolled_back"])  # sent, then rolled back
    assert kept.status == states.PENDING
    assert [m.headers["id"] for m in take_messages(celery_app, nobody)] == [out["rolled_back"]]


def test_a_configured_connection_must_be_the_task_database_in_autocommit():
    script = (
        "import django; django.setup()\n"
        "from django.conf import settings\n"
        "from django_celery_fulldbresult import db\n"
        "settings.DATABASES['fulldb_autocommit']['ATOMIC_REQUESTS'] = True\n"
        "db.write_alias()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={
            **_script_env({"FULLDB_CONNECTION_ALIAS": "1"}),
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "ImproperlyConfigured" in run.stderr and "ATOMIC_REQUESTS" in run.stderr
