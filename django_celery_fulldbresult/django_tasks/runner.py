"""The worker side: each Django task runs as a Celery task named after its function.

``register`` (called by the backend's ``validate_task``, so when the module defining the
task is imported, in web processes and workers alike) registers a Celery task named
``task.module_path`` on every Celery app (``shared_task``): ordinary workers run Django
tasks with no registration by the user, as long as they import the module (Celery's
``autodiscover_tasks`` imports each app's ``tasks.py``; other modules go in
``CELERY_IMPORTS``). The Celery task's base is ``ScheduledTask``, so a delayed call waits
in the database.

Each attempt records its worker in the row (``meta["workers"]``: Django's ``worker_ids``),
sends Django's ``task_started`` with the running result, calls the function (async ones
through an event loop of their own), and Django's ``task_finished`` follows Celery's own
record of the outcome (``task_postrun``; an attempt that Celery retries is not finished).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from celery import shared_task, states
from celery.signals import task_postrun
from django.utils import timezone

from .. import db, records
from ..models import TaskResultMeta
from ..tasks import ScheduledTask
from .compat import (
    TaskContext,
    TaskError,
    TaskResult,
    TaskResultStatus,
    normalize_json,
    task_backends,
    task_finished,
    task_started,
)

#: The Django task of each registered Celery task, by name (``task.module_path``).
REGISTRY: dict[str, Any] = {}
#: The row's ``meta`` key holding the workers of the attempts (Django's ``worker_ids``).
WORKERS_KEY = "workers"


class DjangoTask(ScheduledTask):
    """The Celery task that runs one Django task (its ``django_task``)."""

    abstract = True
    django_task: Any = None
    #: Django tasks take and return JSON (``normalize_json``), whatever the app's default.
    serializer = "json"
    #: The backend checks a call against the function's own signature at enqueue.
    typing = False
    #: Django's ``get_result`` reads what the worker stored: RUNNING and ``started_at`` too.
    ignore_result = False
    track_started = True


def register(task: Any) -> None:
    """The Celery task for ``task`` (once per function), on every Celery app."""
    name = task.module_path
    if name in REGISTRY:
        return
    REGISTRY[name] = task

    def run(celery_task: DjangoTask, *args: Any, **kwargs: Any) -> Any:
        return execute(celery_task, args, kwargs)

    run.__name__, run.__qualname__ = task.func.__name__, task.func.__qualname__
    run.__module__, run.__doc__ = task.func.__module__, task.func.__doc__
    shared_task(name=name, base=DjangoTask, bind=True, django_task=task, **task_options(task))(run)


def task_options(task: Any) -> dict[str, Any]:
    return dict(getattr(task, "celery_options", None) or {})


def celery_task(task: Any, app: Any) -> DjangoTask:
    return app.tasks[task.module_path]


def django_task_named(name: str | None) -> Any:
    """The Django task a Celery task name runs, or None (not a Django task)."""
    return REGISTRY.get(name or "")


@dataclass(frozen=True)
class Attempt:
    """What the row knows when an attempt starts."""

    enqueued_at: datetime | None
    started_at: datetime
    meta: dict[str, Any]

    @property
    def worker_ids(self) -> list[str]:
        return list(self.meta[WORKERS_KEY])


def begin_attempt(task_id: str, hostname: str) -> Attempt:
    """Add this worker to the row's workers (one statement on PostgreSQL; elsewhere a read
    and a write by the attempt's own runner: no other writer touches ``meta`` while it
    runs)."""
    row = db.run_with_reconnect(
        lambda using: TaskResultMeta.objects.add_worker(
            task_id, hostname, key=WORKERS_KEY, using=using
        )
    )
    return Attempt(row.date_submitted, row.date_started or timezone.now(), row.meta)


def execute(celery_task: DjangoTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    request = celery_task.request
    task = celery_task.django_task
    attempt = begin_attempt(request.id, request.hostname or "")
    running = TaskResult(
        task=task,
        id=request.id,
        status=TaskResultStatus.RUNNING,
        enqueued_at=attempt.enqueued_at,
        started_at=attempt.started_at,
        finished_at=None,
        last_attempted_at=attempt.started_at,
        args=list(args),
        kwargs=dict(kwargs),
        backend=task.backend,
        errors=[],
        worker_ids=attempt.worker_ids,
    )
    request.django_task_result = running
    # Kept by the attempt's later writes too (the final one may add the task's children).
    setattr(request, records.ROW_META, attempt.meta)
    task_started.send(type(task.get_backend()), task_result=running)
    if task.takes_context:
        value = task.call(TaskContext(task_result=running), *args, **kwargs)
    else:
        value = task.call(*args, **kwargs)
    return normalize_json(value)


def on_task_postrun(
    sender: Any = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    """Django's ``task_finished``, once Celery recorded a final outcome."""
    if not isinstance(task, DjangoTask) or state not in (states.SUCCESS, states.FAILURE):
        return
    running = getattr(task.request, "django_task_result", None)
    if running is None:  # failed before the function was called: nothing started
        return
    if state == states.SUCCESS:
        finished = replace(running, status=TaskResultStatus.SUCCESSFUL, finished_at=timezone.now())
        object.__setattr__(finished, "_return_value", retval)
    else:
        finished = replace(
            running,
            status=TaskResultStatus.FAILED,
            finished_at=timezone.now(),
            errors=[error_of(retval, "".join(traceback.format_exception(retval)))],
        )
    backend = task_backends[running.task.backend]
    task_finished.send(type(backend), task_result=finished)


def error_of(exc: Any, trace: str | None) -> TaskError:
    kind = type(exc) if isinstance(exc, BaseException) else Exception
    return TaskError(
        exception_class_path=f"{kind.__module__}.{kind.__qualname__}", traceback=trace or ""
    )


task_postrun.connect(on_task_postrun, weak=False)
