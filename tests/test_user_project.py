"""A user's own test suite (userproject/: ``manage.py test`` and pytest-django, in a
subprocess, with no fixture of ours) on the selected stack: rows the backend, publish
tracking and the scheduler write are visible inside each test and gone after it, a store
to a row the test holds does not wait on itself, the test database is dropped cleanly,
and a TransactionTestCase with a real worker sees the worker's rows. Then the same project
with its task tables in a second database behind a read-replica router.

``FULLDB_USER_OWN_CONNECTION=1`` gives the project the package's own connection in tests
(1.0.0.dev0's behaviour): both runs below then fail (rows left over, ``database is
locked`` on SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import QUEUE_PREFIX, REPO, STACK

USERPROJECT = REPO / "userproject"


def _run(*command: str, **settings: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FULLDB_", "DJANGO_", "CELERY_"))
    }
    base = os.environ.get("FULLDB_DB_NAME", "fulldbresult")
    env.update(
        DJANGO_SETTINGS_MODULE="shopsite.settings",
        FULLDB_STACK=STACK,
        FULLDB_DB_NAME=f"{base}_user",
        FULLDB_QUEUE=f"{QUEUE_PREFIX}_user",
    )
    env.update(settings)
    if "FULLDB_VAR_DIR" in os.environ:
        env["FULLDB_VAR_DIR"] = os.environ["FULLDB_VAR_DIR"]
    return subprocess.run(
        [sys.executable, *command],
        cwd=USERPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _passed(run: subprocess.CompletedProcess) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "being accessed by other users" not in output, output[-6000:]


def test_manage_py_test():
    run = _run("manage.py", "test", "shop", "--noinput")
    _passed(run)
    # 11 tests, and the 4 routing tests skipped (Python 3.12+ does not count a skipped
    # class's tests as run: "Ran 11", before it "Ran 15").
    assert "OK (skipped=4)" in run.stderr, run.stderr[-3000:]
    assert "Ran 15 tests" in run.stderr or "Ran 11 tests" in run.stderr, run.stderr[-3000:]


def test_pytest_django():
    run = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "shop")
    _passed(run)
    assert "5 passed" in run.stdout


def test_a_task_database_of_its_own_behind_a_read_replica_router():
    """userproject/shop/test_routing.py: removing the managers' pin on the task database,
    or the router's allow_migrate, fails it."""
    run = _run("manage.py", "test", "shop.test_routing", "--noinput", FULLDB_USER_ROUTED="1")
    _passed(run)
    assert "Ran 4 tests" in run.stderr and "skipped" not in run.stderr, run.stderr[-3000:]


pytestmark = pytest.mark.timeout(300)
