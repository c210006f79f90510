"""Django settings for the peer-suite harness.

The harness runs Celery's own ``t/integration`` suite with a Django database
result backend.  Everything here is driven by environment variables so that
the same settings module serves every backend under test:

``TEST_BACKEND``           the Celery ``result_backend`` value under test
                           (``django-db``, ``pkg.module:BackendClass``, ...).
``PEER_SUITE_APPS``        comma-separated extra INSTALLED_APPS; by default it
                           is derived from ``TEST_BACKEND`` (see below).
``PEER_SUITE_DB_NAME``     PostgreSQL database (default ``peersuite``).
``PEER_SUITE_DB_HOST``     default ``127.0.0.1``.
``PEER_SUITE_DB_PORT``     default ``5432``.
``PEER_SUITE_DB_USER``     default ``$PGUSER`` or the current OS user.
``PEER_SUITE_DB_PASSWORD`` default empty (trust auth).
``PEER_SUITE_CONN_MAX_AGE`` default ``0`` (Django's default: close after use).
"""

import getpass
import os

SECRET_KEY = "peer-suite-not-a-secret"
DEBUG = False  # DEBUG=True would keep every SQL query in memory
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_BACKEND = os.environ.get("TEST_BACKEND", "django-db")


def _apps_for_backend(spec):
    """INSTALLED_APPS entries a backend spec needs."""
    explicit = os.environ.get("PEER_SUITE_APPS")
    if explicit is not None:
        return [a.strip() for a in explicit.split(",") if a.strip()]
    if spec.startswith(("django-db", "django-cache", "django_celery_results")):
        return ["django_celery_results"]
    if "://" not in spec and ("." in spec or ":" in spec):
        # "pkg.module:Class" or "pkg.module.Class": the top-level package is
        # taken to be the Django app that owns the backend's models.
        return [spec.replace(":", ".").split(".")[0]]
    return []


INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    *_apps_for_backend(_BACKEND),
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PEER_SUITE_DB_NAME", "peersuite"),
        "HOST": os.environ.get("PEER_SUITE_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("PEER_SUITE_DB_PORT", "5432"),
        "USER": os.environ.get("PEER_SUITE_DB_USER", os.environ.get("PGUSER") or getpass.getuser()),
        "PASSWORD": os.environ.get("PEER_SUITE_DB_PASSWORD", ""),
        "CONN_MAX_AGE": int(os.environ.get("PEER_SUITE_CONN_MAX_AGE", "0")),
        "CONN_HEALTH_CHECKS": True,
    }
}

# For documentation only: the Celery app under test is configured by Celery's
# own ``celery_config`` fixture (t/integration/conftest.py) from TEST_BACKEND,
# with ``result_extended=True``; these mirror it for code that reads settings.
CELERY_RESULT_BACKEND = _BACKEND
CELERY_RESULT_EXTENDED = True

LOGGING_CONFIG = None  # leave logging to pytest / Celery's worker
