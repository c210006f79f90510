from __future__ import annotations

import signal
import threading
from typing import Any

from celery import current_app
from django.core.management.base import BaseCommand, CommandError

from django_celery_fulldbresult import conf, db, scheduling


class Command(BaseCommand):
    help = (
        "Forward due scheduled tasks to the broker, continuously. Wakes at the next eta "
        "(at most --interval seconds apart). Any number may run at once, with beat too."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="Longest sleep between polls in seconds (default: SCHEDULER_INTERVAL, 1).",
        )
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--once", action="store_true", help="One forwarding run, then exit.")

    def handle(self, *args: Any, **options: Any) -> None:
        interval = options["interval"] or float(conf.get("SCHEDULER_INTERVAL"))
        batch_size = options["batch_size"]
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write(f"run_scheduler: polling every {interval}s at most")
        while not stop.is_set():
            try:
                outcome = scheduling.forward_due(current_app, batch_size, max_seconds=interval)
                if outcome.sent or outcome.expired or outcome.failed or outcome.released:
                    self.stdout.write(
                        f"sent {outcome.sent}, expired {outcome.expired}, "
                        f"failed {outcome.failed}, released {outcome.released}"
                    )
                if options["once"]:
                    return
                wait = interval if outcome.released else scheduling.seconds_until_next(cap=interval)
            except Exception as exc:  # noqa: BLE001 - database down: keep trying
                if options["once"]:  # one run asked for: report it, never loop
                    raise CommandError(f"run_scheduler: {exc!r}") from exc
                self.stderr.write(f"run_scheduler: {exc!r}; retrying in {interval}s")
                db.close_quietly(db.task_db_alias())
                wait = interval
            stop.wait(wait)
        self._settle_before_exit()

    def _settle_before_exit(self) -> None:
        """Record what a database outage left unrecorded; say so if the database still refuses."""
        if not scheduling.unrecorded_batches():
            return
        try:
            scheduling.settle_unrecorded()
        except Exception as exc:  # noqa: BLE001 - database still down: tell the operator
            self.stderr.write(
                f"run_scheduler: {scheduling.unrecorded_batches()} batches could not be "
                f"recorded ({exc!r}); their rows stay claimed and find_stale_scheduled_tasks "
                "reports them"
            )
