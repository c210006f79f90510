from __future__ import annotations

from typing import Any

from celery import current_app
from django.core.management.base import BaseCommand
from django.db.models import F

from django_celery_fulldbresult import scheduling
from django_celery_fulldbresult.management.delta import (
    ROW_FIELDS,
    add_delta_arguments,
    delta_from_options,
    write_rows,
)
from django_celery_fulldbresult.models import TaskResultMeta


class Command(BaseCommand):
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
            help="Send the listed tasks again (a task that did reach the broker runs twice).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stale = TaskResultMeta.objects.get_stale_scheduled_tasks(delta_from_options(options))
        rows = list(
            stale.annotate(reference_date=F("date_claimed"))
            .order_by("date_claimed")
            .values(*ROW_FIELDS)
        )
        write_rows(self, "Stale scheduled tasks:", rows, options["json"])
        if options["resend"] and rows:
            claimed = scheduling.claimed_values(
                stale.filter(task_id__in=[row["task_id"] for row in rows]), "scheduled_id"
            )
            outcome = scheduling.resend_stale(current_app, claimed)
            self.stderr.write(
                f"resent {outcome.sent}, failed {outcome.failed}, left for later {outcome.released}"
            )
