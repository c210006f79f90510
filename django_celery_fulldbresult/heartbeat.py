"""Worker heartbeats: a STARTED task is stale only when its worker is gone.

The worker's main process upserts one row per worker every
``DJANGO_CELERY_FULLDBRESULT_WORKER_HEARTBEAT`` seconds from a daemon thread
and deletes it on shutdown. A worker that misses ``WORKER_HEARTBEAT_GRACE``
beats counts as gone.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from . import conf, db

logger = logging.getLogger(__name__)


def interval() -> float:
    return float(conf.get("WORKER_HEARTBEAT") or 0)


def live_hostnames(now: datetime | None = None, using: str | None = None) -> QuerySet | None:
    """A subquery of the hostnames of live workers, or None when heartbeats are off."""
    from .models import WorkerHeartbeat

    seconds = interval()
    if seconds <= 0:
        return None
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=seconds * float(conf.get("WORKER_HEARTBEAT_GRACE")))
    return WorkerHeartbeat.objects.using(using).filter(last_seen__gte=cutoff).values("hostname")


def beat(hostname: str) -> None:
    """Record that ``hostname`` is alive (one upsert)."""
    from .models import WorkerHeartbeat

    def write(using: str) -> None:
        db.upsert(
            WorkerHeartbeat,
            using,
            [WorkerHeartbeat(hostname=hostname, pid=os.getpid(), last_seen=timezone.now())],
            unique_fields=["hostname"],
            update_fields=["pid", "last_seen"],
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
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                beat(self.hostname)
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
