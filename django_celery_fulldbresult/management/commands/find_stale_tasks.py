from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import current_app
from django.core.management import CommandError
from django.db.models import Case, F, When

from django_celery_fulldbresult import heartbeat, recovery
from django_celery_fulldbresult.management.base import DocumentedCommand
from django_celery_fulldbresult.management.delta import (
    ROW_FIELDS,
    add_delta_arguments,
    age_given,
    delta_from_options,
    write_rows,
)
from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.recovery import FAIL, RESEND
from django_celery_fulldbresult.states import SCHEDULED


class Command(DocumentedCommand):
    help = (
        "List tasks that should have finished by now: not SUCCESS/FAILURE/REVOKED, with no "
        "state change for the given time (STARTED: and their worker is gone; SCHEDULED: "
        "overdue). With no age, every unfinished task whose last change is in the past "
        "counts. --resend / --mark-failed recover the tasks of lost workers. See 'Finding tasks "
        "that never finish' in the README."
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
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--resend",
            action="store_true",
            help="Send the listed RECEIVED/STARTED tasks whose worker is gone again (same id, "
            "same attempt: a task that did part of its work before its worker died does it "
            "again). Rows that are not replayable are left alone. Needs an age and worker "
            "heartbeats.",
        )
        action.add_argument(
            "--mark-failed",
            action="store_true",
            help="Mark the listed RECEIVED/STARTED tasks whose worker is gone FAILURE with a "
            "WorkerLostError (their chords fail). Needs an age and worker heartbeats.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        action = RESEND if options["resend"] else FAIL if options["mark_failed"] else None
        age = delta_from_options(options)
        if action is not None:
            flag = "--resend" if action == RESEND else "--mark-failed"
            if age <= timedelta(0):
                raise CommandError(
                    f"{flag} needs an age (--minutes, --hours, ...): with none, a task a "
                    "worker has just taken would count as lost"
                )
            if heartbeat.interval() <= 0:
                raise CommandError(
                    f"{flag} needs worker heartbeats (WORKER_HEARTBEAT > 0): without them "
                    "nobody can tell that a task's worker is gone"
                )
        if not age_given(options) and not options["json"]:
            self.stderr.write(
                "No age given (--minutes, --hours, ...): every unfinished task counts, even "
                "one published a moment ago."
            )
        rows = (
            TaskResultMeta.objects.get_stale_tasks(age, options["terminal_states"])
            .annotate(
                reference_date=Case(
                    When(status=SCHEDULED, then=F("eta")), default=F("date_modified")
                )
            )
            .order_by("date_modified")
            .values(*ROW_FIELDS)
        )
        write_rows(self, "Stale tasks:", rows.iterator(chunk_size=2000), options["json"])
        if action is None:
            return
        outcome = recovery.recover_stale(
            current_app,
            max_age=age,
            override=action,
            acceptable_states=options["terminal_states"],
            by=recovery.BY_COMMAND + (" --resend" if action == RESEND else " --mark-failed"),
        )
        self.stderr.write(outcome.summary())
        counts = outcome.counts
        self.stderr.write(
            f"resent {counts['resent']}, marked failed {counts['failed']}, not replayable "
            f"{counts['not_replayable']}, moved on meanwhile {counts['moved_on']} (only "
            "RECEIVED/STARTED tasks whose worker is gone are recovered)"
        )
