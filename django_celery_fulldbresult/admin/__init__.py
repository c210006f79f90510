"""The task admin (and django-celery-beat's, with "Run now"), one module per concern.

``TaskResultMetaAdmin`` is registered on the default admin site; register it
(and ``CustomPeriodicTaskAdmin``) on your own site if you use one. With
``DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN = True`` django-celery-beat's
``PeriodicTask`` admin is replaced by ``CustomPeriodicTaskAdmin`` (Run now,
links to results).

* ``task_result``: ``TaskResultMetaAdmin``, the changelist and the detail page;
* ``display``: how a row's values are shown (state badges, JSON, durations);
* ``filters``: the changelist's filters; ``paginator``: its count that never counts
  the whole table;
* ``actions``: retry, cancel, send now, revoke (and their confirmation page);
* ``dashboard``: the figures of ``stats()`` and the 24-hour chart;
* ``periodic_tasks``: ``CustomPeriodicTaskAdmin`` (needs django-celery-beat, imported
  only when it is asked for).
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib import admin

from .. import beat, conf
from ..models import TaskResultMeta
from .task_result import TaskResultMetaAdmin


def __getattr__(name: str) -> Any:
    # CustomPeriodicTaskAdmin needs django-celery-beat: imported only when asked for.
    if name == "CustomPeriodicTaskAdmin":
        reason = beat.unavailable("CustomPeriodicTaskAdmin")
        if reason:
            raise ImportError(reason)
        from .periodic_tasks import CustomPeriodicTaskAdmin

        return CustomPeriodicTaskAdmin
    raise AttributeError(name)


admin.site.register(TaskResultMeta, TaskResultMetaAdmin)

if conf.get("OVERRIDE_BEAT_ADMIN") and apps.is_installed("django_celery_beat"):
    from .periodic_tasks import override_beat_admin

    override_beat_admin(admin.site)
