"""django-celery-beat integration.

django-celery-beat is optional (the ``beat`` extra). Its 2.9 release declares ``Django<6.1``,
so on Django 6.1 pip does not install it: there the beat features (the periodic tasks' admin
with Run now, ``setup_scheduler_beat``) are unavailable, and say so through ``unavailable()``;
``run_scheduler`` forwards delayed tasks without beat.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import django
from django.apps import apps
from django.db import router

from . import db

SENDER_TASK = "django_celery_fulldbresult.tasks.send_scheduled_task"
ENTRY_NAME = "django-celery-fulldbresult: send scheduled tasks"


# The first Django that no django-celery-beat release supports yet (2.9: Django<6.1).
UNSUPPORTED_DJANGO = (6, 1)


def missing() -> str | None:
    """Why django-celery-beat cannot be used in this project (a phrase), or None."""
    if apps.is_installed("django_celery_beat"):
        return None
    if importlib.util.find_spec("django_celery_beat") is not None:
        return "'django_celery_beat' is not in INSTALLED_APPS"
    if django.VERSION[:2] >= UNSUPPORTED_DJANGO:
        return (
            "django-celery-beat is not installed: no release supports Django "
            f"{django.get_version()} yet (django-celery-beat 2.9 declares Django<6.1)"
        )
    return "django-celery-beat is not installed"


def hint(otherwise: str) -> str:
    """What to do about a beat feature without django-celery-beat: install it, or (on a
    Django no django-celery-beat release supports, where pip will not install it)
    ``otherwise``."""
    if importlib.util.find_spec("django_celery_beat") is None:
        if django.VERSION[:2] >= UNSUPPORTED_DJANGO:
            return f"{otherwise[:1].upper()}{otherwise[1:]}: no django-celery-beat runs here."
        return (
            "pip install 'django-celery-fulldbresult[beat]', add 'django_celery_beat' to "
            f"INSTALLED_APPS and run `python manage.py migrate`; or {otherwise}."
        )
    return (
        "Add 'django_celery_beat' to INSTALLED_APPS and run `python manage.py migrate`; "
        f"or {otherwise}."
    )


def unavailable(feature: str) -> str | None:
    """Why ``feature`` cannot use django-celery-beat in this project, and what to do, or None."""
    reason = missing()
    if reason is None:
        return None
    return f"{feature} needs django-celery-beat, but {reason}. " + hint(
        "forward delayed tasks without beat: `python manage.py run_scheduler`"
    )


def install_scheduler_entry(
    every: int = 60, queue: str | None = None, periodic_task_model: Any = None
) -> tuple[Any, bool]:
    """Create or update the beat entry that forwards due scheduled tasks.

    Usable from a data migration (pass ``apps.get_model("django_celery_beat",
    "PeriodicTask")``). A run expires after one period, so runs never pile up
    while workers are busy.
    """
    if periodic_task_model is None:
        from django_celery_beat.models import PeriodicTask as periodic_task_model
    interval_model = periodic_task_model._meta.get_field("interval").related_model
    with db.writing_first(router.db_for_write(periodic_task_model)):
        schedule, _ = interval_model.objects.get_or_create(every=every, period="seconds")
        return periodic_task_model.objects.update_or_create(
            name=ENTRY_NAME,
            defaults={
                "task": SENDER_TASK,
                "interval": schedule,
                "crontab": None,
                "solar": None,
                "clocked": None,
                "enabled": True,
                "queue": queue,
                "expire_seconds": every,
                "description": "Forwards due eta/countdown tasks held in the database.",
            },
        )
