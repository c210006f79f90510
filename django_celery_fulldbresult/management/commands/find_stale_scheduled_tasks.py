from __future__ import annotations

from typing import Any

from celery import current_app
from django.db.models import F

from django_celery_fulldbresult import scheduler
from django_celery_fulldbresult.management.base import DocumentedCommand
from django_celery_fulldbresult.management.delta import (
    ROW_FIELDS,
    add_delta_arguments,
    delta_from_options,
    write_rows,
)
from django_celery_fulldbresult.models import TaskResultMeta


class Command(DocumentedCommand):
    help = (
        "List scheduled tasks a sender claimed but never recorded as sent (the sender "
        "crashed): they may or may not have been sent. --resend sends them again."
    )

    def add_arguments(self, parser: Any) -> None:
        add_delta_arguments(parser, "claims")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
        parser.add_argument(
            "--resend",
            action="store_true",
            help="Send the listed tasks again (a task that did reach the broker runs twice). "
            "Only claims older than a safe age are resent (4 x SCHEDULER_CONFIRM_TIMEOUT, at "
            "least 60 s): a live sender's batch is never taken; the age options may ask for "
            "older claims, never younger ones.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        age = delta_from_options(options)
        if options["resend"]:
            safe = scheduler.safe_resend_age()
            if age < safe:
                self.stderr.write(
                    f"--resend: only claims older than {safe.total_seconds():.0f} s are "
                    "resent (a younger one may be a live sender's batch in flight)"
                )
                age = safe
        stale = TaskResultMeta.objects.get_stale_scheduled_tasks(age)
        rows = list(
            stale.annotate(reference_date=F("date_claimed"))
            .order_by("date_claimed")
            .values(*ROW_FIELDS)
        )
        write_rows(self, "Stale scheduled tasks:", rows, options["json"])
        if options["resend"] and rows:
            claimed = scheduler.claimed_values(
                stale.filter(task_id__in=[row["task_id"] for row in rows]), "scheduled_id"
            )
            outcome = scheduler.resend_stale(current_app, claimed, min_age=age)
            self.stderr.write(
                f"resent {outcome.sent}, failed {outcome.failed}, left for later {outcome.released}"
            )
