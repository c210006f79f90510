from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError

from django_celery_fulldbresult.beat import install_scheduler_entry


class Command(BaseCommand):
    help = (
        "Create or update the django-celery-beat periodic task that runs "
        "django_celery_fulldbresult.tasks.send_scheduled_task."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--every", type=int, default=60, help="Seconds between runs.")
        parser.add_argument("--queue", default=None, help="Queue for the sender task.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not apps.is_installed("django_celery_beat"):
            raise CommandError(
                "setup_scheduler_beat needs django-celery-beat: pip install "
                "'django-celery-fulldbresult[beat]', add 'django_celery_beat' to "
                "INSTALLED_APPS and migrate (or run the sender without beat: "
                "manage.py run_scheduler)."
            )
        task, created = install_scheduler_entry(every=options["every"], queue=options["queue"])
        verb = "created" if created else "updated"
        self.stdout.write(f"{verb} periodic task {task.name!r}: every {options['every']}s")
