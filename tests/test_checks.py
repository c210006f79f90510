"""The package's Django system checks (django_celery_fulldbresult/checks.py,
docs/ref/checks.rst): each check fires on the mistake it is for, through Django's own
``run_checks`` / ``manage.py check``, and the test project's settings raise none.

The app missing from INSTALLED_APPS, unapplied migrations, the beat integration without
django-celery-beat and the MySQL isolation level are also shown on a user project
(userproject/) run in a subprocess, as a user runs it."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import django
import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, beat, checks, scheduler
from django_celery_fulldbresult.installation import E_NOT_INSTALLED
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .beat_support import INSTALLED as BEAT_INSTALLED
from .beat_support import needs_beat
from .conftest import HELD, QUEUE_PREFIX, REPO, STACK, a_worker_commits_after_reads
from .test_publish_tracking import drain

USERPROJECT = REPO / "userproject"
TAG = checks.TAG


def ours(databases: list[str] | None = None) -> list[str]:
    """The ids of the package's check messages, as ``manage.py check [--database ...]``
    reports them."""
    return sorted(
        message.id
        for message in run_checks(databases=databases)
        if message.id.startswith(f"{checks.APP}.") and not message.is_silenced()
    )


def overdue_rows_left() -> bool:
    return checks._overdue("default") is not None


# -- the test project is clean ------------------------------------------------------------


@pytest.mark.django_db
def test_the_test_projects_settings_raise_nothing():
    expected = ["django_celery_fulldbresult.W002"] if overdue_rows_left() else []
    assert ours() == []
    assert ours(["default"]) == expected
    # manage.py check as the suite's settings run it (fails on any message of ours).
    call_command("check", tag=[TAG], fail_level="INFO")
    # With the database checks (Django's own include models.W037 on MariaDB: the task
    # table's partial indexes are plain indexes there): no error.
    call_command("check", databases=["default"])


# -- E001, W003: beat features without django-celery-beat -----------------------------------


def user_project(tmp_path: Path, settings: str, *command: str) -> subprocess.CompletedProcess:
    """Run ``command`` in userproject/ with its settings plus ``settings`` (a module that
    starts with ``from shopsite.settings import *``)."""
    module = tmp_path / "checked_settings.py"
    module.write_text(
        "from shopsite.settings import *  # noqa: F403\n\n" + textwrap.dedent(settings)
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FULLDB_", "DJANGO_", "CELERY_", "PYTHONPATH"))
    }
    base = os.environ.get("FULLDB_DB_NAME", "fulldbresult")
    env.update(
        DJANGO_SETTINGS_MODULE="checked_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(USERPROJECT)]),
        FULLDB_STACK=STACK,
        FULLDB_DB_NAME=f"{base}_checks",
        FULLDB_QUEUE=f"{QUEUE_PREFIX}_checks",
    )
    if "FULLDB_VAR_DIR" in os.environ:
        env["FULLDB_VAR_DIR"] = os.environ["FULLDB_VAR_DIR"]
    if "FULLDB_REDIS_DB" in os.environ:
        env["FULLDB_REDIS_DB"] = os.environ["FULLDB_REDIS_DB"]
    return subprocess.run(
        command if command[0].endswith("celery") else [sys.executable, *command],
        cwd=USERPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_override_beat_admin_without_beat_in_installed_apps(tmp_path):
    """userproject/ does not list django_celery_beat: OVERRIDE_BEAT_ADMIN would do nothing."""
    run = user_project(
        tmp_path, "DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN = True\n", "manage.py", "check"
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output  # a warning: the admin works without it
    assert "(django_celery_fulldbresult.W003)" in output, output
    if BEAT_INSTALLED:
        assert "'django_celery_beat' is not in INSTALLED_APPS" in output, output
        assert "Add 'django_celery_beat' to INSTALLED_APPS" in output, output
    else:  # Django 6.1: pip does not install django-celery-beat 2.9 there
        assert django.VERSION[:2] >= beat.UNSUPPORTED_DJANGO
        assert f"no release supports Django {django.get_version()}" in output, output
        assert "HINT: Remove DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN" in output, output

    silenced = user_project(
        tmp_path,
        "DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN = True\n"
        'SILENCED_SYSTEM_CHECKS = ["django_celery_fulldbresult.W003"]\n',
        "manage.py",
        "check",
    )
    assert "W003" not in silenced.stdout + silenced.stderr


def test_beat_database_scheduler_without_django_celery_beat_is_an_error(tmp_path):
    """The scheduler is on in userproject/; beat configured with django-celery-beat's
    scheduler cannot start there: an error, every management command refuses to run."""
    run = user_project(
        tmp_path,
        'CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"\n',
        "manage.py",
        "check",
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "(django_celery_fulldbresult.E001)" in output, output
    assert "run_scheduler" in output, output


@needs_beat
def test_django_celery_beat_on_a_django_it_does_not_declare(tmp_path):
    """W004. django-celery-beat 2.9 declares Django<6.1; on Django 6.1 pip does not install
    it, but a project may have forced it. Here a copy of its metadata declaring that it does
    not support the running Django is put first on the path (what the check reads)."""
    major, minor = django.VERSION[:2]
    real = importlib.metadata.distribution("django-celery-beat")
    info = tmp_path / f"django_celery_beat-{real.version}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        "Metadata-Version: 2.1\nName: django-celery-beat\n"
        f"Version: {real.version}\nRequires-Dist: Django<{major}.{minor},>=2.2\n"
    )
    settings = 'INSTALLED_APPS = [*INSTALLED_APPS, "django_celery_beat"]\n'
    run = user_project(tmp_path, settings, "manage.py", "check")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "(django_celery_fulldbresult.W004)" in output, output
    assert f"declares Django<{major}.{minor}" in output, output
    assert f"this is Django {django.get_version()}" in output, output

    info.joinpath("METADATA").write_text(
        "Metadata-Version: 2.1\nName: django-celery-beat\n"
        f"Version: {real.version}\nRequires-Dist: Django<{major + 1}.0,>=2.2\n"
    )
    run = user_project(tmp_path, settings, "manage.py", "check")
    assert "W004" not in run.stdout + run.stderr, run.stdout + run.stderr


# -- item 1: the app missing from INSTALLED_APPS ------------------------------------------

NO_APP = """
INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_celery_fulldbresult"]
"""


def test_app_missing_from_installed_apps_is_refused_at_first_use(tmp_path):
    """Django runs the checks of installed apps only, and the project imports nothing of
    ours until Celery loads the backend: ``manage.py check`` cannot see it (documented).
    The web process's first result read and a worker's start say what to do instead of
    a RuntimeError about a model class."""
    check = user_project(tmp_path, NO_APP, "manage.py", "check")
    assert check.returncode == 0, check.stdout + check.stderr  # the documented limit

    read = user_project(
        tmp_path,
        NO_APP,
        "manage.py",
        "shell",
        "-c",
        "from celery.result import AsyncResult; AsyncResult('some-id').state",
    )
    assert read.returncode != 0
    assert "django.core.exceptions.ImproperlyConfigured: " + E_NOT_INSTALLED in read.stderr, (
        read.stderr[-3000:]
    )
    assert "RuntimeError" not in read.stderr, read.stderr[-3000:]

    celery = str(Path(sys.executable).with_name("celery"))
    worker = user_project(tmp_path, NO_APP, celery, "-A", "shopsite", "worker", "-P", "solo")
    assert worker.returncode != 0
    assert "ImproperlyConfigured: " + E_NOT_INSTALLED in worker.stderr, worker.stderr[-3000:]


# -- W001: migrations not applied -----------------------------------------------------------


def fresh_database(name: str) -> None:
    """An empty database of that name on the stack's server (a new file on SQLite)."""
    if STACK == "sqlite":
        var = Path(os.environ.get("FULLDB_VAR_DIR", "/tmp"))
        var.joinpath(f"{name}.sqlite3").unlink(missing_ok=True)
        return
    if STACK == "pg-rabbit":
        import psycopg

        with psycopg.connect(host="127.0.0.1", user="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return
    import MySQLdb

    conn = MySQLdb.connect(host="127.0.0.1", user="root")
    try:
        cursor = conn.cursor()
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


def test_unapplied_migrations_are_reported_by_check_database_and_migrate(tmp_path):
    base = os.environ.get("FULLDB_DB_NAME", "fulldbresult")
    fresh_database(f"{base}_checks")
    warning = "(django_celery_fulldbresult.W001)"

    plain = user_project(tmp_path, "", "manage.py", "check")
    assert warning not in plain.stdout + plain.stderr  # a database check: asked for only

    run = user_project(tmp_path, "", "manage.py", "check", "--database", "default")
    output = run.stdout + run.stderr
    assert run.returncode == 0 and warning in output, output
    assert "0001_v1_schema" in output and "manage.py migrate django_celery_fulldbresult" in output

    # Half way: only what is left is named.
    migrate = user_project(tmp_path, "", "manage.py", "migrate", "django_celery_fulldbresult")
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    # migrate's own checks run first: they do not tell it to do what it is doing.
    assert warning not in migrate.stdout + migrate.stderr
    *_, before_last, last = sorted(
        path.stem for path in (REPO / "django_celery_fulldbresult" / "migrations").glob("0*.py")
    )
    user_project(tmp_path, "", "manage.py", "migrate", "django_celery_fulldbresult", before_last)
    run = user_project(tmp_path, "", "manage.py", "check", "--database", "default")
    output = run.stdout + run.stderr
    assert "1 migration(s)" in output and last in output, output
    assert "0001_v1_schema" not in output, output

    user_project(tmp_path, "", "manage.py", "migrate")
    run = user_project(tmp_path, "", "manage.py", "check", "--database", "default")
    assert warning not in run.stdout + run.stderr, run.stderr
    # userproject/ forwards delayed tasks from its tests only: no sender is configured.
    assert "(django_celery_fulldbresult.I001)" in run.stdout + run.stderr, run.stderr


# -- W002, I001: delayed tasks with nothing forwarding them -------------------------------


@pytest.mark.django_db(transaction=True)
def test_overdue_delayed_tasks_are_reported_until_a_sender_forwards_them(
    patched, celery_app, settings
):
    settings.CELERY_BEAT_SCHEDULE = {}
    result = tasks.scheduled_add.apply_async((2, 3), countdown=3600, queue=HELD)
    assert TaskResultMeta.objects.get(task_id=result.id).status == SCHEDULED
    assert "django_celery_fulldbresult.W002" not in ours(["default"])  # not due yet

    # An hour later, and nothing forwarded it (the row's eta moved back instead).
    TaskResultMeta.objects.filter(task_id=result.id).update(
        eta=timezone.now() - checks.OVERDUE_AFTER - timedelta(seconds=1)
    )
    assert ours(["default"]) == ["django_celery_fulldbresult.W002"]
    assert ours() == []  # a database check

    # A sender's pass (what run_scheduler does every second): the warning is gone.
    assert scheduler.forward_due(celery_app).sent == 1
    assert drain(celery_app, HELD) == [result.id]
    assert "django_celery_fulldbresult.W002" not in ours(["default"])


@pytest.mark.django_db
def test_no_sender_configured_is_an_info_that_evidence_of_a_sender_removes(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
    settings.CELERY_BEAT_SCHEDULE = {}
    assert ours() == []  # never in a plain check (runserver, worker start)
    assert ours(["default"]) == ["django_celery_fulldbresult.I001"]
    with pytest.raises(SystemCheckError, match="I001"):
        call_command("check", databases=["default"], fail_level="INFO")
    call_command("check", databases=["default"])  # an info fails nothing

    settings.CELERY_BEAT_SCHEDULE = {
        "forward": {"task": beat.SENDER_TASK, "schedule": 60.0},
    }
    assert ours(["default"]) == []

    settings.CELERY_BEAT_SCHEDULE = {}
    settings.SILENCED_SYSTEM_CHECKS = [
        *settings.SILENCED_SYSTEM_CHECKS,
        "django_celery_fulldbresult.I001",
    ]
    assert ours(["default"]) == []  # a project running run_scheduler silences it


@needs_beat
@pytest.mark.django_db
def test_a_periodic_task_running_the_sender_counts_as_a_sender(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_MONKEY_PATCH_ASYNC = True
    settings.CELERY_BEAT_SCHEDULE = {}
    assert ours(["default"]) == ["django_celery_fulldbresult.I001"]
    entry, _created = beat.install_scheduler_entry(every=60)
    assert ours(["default"]) == []
    entry.enabled = False
    entry.save()
    assert ours(["default"]) == ["django_celery_fulldbresult.I001"]


@needs_beat
@pytest.mark.django_db(transaction=True)
def test_the_beat_entry_is_installed_while_a_worker_stores_results(worker):
    """``setup_scheduler_beat`` reads the beat entry and its interval, then writes them
    (``get_or_create``, ``update_or_create``); a worker commits a result after each read.
    On SQLite that refused the write at once ("database is locked"); now the transaction
    takes the write lock first (``db.writing_first``), and the worker commits after it."""
    from django_celery_beat.models import PeriodicTask

    with a_worker_commits_after_reads("default", "django_celery_beat_"):
        call_command("setup_scheduler_beat", stdout=io.StringIO())
        call_command("setup_scheduler_beat", "--every", "30", stdout=io.StringIO())
    entry = PeriodicTask.objects.get(name=beat.ENTRY_NAME)
    assert entry.enabled and entry.interval.every == 30


# -- W005: MySQL/MariaDB isolation level ---------------------------------------------------


#: The isolation tests add an alias that is never connected to DATABASES (Django warns).
quiet_databases_override = pytest.mark.filterwarnings(
    "ignore:Overriding setting DATABASES:UserWarning"
)


def mysql_database(**options) -> dict:
    return {
        "ENGINE": "django.db.backends.mysql",
        "NAME": "never_connected",
        "HOST": "127.0.0.1",
        "OPTIONS": options,
    }


@quiet_databases_override
@pytest.mark.parametrize(
    ("options", "warned"),
    [
        ({}, False),  # Django's default: read committed
        ({"isolation_level": "read committed"}, False),
        ({"isolation_level": "READ COMMITTED"}, False),
        ({"isolation_level": "repeatable read"}, True),
        ({"isolation_level": "serializable"}, True),
        ({"isolation_level": None}, True),  # the server's default
    ],
)
def test_isolation_level_of_a_mysql_task_database(settings, options, warned):
    """Read from settings: no connection is made (the alias is never connected)."""
    settings.DATABASES = {**settings.DATABASES, "tasks": mysql_database(**options)}
    settings.DJANGO_CELERY_FULLDBRESULT_DATABASE = "tasks"
    assert ours() == (["django_celery_fulldbresult.W005"] if warned else [])


@quiet_databases_override
def test_isolation_level_of_the_package_connection_alias(settings):
    settings.DATABASES = {
        **settings.DATABASES,
        "tasks": mysql_database(),
        "tasks_autocommit": mysql_database(isolation_level="repeatable read"),
    }
    settings.DJANGO_CELERY_FULLDBRESULT_DATABASE = "tasks"
    settings.DJANGO_CELERY_FULLDBRESULT_CONNECTION = "tasks_autocommit"
    messages = [m for m in run_checks(tags=[TAG]) if m.id.endswith("W005")]
    assert len(messages) == 1 and "'tasks_autocommit'" in messages[0].msg


@pytest.mark.skipif(STACK != "maria-redis", reason="needs MariaDB (FULLDB_STACK=maria-redis)")
def test_isolation_level_on_mariadb(tmp_path):
    """On the server: the level the check reads is the one sessions get (Django sets it from
    OPTIONS), so userproject/'s read committed is clean and repeatable read is reported."""
    query = textwrap.dedent(
        """
        from django.db import connection
        with connection.cursor() as cursor:
            try:  # MySQL 8, MariaDB 11.1+; older MariaDB: tx_isolation
                cursor.execute("SELECT @@session.transaction_isolation")
            except Exception:
                cursor.execute("SELECT @@session.tx_isolation")
            print("level:", cursor.fetchone()[0])
        """
    )
    clean = user_project(tmp_path, "", "manage.py", "check")
    assert "W005" not in clean.stdout + clean.stderr
    level = user_project(tmp_path, "", "manage.py", "shell", "-c", query)
    assert "level: READ-COMMITTED" in level.stdout, level.stdout + level.stderr

    repeatable = 'DATABASES["default"]["OPTIONS"]["isolation_level"] = "repeatable read"\n'
    run = user_project(tmp_path, repeatable, "manage.py", "check")
    assert "(django_celery_fulldbresult.W005)" in run.stdout + run.stderr, run.stderr
    level = user_project(tmp_path, repeatable, "manage.py", "shell", "-c", query)
    assert "level: REPEATABLE-READ" in level.stdout, level.stdout + level.stderr


def test_default_database_isolation_level_of_this_stack():
    """The suite's own MariaDB settings are read committed (the clean test covers them)."""
    if connections["default"].vendor != "mysql":
        pytest.skip("not MySQL/MariaDB")
    assert "django_celery_fulldbresult.W005" not in ours()


# -- W006: every result ignored, with publish tracking -------------------------------------


def test_publish_tracking_with_every_result_ignored(settings, celery_app):
    # On the Celery app's configuration (where CELERY_TASK_IGNORE_RESULT ends up): a test
    # that set it there earlier would otherwise hide a change of the Django setting.
    changes = celery_app.conf.changes
    before = changes.get("task_ignore_result", KeyError)
    celery_app.conf.task_ignore_result = True
    try:
        assert ours() == ["django_celery_fulldbresult.W006"]
        settings.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = False
        assert ours() == []
        settings.DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = True
        celery_app.conf.task_ignore_result = False
        assert ours() == []
    finally:
        if before is KeyError:
            changes.pop("task_ignore_result", None)
        else:
            changes["task_ignore_result"] = before


@pytest.mark.django_db(transaction=True)
def test_what_w006_says_publish_tracking_writes_no_row_for_an_ignored_result(celery_app):
    drain(celery_app, HELD)
    ignored = tasks.add.apply_async((1, 2), queue=HELD, ignore_result=True)
    kept = tasks.add.apply_async((1, 2), queue=HELD)
    assert sorted(drain(celery_app, HELD)) == sorted([ignored.id, kept.id])  # both sent
    assert not TaskResultMeta.objects.filter(task_id=ignored.id).exists()
    assert TaskResultMeta.objects.filter(task_id=kept.id).exists()


pytestmark = pytest.mark.timeout(300)
