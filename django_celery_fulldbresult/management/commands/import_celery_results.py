from __future__ import annotations

import time
from datetime import datetime
from datetime import time as day_start
from typing import Any

from celery import current_app
from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from django_celery_fulldbresult import celery_results_import as importer
from django_celery_fulldbresult import db, records
from django_celery_fulldbresult.management.base import DocumentedCommand

DEFAULT_BATCH_SIZE = 5000


def since_value(text: str) -> datetime:
    """``--since``: an ISO date or date and time (the project's time zone when none given)."""
    parsed = parse_datetime(text)
    if parsed is None:
        day = parse_date(text)
        if day is None:
            raise CommandError(f"--since {text!r}: give an ISO date or date and time")
        parsed = datetime.combine(day, day_start())
    value = records.to_datetime(parsed)
    assert value is not None
    return value


class Command(DocumentedCommand):
    help = (
        "Import django-celery-results' task and group results into the task table, in "
        "batches, in the order of their primary key. Idempotent: a task id the table holds "
        "already is left as it is. Resumable: a restarted import continues after the last "
        "batch written. Imported rows keep the arguments' reprs only, and are not "
        "replayable. The switch-over procedure: the how-to 'Moving from "
        "django-celery-results' (docs/howto/django-celery-results.rst)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Rows read and written per transaction (default {DEFAULT_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--source-database",
            default=None,
            metavar="ALIAS",
            help="The DATABASES alias holding django-celery-results' tables (default: where "
            "the project's routers read them, usually 'default').",
        )
        parser.add_argument(
            "--since",
            type=since_value,
            default=None,
            metavar="DATE",
            help="Only rows whose last state change (date_done) is at or after this ISO date "
            "or date and time.",
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            help="Stop after this many task rows (the next run continues after them).",
        )
        parser.add_argument(
            "--from-start",
            action="store_true",
            help="Read every row again instead of continuing after the last imported one "
            "(rows already imported are skipped): after an import with other filters.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Read everything and convert what would be imported, counting it; write nothing.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch_size = options["batch_size"]
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be at least 1")
        try:
            source = importer.source(options["source_database"])
        except importer.SourceUnavailable as exc:
            raise CommandError(str(exc)) from exc
        problem = importer.target_ready()
        if problem:
            raise CommandError(problem)
        app = current_app._get_current_object()
        converter = importer.Converter(app, importer.result_accept(app))
        tasks = importer.since_filter(
            source.task_model._default_manager.using(source.alias).all(), options["since"]
        )
        groups = importer.since_filter(
            source.group_model._default_manager.using(source.alias).all(), options["since"]
        )
        after = None
        if not options["from_start"]:
            after = db.run_with_reconnect(lambda using: importer.resume_point(tasks, using))
        remaining = tasks if after is None else tasks.filter(pk__gt=after)
        total = remaining.count()
        dry = " (dry run: nothing is written)" if options["dry_run"] else ""
        where = f"from database {source.alias!r}"
        if after is None:
            self.stderr.write(f"django-celery-results: {total:,} task rows to read {where}{dry}")
        else:
            self.stderr.write(
                f"django-celery-results: continuing after id {after} (imported earlier; "
                f"--from-start reads everything again): {total:,} task rows to read "
                f"{where}{dry}"
            )
        totals = importer.Totals()
        started = time.monotonic()
        complete = importer.import_tasks(
            remaining,
            converter,
            totals,
            after=after,
            batch_size=batch_size,
            limit=options["limit"],
            dry_run=options["dry_run"],
            progress=self._progress(total),
        )
        if self.stderr.isatty():
            self.stderr.write("")  # end the progress line
        if complete:
            importer.import_groups(
                groups, converter, totals, batch_size=batch_size, dry_run=options["dry_run"]
            )
        totals.elapsed = time.monotonic() - started
        self._report(totals, complete, options["dry_run"])

    def _progress(self, total: int):
        ending = "\r" if self.stderr.isatty() else "\n"

        def show(totals: importer.Totals) -> None:
            share = f" ({min(totals.read / total, 1):.0%})" if total else ""
            rate = totals.read / totals.elapsed if totals.elapsed else 0.0
            self.stderr.write(
                f"read {totals.read:,} of {total:,}{share}, imported {totals.imported:,}, "
                f"{rate:,.0f} rows/s, last id {totals.last_id}",
                ending=ending,
            )

        return show

    def _report(self, totals: importer.Totals, complete: bool, dry_run: bool) -> None:
        verb = "Would import" if dry_run else "Imported"
        rate = totals.read / totals.elapsed if totals.elapsed else 0.0
        self.stdout.write(
            f"{verb} {totals.imported:,} of {totals.read:,} task rows read "
            f"({totals.present:,} already in the task table, left as they are) in "
            f"{totals.elapsed:,.1f} s ({rate:,.0f} rows/s)"
        )
        if complete:
            self.stdout.write(
                f"{verb} {totals.groups_imported:,} of {totals.groups_read:,} groups "
                f"({totals.groups_present:,} already there); "
                f"{totals.members:,} imported tasks got their group id"
            )
        else:
            self.stdout.write(
                f"Stopped after --limit {totals.read:,} rows (last id {totals.last_id}): run "
                "the command again to continue; groups are imported once every task row is"
            )
        if totals.not_decoded:
            self.stdout.write(
                f"{totals.not_decoded:,} rows hold reprs or meta stored with a serializer the "
                "app does not accept (pickle?): kept as text in meta['django_celery_results']"
                "['undecoded'], never decoded here"
            )
        if totals.groups_not_decoded:
            self.stdout.write(
                f"{totals.groups_not_decoded:,} groups were not imported: their result is "
                "stored with a serializer the app does not accept (pickle?)"
            )
        if totals.present_unfinished:
            self.stdout.write(
                f"{totals.present_unfinished:,} tasks are final in django-celery-results but "
                "unfinished in the task table (publish tracking on before the switch?): left "
                "as they are"
            )
        if not dry_run and totals.last_id is not None:
            ended = timezone.now().isoformat(timespec="seconds")
            self.stdout.write(f"Last django-celery-results id read: {totals.last_id} ({ended})")
