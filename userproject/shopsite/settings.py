"""A user's settings: the task table in the project's database, publish tracking and the
database ETA scheduler on. ``FULLDB_STACK`` picks the database and broker as in the
testproject (``sqlite``: a file and Celery's in-memory broker); ``FULLDB_DB_NAME`` and
``FULLDB_QUEUE`` keep concurrent runs apart."""

import os
import tempfile
from pathlib import Path

SECRET_KEY = "userproject-not-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_celery_fulldbresult",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "shopsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STACK = os.environ.get("FULLDB_STACK", "sqlite")
NAME = os.environ.get("FULLDB_DB_NAME", "userproject")
VAR = Path(os.environ.get("FULLDB_VAR_DIR", tempfile.gettempdir()))

if STACK == "pg-rabbit":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": NAME,
            "USER": "postgres",
            "HOST": "127.0.0.1",
        }
    }
    CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
elif STACK == "maria-redis":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": NAME,
            "USER": "root",
            "HOST": "127.0.0.1",
            "OPTIONS": {"charset": "utf8mb4", "isolation_level": "read committed"},
        }
    }
    CELERY_BROKER_URL = "redis://127.0.0.1:6379/9"
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR / f"{NAME}.sqlite3"),
            "TEST": {"NAME": str(VAR / f"test_{NAME}.sqlite3")},
        }
    }
    CELERY_BROKER_URL = "memory://"

# FULLDB_USER_ROUTED=1: the task tables in a database of their own ("tasks"), and a
# read-replica router listed first that sends every read to "replica" (in tests a mirror
# of "default", which has no task tables): a task-table read that followed the routers
# would fail there.
ROUTED = os.environ.get("FULLDB_USER_ROUTED") == "1"
if ROUTED:
    default = DATABASES["default"]
    tasks = {**default, "NAME": f"{default['NAME']}_tasks"}
    if STACK == "sqlite":
        tasks["NAME"] = str(VAR / f"{NAME}_tasks.sqlite3")
        tasks["TEST"] = {"NAME": str(VAR / f"test_{NAME}_tasks.sqlite3")}
    DATABASES["tasks"] = tasks
    DATABASES["replica"] = {**default, "TEST": {"MIRROR": "default"}}
    DJANGO_CELERY_FULLDBRESULT_DATABASE = "tasks"
    DATABASE_ROUTERS = [
        "shopsite.routers.ReadReplicaRouter",
        "django_celery_fulldbresult.routers.TaskDatabaseRouter",
    ]

CELERY_TASK_DEFAULT_QUEUE = os.environ.get("FULLDB_QUEUE", "userproject")
CELERY_RESULT_BACKEND = "django_celery_fulldbresult.result_backends:DatabaseResultBackend"
CELERY_TASK_TRACK_STARTED = True

DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = True
DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
DJANGO_CELERY_FULLDBRESULT_MONKEY_PATCH_ASYNC = True
# FULLDB_USER_OWN_CONNECTION=1: the package's own connection even in tests (what 1.0.0.dev0
# did): the suite shows what that breaks.
if os.environ.get("FULLDB_USER_OWN_CONNECTION") == "1":
    DJANGO_CELERY_FULLDBRESULT_DEDICATED_CONNECTION_IN_TESTS = True

# Django's Tasks framework on the Celery workers (django.tasks, or the django-tasks backport).
TASKS = {
    "default": {
        "BACKEND": "django_celery_fulldbresult.django_tasks.CeleryBackend",
        "OPTIONS": {"CELERY_APP": "shopsite.celery.app"},
    }
}
