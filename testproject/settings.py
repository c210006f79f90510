"""Settings of the demo and test project.

``FULLDB_STACK`` selects the database and broker:

* ``sqlite`` (default): SQLite file + kombu's filesystem broker, no server needed;
* ``pg-rabbit``: PostgreSQL + RabbitMQ on 127.0.0.1;
* ``maria-redis``: MariaDB/MySQL + Redis on 127.0.0.1.

``FULLDB_TEST_DB=1`` points the project at the test database (used by the
worker processes that the tests start). ``FULLDB_DB_NAME``, ``FULLDB_VAR_DIR``,
``FULLDB_QUEUE`` and ``FULLDB_REDIS_DB`` keep concurrent runs apart.
``FULLDB_DB_PORT`` and ``FULLDB_BROKER_PORT`` point the project at another port
of 127.0.0.1 (the soak suite's fault proxies, see soak/faultproxy.py).
"""

import importlib.util
import os
from datetime import timedelta
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
VAR_DIR = Path(os.environ.get("FULLDB_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = "testproject-not-secret"
DEBUG = os.environ.get("FULLDB_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = os.environ.get("FULLDB_USE_TZ", "1") == "1"
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "django_celery_fulldbresult",
    "testproject.demo",
]
# django-celery-beat does not support Django 6.1 yet (2.9 declares Django<6.1): there it is
# not installed, and the beat integration's tests check the degraded behaviour instead.
if importlib.util.find_spec("django_celery_beat") is not None:
    INSTALLED_APPS.insert(INSTALLED_APPS.index("django_celery_results"), "django_celery_beat")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "testproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STACK = os.environ.get("FULLDB_STACK", "sqlite")
USE_TEST_DB = os.environ.get("FULLDB_TEST_DB") == "1"
DB_NAME = os.environ.get("FULLDB_DB_NAME", "fulldbresult")


def _database() -> dict:
    if STACK == "pg-rabbit":
        db = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DB_NAME,
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("FULLDB_DB_PORT", "5432"),
        }
    elif STACK == "maria-redis":
        db = {
            "ENGINE": "django.db.backends.mysql",
            "NAME": DB_NAME,
            # FULLDB_DB_USER: another account (tests count a worker's sessions by user).
            "USER": os.environ.get("FULLDB_DB_USER", "root"),
            "PASSWORD": "",
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("FULLDB_DB_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4", "isolation_level": "read committed"},
        }
    elif STACK == "sqlite":
        db = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / f"{DB_NAME}.sqlite3"),
            "OPTIONS": {"timeout": 30},
        }
    else:
        raise RuntimeError(f"unknown FULLDB_STACK {STACK!r}")
    test_name = f"test_{DB_NAME}"
    if STACK == "sqlite":
        test_name = str(VAR_DIR / f"test_{DB_NAME}.sqlite3")
    db["TEST"] = {"NAME": test_name}
    if USE_TEST_DB:
        db["NAME"] = test_name
    return db


