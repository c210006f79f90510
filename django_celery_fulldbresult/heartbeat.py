"""Worker heartbeats: a task a worker took (RECEIVED, STARTED) is its own while it lives.

The worker's main process upserts one row per worker every
``DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT`` seconds from a daemon thread
and deletes it on shutdown. A worker that misses ``WORKER_HEARTBEAT_GRACE``
beats counts as gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.conf import settings
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from . import conf, db

logger = logging.getLogger(__name__)


#: When this process started (imported this module, before any message was consumed).
_STARTED = time.time()


def process_started() -> datetime:
    started = datetime.fromtimestamp(_STARTED, tz=dt_timezone.utc)
    return started if settings.USE_TZ else timezone.make_naive(started)


def interval() -> float:
    return float(conf.get("WORKER_HEARTBEAT") or 0)


def window() -> timedelta | None:
    """How old a live worker's last heartbeat may be (None: heartbeats off)."""
    seconds = interval()
    if seconds <= 0:
        return None
    return timedelta(seconds=seconds * float(conf.get("WORKER_HEARTBEAT_GRACE")))


def runner_alive(now: datetime | None = None, using: str | None = None) -> Exists | None:
    """A condition on task rows: the worker that took the row is alive.

    Its heartbeat is fresh, and the row was taken (``date_modified``: every write of a
    running task is the worker's own) after that worker started: a worker restarted under
    the same name did not take the rows its former self held. None when heartbeats are off.

    A subquery, so that a statement that takes rows (the receipt's ``UPDATE``) judges with
    the heartbeats it sees; ``runners_alive_now`` is the same rule for listings.
    """
    from .models import WorkerHeartbeat

    cutoff = _fresh_after(now)
    if cutoff is None:
        return None
    return Exists(
        WorkerHeartbeat.objects.using(using).filter(
            Q(started__isnull=True) | Q(started__lte=OuterRef("date_modified")),
            hostname=OuterRef("hostname"),
            last_seen__gte=cutoff,
        )
    )


def runners_alive_now(now: datetime | None = None, using: str | None = None) -> Q | None:
    """``runner_alive``'s rule on the live workers read first (one statement on the small
    heartbeat table): a plain condition on the row's own columns instead of a subquery run
    once per RECEIVED or STARTED row (29,368 runs in the stale listing at 78k stale rows,
    ``bench/stale_plan.py``). None when heartbeats are off."""
    from .models import WorkerHeartbeat

    cutoff = _fresh_after(now)
    if cutoff is None:
        return None
    live = WorkerHeartbeat.objects.using(using).filter(last_seen__gte=cutoff)
    alive = Q(pk__in=[])  # nobody alive: no row is
    since_start: list[str] = []
    for hostname, started in live.values_list("hostname", "started"):
        if started is None:
            since_start.append(hostname)
        else:
            alive |= Q(hostname=hostname, date_modified__gte=started)
    if since_start:
        alive |= Q(hostname__in=sorted(since_start))
    return alive


def _fresh_after(now: datetime | None) -> datetime | None:
    """The oldest heartbeat of a live worker (None: heartbeats off)."""
    gone_after = window()
    if gone_after is None:
        return None
    return (now or timezone.now()) - gone_after


def beat(hostname: str, started: datetime | None = None) -> None:
    """Record that ``hostname`` (started at ``started``) is alive (one upsert)."""
    from .models import WorkerHeartbeat

    def write(using: str) -> None:
        db.upsert(
            WorkerHeartbeat,
            using,
            [
                WorkerHeartbeat(
                    hostname=hostname, pid=os.getpid(), last_seen=timezone.now(), started=started
                )
            ],
            unique_fields=["hostname"],
            update_fields=["pid", "last_seen", "started"],
        )

    db.run_with_reconnect(write)


def forget(hostname: str) -> None:
    from .models import WorkerHeartbeat

    db.run_with_reconnect(
        lambda using: WorkerHeartbeat.objects.using(using).filter(hostname=hostname).delete()
    )


class HeartbeatThread(threading.Thread):
    def __init__(self, hostname: str, seconds: float) -> None:
        super().__init__(name=f"fulldbresult-heartbeat-{hostname}", daemon=True)
        self.hostname = hostname
        self.seconds = seconds
        self.started = process_started()
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                beat(self.hostname, self.started)
            except Exception:  # noqa: BLE001 - a missed beat must not kill the thread
                logger.warning("worker heartbeat failed", exc_info=True)
            db.on_statement_thread(lambda: db.recycle(between_tasks=True))  # CONN_MAX_AGE
            if self.stopped.wait(self.seconds):
                return

    def stop(self) -> None:
        self.stopped.set()


_threads: dict[str, HeartbeatThread] = {}


def on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    seconds = interval()
    hostname = getattr(sender, "hostname", None)
    if seconds <= 0 or not hostname or hostname in _threads:
        return
    from .result_backends import DatabaseResultBackend

    app = getattr(sender, "app", None)
    if app is not None and not isinstance(app.backend, DatabaseResultBackend):
        return
    thread = HeartbeatThread(hostname, seconds)
    _threads[hostname] = thread
    thread.start()


def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    for hostname, thread in list(_threads.items()):
        thread.stop()
        thread.join(timeout=5)
        del _threads[hostname]
        try:
            forget(hostname)
        except Exception:  # noqa: BLE001
            logger.warning("could not remove the heartbeat of %s", hostname, exc_info=True)
