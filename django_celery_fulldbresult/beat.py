"""django-celery-beat integration."""

from __future__ import annotations

from typing import Any

SENDER_TASK = "django_celery_fulldbresult.tasks.send_scheduled_task"
ENTRY_NAME = "django-celery-fulldbresult: send scheduled tasks"


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