DATABASES = {"default": _database()}
# A connection that died under a long-lived worker thread is replaced at its next use.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# FULLDB_CONN_MAX_AGE: Django's CONN_MAX_AGE (tests of connection recycling).
if os.environ.get("FULLDB_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["FULLDB_CONN_MAX_AGE"])
# FULLDB_CONNECTION_ALIAS=1: the package's own connection is a DATABASES alias of ours.
if os.environ.get("FULLDB_CONNECTION_ALIAS") == "1":
    DATABASES["fulldb_autocommit"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}
    DJANGO_CELERY_FULLDBRESULT_CONNECTION = "fulldb_autocommit"
# FULLDB_DB_POOL=1: Django 5.1+'s psycopg connection pool (PostgreSQL).
if os.environ.get("FULLDB_DB_POOL") == "1":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": 1, "max_size": 4}


def _broker() -> tuple[str, dict]:
    port = os.environ.get("FULLDB_BROKER_PORT")
    if STACK == "pg-rabbit":
        # FULLDB_CONFIRM_PUBLISH=1: publish returns once RabbitMQ has the message (without
        # it a publish in the instant the broker goes down is lost silently).
        confirm = os.environ.get("FULLDB_CONFIRM_PUBLISH") == "1"
        return f"amqp://guest:guest@127.0.0.1:{port or 5672}//", (
            {"confirm_publish": True} if confirm else {}
        )
    if STACK == "maria-redis":
        redis_db = os.environ.get("FULLDB_REDIS_DB", "7")
        options = {}
        if os.environ.get("FULLDB_VISIBILITY_TIMEOUT"):
            # Unacknowledged messages of a killed worker come back after this many seconds.
            options["visibility_timeout"] = float(os.environ["FULLDB_VISIBILITY_TIMEOUT"])
            # and kombu sweeps for them every second (default: every 10 x 10 s).
            options["unacked_restore_interval"] = 1
            options["unacked_restore_throttle"] = 1
        return f"redis://127.0.0.1:{port or 6379}/{redis_db}", options
    folder = Path(os.environ.get("FULLDB_BROKER_DIR", VAR_DIR / "broker"))
    for sub in ("queue", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    from testproject import fsbroker  # kombu's filesystem broker, with atomic writes

    fsbroker.register()
    return f"{fsbroker.SCHEME}://", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
    }


CELERY_BROKER_URL, CELERY_BROKER_TRANSPORT_OPTIONS = _broker()
# Separate queues let several test or benchmark runs share one RabbitMQ/Redis.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("FULLDB_QUEUE", "celery")
# FULLDB_BACKEND=django-db switches to django-celery-results (benchmarks compare the two).
if os.environ.get("FULLDB_BACKEND", "fulldb") == "django-db":
    CELERY_RESULT_BACKEND = "django-db"
    CELERY_RESULT_EXTENDED = True
else:
    CELERY_RESULT_BACKEND = "django_celery_fulldbresult.result_backends:DatabaseResultBackend"
# FULLDB_TRACK_STARTED=0: no STARTED write (benchmarks: one write per task).
CELERY_TASK_TRACK_STARTED = os.environ.get("FULLDB_TRACK_STARTED", "1") == "1"
CELERY_RESULT_EXPIRES = timedelta(days=1)
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
CELERY_RESULT_BACKEND_MAX_RETRIES = 30
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_ACKS_LATE = os.environ.get("FULLDB_ACKS_LATE") == "1"
CELERY_WORKER_PREFETCH_MULTIPLIER = int(os.environ.get("FULLDB_PREFETCH", "4"))
# Publishers fail within seconds when the broker is down instead of hanging.
CELERY_BROKER_CONNECTION_TIMEOUT = 4
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
# Keep Django's connections between tasks (the backend has its own anyway);
# FULLDB_DB_REUSE_MAX="" leaves Celery's default (close around every task).
if os.environ.get("FULLDB_DB_REUSE_MAX", "1000"):
    CELERY_DB_REUSE_MAX = int(os.environ.get("FULLDB_DB_REUSE_MAX", "1000"))

DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = True
# FULLDB_PREPARED_STATEMENTS=0 / FULLDB_RESULT_PUSH=0: those settings off (benchmarks' A/B).
if os.environ.get("FULLDB_PREPARED_STATEMENTS") == "0":
    DJANGO_CELERY_FULLDBRESULT_PREPARED_STATEMENTS = False
if os.environ.get("FULLDB_RESULT_PUSH") == "0":
    DJANGO_CELERY_FULLDBRESULT_RESULT_PUSH = False
# This suite tests the production connection model (a user's suite gets the test's own
# connection: see tests/test_user_project.py).
DJANGO_CELERY_FULLDBRESULT_DEDICATED_CONNECTION_IN_TESTS = True
# The PeriodicTask admin with "Run now" and links to the results.
DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN = True
# Without django-celery-beat (Django 6.1) the setting stays on, so that the suite tests the
# degraded admin: its system check warning (docs/ref/checks.rst) is silenced on purpose.
SILENCED_SYSTEM_CHECKS = []
if importlib.util.find_spec("django_celery_beat") is None:
    SILENCED_SYSTEM_CHECKS.append("django_celery_fulldbresult.W003")
DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT = float(os.environ.get("FULLDB_HEARTBEAT", "2"))
# The soak suite's senders take a killed sender's claims back sooner than the default.
if "FULLDB_RECLAIM_AFTER" in os.environ:
    DJANGO_CELERY_FULLDBRESULT_SCHEDULER_RECLAIM_AFTER = float(os.environ["FULLDB_RECLAIM_AFTER"])
DJANGO_CELERY_FULLDBRESULT_RUN_ONCE = os.environ.get("FULLDB_RUN_ONCE") == "1"
# The soak suite's senders recover a killed worker's tasks with one policy for every task
# (FULLDB_RECOVER: resend, fail or report), sooner than the default (FULLDB_RECOVER_AFTER).
if "FULLDB_RECOVER" in os.environ:
    DJANGO_CELERY_FULLDBRESULT_RECOVER = {"*": os.environ["FULLDB_RECOVER"]}
if "FULLDB_RECOVER_AFTER" in os.environ:
    DJANGO_CELERY_FULLDBRESULT_RECOVER_AFTER = float(os.environ["FULLDB_RECOVER_AFTER"])

# FULLDB_SCHEDULE_ETA=1: eta/countdown tasks wait in the database (all apps, monkey patch).
DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = os.environ.get("FULLDB_SCHEDULE_ETA") == "1"
DJANGO_CELERY_FULLDBRESULT_MONKEY_PATCH_ASYNC = os.environ.get("FULLDB_SCHEDULE_ETA") == "1"
if DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA:
    # The demo and the soak suite forward them with run_scheduler, which no check can see:
    # the info that no beat entry forwards them is silenced, as docs/ref/checks.rst says.
    SILENCED_SYSTEM_CHECKS.append("django_celery_fulldbresult.I001")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_celery_fulldbresult": {
            "handlers": ["console"],
            "level": os.environ.get("FULLDB_LOGLEVEL", "WARNING"),
        },
    },
}

# Django's Tasks framework (Django 6.0+, or the django-tasks backport) on the Celery workers:
# testproject/demo/jobs.py holds @task functions (tests/test_django_tasks.py).
HAS_DJANGO_TASKS = bool(
    importlib.util.find_spec("django.tasks") or importlib.util.find_spec("django_tasks")
)
if HAS_DJANGO_TASKS:
    TASKS = {
        "default": {
            "BACKEND": "django_celery_fulldbresult.django_tasks.CeleryBackend",
            "QUEUES": [
                "default",
                f"{CELERY_TASK_DEFAULT_QUEUE}-held",
                f"{CELERY_TASK_DEFAULT_QUEUE}-django-tasks",
                f"{CELERY_TASK_DEFAULT_QUEUE}-django-tasks-priority",
            ],
            "OPTIONS": {"CELERY_APP": "testproject.celery_app.app"},
        }
    }
    # Workers import the module (Celery's autodiscovery imports tasks.py modules only).
    CELERY_IMPORTS = ["testproject.demo.jobs"]
