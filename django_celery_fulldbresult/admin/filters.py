"""Changelist filters of the task admin.

None of them scans the task table to build its choices (no ``DISTINCT``):
states are a fixed list, task names come from the Celery app's registry,
periodic task names from django-celery-beat's (small) table.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..states import ALL_STATES

#: (parameter value, label, seconds) of the "stale" filter.
STALE_CHOICES = (
    ("600", _("for 10 minutes"), 600),
    ("3600", _("for 1 hour"), 3600),
    ("86400", _("for 1 day"), 86400),
)

#: (parameter value, label, seconds) of the "submitted" filter.
SUBMITTED_CHOICES = (
    ("1h", _("in the last hour"), 3600),
    ("24h", _("in the last 24 hours"), 86400),
    ("7d", _("in the last 7 days"), 7 * 86400),
)


def _with_current(choices: list[str], current: str | None) -> list[tuple[str, str]]:
    """Choices plus the value filtered on now (a custom state, an unregistered task)."""
    names = sorted(set(choices) | ({current} if current else set()))
    return [(name, name) for name in names]


class StateFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "status"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return _with_current(list(ALL_STATES), self.value())

    def queryset(self, request, queryset):
        return queryset.filter(status=self.value()) if self.value() else queryset


#: Apps whose task modules were imported (once per process: it tries every installed app).
_imported: set[int] = set()


def registered_task_names(app: Any) -> list[str]:
    """The task names the Celery app knows (its task modules imported first, as beat does)."""
    if id(app) not in _imported:
        app.loader.import_default_modules()
        _imported.add(id(app))
    return [name for name in app.tasks if not name.startswith("celery.")]


class TaskNameFilter(admin.SimpleListFilter):
    title = _("task name")
    parameter_name = "task"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return _with_current(registered_task_names(model_admin.get_celery_app()), self.value())

    def queryset(self, request, queryset):
        return queryset.filter(task=self.value()) if self.value() else queryset


def periodic_task_names() -> list[str]:
    """Names of django-celery-beat's periodic tasks, if it is installed."""
    if not apps.is_installed("django_celery_beat"):
        return []
    model = apps.get_model("django_celery_beat", "PeriodicTask")
    return list(model.objects.order_by("name").values_list("name", flat=True)[:500])


class PeriodicTaskFilter(admin.SimpleListFilter):
    title = _("periodic task")
    parameter_name = "periodic_task_name"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return _with_current(periodic_task_names(), self.value())

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(periodic_task_name=value) if value else queryset


def _seconds(choices: tuple, value: str | None) -> int | None:
    return next((seconds for key, _label, seconds in choices if key == value), None)


class SubmittedFilter(admin.SimpleListFilter):
    title = _("submitted")
    parameter_name = "submitted"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return [(key, label) for key, label, _seconds in SUBMITTED_CHOICES]

    def queryset(self, request, queryset):
        seconds = _seconds(SUBMITTED_CHOICES, self.value())
        if seconds is None:
            return queryset
        return queryset.filter(date_submitted__gte=timezone.now() - timedelta(seconds=seconds))


class StaleFilter(admin.SimpleListFilter):
    """``TaskResultMeta.objects.get_stale_tasks``: the same definition as ``find_stale_tasks``."""

    title = _("stale (no progress)")
    parameter_name = "stale"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return [(key, label) for key, label, _seconds in STALE_CHOICES]

    def queryset(self, request, queryset):
        seconds = _seconds(STALE_CHOICES, self.value())
        if seconds is None:
            return queryset
        return queryset.get_stale_tasks(timedelta(seconds=seconds))


#: Filters after which the newest state changes come first (an index serves that order).
BY_STATE_CHANGE = (StateFilter.parameter_name, StaleFilter.parameter_name)
