"""``CeleryTask``: Django's ``Task`` with the Celery options a task may declare.

Django 6.1 (and the ``django-tasks`` backport) pass extra ``@task(**options)`` keywords to
the backend's ``task_class``: here they are the Celery task attributes that mean something
for a Django task, set on the Celery task that runs it (``runner.register``). An unknown
keyword is refused with Python's ``unexpected keyword argument``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any

from .compat import Task


# Slots as the base class has them (the backport's Task has none before Python 3.11).
@dataclass(frozen=True, slots=sys.version_info >= (3, 11), kw_only=True)
class CeleryTask(Task):  # type: ignore[misc]
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    reject_on_worker_lost: bool | None = None
    rate_limit: str | None = None
    expires: float | None = None
    track_started: bool | None = None
    autoretry_for: tuple[type[BaseException], ...] | None = None
    max_retries: int | None = None
    default_retry_delay: float | None = None
    retry_backoff: bool | float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    # The package's own: secret arguments, what recovery does when the worker died.
    store_args: bool | None = None
    recover: str | None = None

    @property
    def celery_options(self) -> dict[str, Any]:
        """The options the task set (None: Celery's default, or the app's setting)."""
        return {
            name: getattr(self, name)
            for name in CELERY_OPTIONS
            if getattr(self, name, None) is not None
        }


#: Celery task attributes a Django task may set, as ``@task(time_limit=30, acks_late=True)``:
#: ``CeleryTask``'s own fields.
CELERY_OPTIONS = tuple(
    field.name for field in fields(CeleryTask) if field.name not in {f.name for f in fields(Task)}
)
