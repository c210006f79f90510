"""A database router for projects whose task tables live outside ``default``, or that route
reads to a replica.

.. code-block:: python

    DJANGO_CELERY_FULLDBRESULT_DATABASE = "tasks"
    DATABASE_ROUTERS = ["django_celery_fulldbresult.routers.TaskDatabaseRouter", ...]

The package's own queries do not depend on it (its managers start every query on the task
database, see ``managers.TaskDatabaseManager``); the router is for everything Django decides
by routing: migrations (the tables are created on the task database only), saving an
instance created without a queryset, and code of yours that reaches the models another way.
"""

from __future__ import annotations

from typing import Any

from . import conf

APP_LABEL = "django_celery_fulldbresult"


class TaskDatabaseRouter:
    """Reads and writes of this app's models on the task database, its tables migrated
    there only; no opinion on any other app."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return conf.database() if model._meta.app_label == APP_LABEL else None

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return conf.database() if model._meta.app_label == APP_LABEL else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if app_label == APP_LABEL:
            return db == conf.database()
        return None
