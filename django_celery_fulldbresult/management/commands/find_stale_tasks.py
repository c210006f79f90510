from __future__ import annotations

from typing import Any

from django.db.models import Case, F, When

from django_celery_fulldbresult.management.base import DocumentedCommand
from django_celery_fulldbresult.management.delta import (
    ROW_FIELDS,
    add_delta_arguments,
    age_given,
    delta_from_options,
    write_rows,
)
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.states import SCHEDULED


class Command(DocumentedCommand):
    help = (
        "List tasks that should have finished by now: not SUCCESS/FAILURE/REVOKED, with no "
        "state change for the given time (STARTED: and their worker is gone; SCHEDULED: "
        "overdue). With no age, every unfinished task whose last change is in the past "
        "counts. See 'Finding tasks that never finish' in the README."
    )

    def add_arguments(self, parser: Any) -> None:
        add_delta_arguments(parser, "tasks")
        parser.add_argument(
            "--terminal-state",
            action="append",
            dest="terminal_states",
            default=None,
            metavar="STATE",
            help="A further state that is never stale (repeatable).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not age_given(options) and not options["json"]:
            self.stderr.write(
                "No age given (--minutes, --hours, ...): every unfinished task counts, even "
                "one published a moment ago."
            )
        rows = (
            TaskResultMeta.objects.get_stale_tasks(
                delta_from_options(options), options["terminal_states"]
            )
            .annotate(
                reference_date=Case(
                    When(status=SCHEDULED, then=F("eta")), default=F("date_modified")
                )
            )
            .order_by("date_modified")
            .values(*ROW_FIELDS)
        )
        write_rows(self, "Stale tasks:", rows.iterator(chunk_size=2000), options["json"])
