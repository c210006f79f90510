from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError
from django.utils import timezone

from django_celery_fulldbresult import conf, retention
from django_celery_fulldbresult.management.base import DocumentedCommand
from django_celery_fulldbresult.management.delta import add_delta_arguments, delta_from_options
from django_celery_fulldbresult.models import TaskResultMeta


def _breakdown(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n:,}" for state, n in counts.items()) or "nothing"


class Command(DocumentedCommand):
    help = (
        "Delete task results older than the given age, in batches. By default only final "
        "states (SUCCESS, FAILURE, REVOKED); scheduled and unfinished rows only with "
        "--include-unfinished. Final rows are aged by date_done, others by their last state "
        "change."
    )

    def add_arguments(self, parser: Any) -> None:
        add_delta_arguments(parser, "rows", template="Delete {what} older than this many {unit}")
        parser.add_argument(
            "--state",
            action="append",
            dest="states",
            default=None,
            metavar="STATE",
            help="Only rows in this state (repeatable). Default: SUCCESS, FAILURE, REVOKED "
            "(with --include-unfinished and no --state: every state).",
        )
        parser.add_argument(
            "--include-unfinished",
            action="store_true",
            help="Allow PENDING, RECEIVED, STARTED, RETRY, SCHEDULED, SCHEDULED_SENT and custom "
            "states: deleting a SCHEDULED row means the task is never sent.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="Rows per DELETE statement (default: DJANGO_CELERY_FULLDBRESULT_"
            "CLEANUP_BATCH_SIZE).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        age = delta_from_options(options)
        if age <= timedelta(0):
            raise CommandError("give an age, e.g. --days 30 (rows older than it are deleted)")
        batch_size = options["batch_size"] or int(conf.get("CLEANUP_BATCH_SIZE"))
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        queryset = TaskResultMeta.objects.using(conf.database()).all()
        try:
            states = retention.check_states(
                queryset, options["states"], options["include_unfinished"]
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        cutoff = timezone.now() - age
        rule = retention.purge_rule(cutoff, states)
        counts = retention.count_by_state(queryset, rule)
        total = sum(counts.values())
        if options["dry_run"]:
            self.stdout.write(
                f"Would delete {total:,} task results older than {cutoff.isoformat()}: "
                f"{_breakdown(counts)} (dry run, nothing deleted)"
            )
            return
        deleted = retention.delete(queryset, rule, batch_size, self._progress(total))
        if self.stderr.isatty():
            self.stderr.write("")  # end the progress line
        self.stdout.write(
            f"Deleted {deleted:,} task results older than {cutoff.isoformat()} "
            f"(matching before the delete: {_breakdown(counts)})"
        )

    def _progress(self, total: int):
        ending = "\r" if self.stderr.isatty() else "\n"

        def show(done: int) -> None:
            share = f" ({min(done / total, 1):.0%})" if total else ""
            self.stderr.write(f"deleted {done:,} of {total:,}{share}", ending=ending)

        return show
