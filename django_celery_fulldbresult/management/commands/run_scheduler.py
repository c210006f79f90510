from __future__ import annotations

import signal
import threading
import time
from typing import Any

from celery import current_app
from django.core.management.base import CommandError

from django_celery_fulldbresult import conf, recovery, scheduler
from django_celery_fulldbresult.management.base import DocumentedCommand


class Command(DocumentedCommand):
    help = (
        "Forward due scheduled tasks to the broker, continuously. Wakes at the next eta "
        "(at most --interval seconds apart). Any number may run at once, with beat too. "
        "Keeps one database and one broker connection, reopened after an error. Takes "
        "back the claims of senders that died (SCHEDULER_RECLAIM_AFTER) and recovers the "
        "tasks of workers that died (RECOVER_AFTER, per task policy)."
    )

    #: Longest time between two recovery passes (RECOVER_AFTER / 4 when shorter).
    RECOVERY_EVERY = 60.0

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
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write(f"run_scheduler: polling every {interval}s at most")
        self._next_recovery = 0.0
        with scheduler.Sender(current_app) as sender:
            while not stop.is_set():
                wait = self._forward(sender, interval, options["batch_size"], options["once"])
                if wait is None:
                    return
                self._recover(sender)
                stop.wait(wait)
            self._settle_before_exit(sender)

    def _forward(
        self, sender: scheduler.Sender, interval: float, batch_size: int | None, once: bool
    ) -> float | None:
        """One forwarding run; how long to sleep after it (None: --once is done)."""
        try:
            outcome = sender.forward_due(batch_size, max_seconds=interval)
            if (
                outcome.sent
                or outcome.expired
                or outcome.failed
                or outcome.released
                or outcome.reclaimed
            ):
                self.stdout.write(
                    f"sent {outcome.sent}, expired {outcome.expired}, "
                    f"failed {outcome.failed}, released {outcome.released}, "
                    f"reclaimed {outcome.reclaimed}"
                )
            if once:
                return None
            return interval if outcome.released else sender.seconds_until_next(cap=interval)
        except Exception as exc:  # noqa: BLE001 - database or broker down: keep trying
            if once:  # one run asked for: report it, never loop
                raise CommandError(f"run_scheduler: {exc!r}") from exc
            self.stderr.write(f"run_scheduler: {exc!r}; retrying in {interval}s")
            sender.reconnect()
            return interval

    def _recover(self, sender: scheduler.Sender) -> None:
        """Apply the recovery policies to the tasks of dead workers, every so often."""
        max_age = recovery.recover_after()
        if max_age is None or time.monotonic() < self._next_recovery:
            return
        every = min(self.RECOVERY_EVERY, max_age.total_seconds() / 4)
        self._next_recovery = time.monotonic() + every
        try:
            outcome = recovery.recover_stale(
                current_app,
                sender.using,
                max_age,
                sender=sender,
                limit=int(conf.get("SCHEDULER_BATCH_SIZE")),
            )
        except Exception as exc:  # noqa: BLE001 - database down: the next pass tries again
            self.stderr.write(f"run_scheduler: recovery failed: {exc!r}")
            return
        if outcome.acted:
            self.stdout.write(f"recovered: {outcome.summary()}")

    def _settle_before_exit(self, sender: scheduler.Sender) -> None:
        """Record what a database outage left unrecorded; say so if the database still refuses."""
        if not sender.unrecorded:
            return
        try:
            sender.settle()
        except Exception as exc:  # noqa: BLE001 - database still down: tell the operator
            self.stderr.write(
                f"run_scheduler: {sender.unrecorded} batches could not be recorded ({exc!r}); "
                "their rows stay claimed and find_stale_scheduled_tasks reports them"
            )
