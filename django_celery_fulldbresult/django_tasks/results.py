"""A task row as Django's ``TaskResult``: the status mapping, in one place.

=====================================================  =============================
Celery state (the row's ``status``)                    Django ``TaskResultStatus``
=====================================================  =============================
PENDING, SCHEDULED, SCHEDULED_SENT, RECEIVED, RETRY    READY (waiting, or to run again)
STARTED, and custom states (``update_state``)          RUNNING
SUCCESS                                                SUCCESSFUL
FAILURE, REVOKED, REJECTED                             FAILED
=====================================================  =============================
"""

from __future__ import annotations

from typing import Any

from celery import states as celery_states

from ..result_backends import META_COLUMNS
from ..states import PENDING, RECEIVED, RETRY, SCHEDULED, SCHEDULED_SENT
from . import runner
from .compat import TaskResult, TaskResultDoesNotExist, TaskResultStatus

#: The row's columns a result is built from.
COLUMNS = tuple(dict.fromkeys((*META_COLUMNS, "eta")))

STATUS: dict[str, TaskResultStatus] = {
    PENDING: TaskResultStatus.READY,
    SCHEDULED: TaskResultStatus.READY,
    SCHEDULED_SENT: TaskResultStatus.READY,
    RECEIVED: TaskResultStatus.READY,
    RETRY: TaskResultStatus.READY,
    celery_states.STARTED: TaskResultStatus.RUNNING,
    celery_states.SUCCESS: TaskResultStatus.SUCCESSFUL,
    celery_states.FAILURE: TaskResultStatus.FAILED,
    celery_states.REVOKED: TaskResultStatus.FAILED,
    celery_states.REJECTED: TaskResultStatus.FAILED,
}
FINISHED = frozenset({TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED})


def status_of(state: str) -> TaskResultStatus:
    """Custom states are progress reports of a running task."""
    return STATUS.get(state, TaskResultStatus.RUNNING)


def from_row(backend: Any, row: dict[str, Any] | None, result_id: str) -> TaskResult:
    """The ``TaskResult`` of a row; ``TaskResultDoesNotExist`` when there is none, or when
    it is not a Django task's (a plain Celery task of the project)."""
    task = runner.django_task_named(row["task"]) if row is not None else None
    if task is None:
        raise TaskResultDoesNotExist(result_id)
    meta = backend.celery_app.backend._meta_from_row(row)
    status = status_of(row["status"])
    task = _as_called(backend, task, row)
    workers = list((row["meta"] or {}).get(runner.WORKERS_KEY) or [])
    if not workers and row["hostname"] and status != TaskResultStatus.READY:
        workers = [row["hostname"]]  # a row written before the attempt recorded itself
    errors = []
    if status == TaskResultStatus.FAILED:
        errors = [runner.error_of(meta["result"], row["traceback"])]
    result = TaskResult(
        task=task,
        id=row["task_id"],
        status=status,
        enqueued_at=row["date_submitted"],
        started_at=row["date_started"],
        finished_at=row["date_done"] if status in FINISHED else None,
        last_attempted_at=row["date_started"],
        args=list(meta.get("args") or []),
        kwargs=dict(meta.get("kwargs") or {}),
        backend=backend.alias,
        errors=errors,
        worker_ids=workers,
    )
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", meta["result"])
    return result


def _as_called(backend: Any, task: Any, row: dict[str, Any]) -> Any:
    """The task as this call was made: its queue (a Django queue name of the backend) and,
    while it waits in the database, its ``run_after``."""
    changes: dict[str, Any] = {}
    queue = row["queue"]
    if queue and queue != task.queue_name and queue in backend.queues:
        changes["queue_name"] = queue
    if row["status"] == SCHEDULED and row["eta"] is not None and backend.supports_defer:
        changes["run_after"] = row["eta"]
    return task.using(**changes) if changes else task
