from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from django_celery_fulldbresult import beat
from django_celery_fulldbresult.management.base import DocumentedCommand


class Command(DocumentedCommand):
    help = (
        "Create or update the django-celery-beat periodic task that runs "
        "django_celery_fulldbresult.tasks.send_scheduled_task."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--every", type=int, default=60, help="Seconds between runs.")
        parser.add_argument("--queue", default=None, help="Queue for the sender task.")

    def handle(self, *args: Any, **options: Any) -> None:
        reason = beat.unavailable("setup_scheduler_beat")
        if reason:
            raise CommandError(reason)
        task, created = beat.install_scheduler_entry(every=options["every"], queue=options["queue"])
        verb = "created" if created else "updated"
        self.stdout.write(f"{verb} periodic task {task.name!r}: every {options['every']}s")
