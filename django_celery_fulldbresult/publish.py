"""Publish tracking: a PENDING row for every task sent.

Enabled by ``DJANGO_CELERY_FULLDBRESULT_TRACK_PUBLISH = True``.

The row is read from the message in ``before_task_publish`` (which sees the
priority and the declared queue) and written in ``after_task_publish``, so a
message the broker refused leaves no row behind. The write is an
insert-if-absent on the dedicated autocommit connection:

* it never changes an existing row's state (a worker that already finished,
  a retry republishing the same id), it only fills what the row lacks;
* inside the caller's ``transaction.atomic()`` it commits at once: the worker
  never waits on the caller's locks and a rollback keeps the record of a task
  that was really sent;
* it never makes ``apply_async`` fail: errors are logged and the task is sent;
* it is written behind (``publish_writer``): ``apply_async`` queues the row and a thread
  of the process writes the queue, many rows per statement (``flush()`` waits for it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from celery import current_app
from django.db import connections, transaction

from . import conf, db, publish_writer, records, scheduler, secrecy
from .green import green_pool
from .models import TaskResultMeta
from .states import PENDING

logger = logging.getLogger(__name__)

_pending = threading.local()


def result_ignored(app: Any, name: str, headers: dict[str, Any]) -> bool:
    """True when the result may be ignored (per call, task attribute or task_ignore_result).

    Errs on the side of not tracking: a PENDING row for a result nobody stores
    would look stale forever. (Celery before 5.7 sends ``ignore_result=False``
    from ``send_task`` when the caller said nothing, and lets the task
    attribute win over the call.)
    """
    if headers.get("ignore_result"):
        return True
    task = records.registered_task(app, name)
    if task is not None:
        return bool(task.ignore_result)
    return bool(app.conf.task_ignore_result)


def on_before_publish(
    sender: str | None = None,
    body: Any = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    declare: Any = None,
    **kwargs: Any,
) -> None:
    _pending.values = None
    app = current_app
    if headers is not None and not isinstance(body, dict):  # protocol 2
        try:
            hide_secret_reprs(app, sender, body, headers)
        except Exception:  # noqa: BLE001 - never stop a publish; the worker hides them too
            logger.exception("secret tasks: could not check the reprs of %s", sender)
    if not (conf.track_publish() or recording_now()) or scheduler.is_forwarding():
        return  # the scheduler's own sends already have their row
    try:
        headers = headers if headers is not None else (body if isinstance(body, dict) else {})
        if result_ignored(app, sender, headers):
            return
        _pending.values = records.from_message(
            app, sender, body, headers, properties or {}, exchange, routing_key, declare
        )
    except Exception:  # noqa: BLE001 - tracking must never stop a publish
        logger.exception("publish tracking: could not read the message of %s", sender)


def hide_secret_reprs(app: Any, name: str | None, body: Any, headers: dict[str, Any]) -> None:
    """A secret call's message carries ``<N hidden>`` (or the caller's chosen repr), never
    Celery's default repr of its arguments, and says so (``secrecy.hide_message_reprs``)."""
    if not secrecy.is_secret(name, records.registered_task(app, name), headers):
        return
    args, kwargs, _embed = body
    secrecy.hide_message_reprs(headers, args, kwargs, app)


def on_after_publish(
    sender: str | None = None, body: Any = None, headers: dict[str, Any] | None = None, **kwargs
) -> None:
    values = getattr(_pending, "values", None)
    _pending.values = None
    if values is None:
        return
    task_id = (headers or {}).get("id") or (body.get("id") if isinstance(body, dict) else None)
    if task_id != values["task_id"]:
        return
    try:
        record(values)
    except Exception:  # noqa: BLE001
        logger.exception(
            "publish tracking: the task %s (%s) was sent but its PENDING row could not be written",
            values["task_id"],
            sender,
        )


@contextlib.contextmanager
def recorded_now() -> Iterator[dict[str, Any]]:
    """Track the publishes of this block whatever ``TRACK_PUBLISH`` says, each PENDING row
    written before ``apply_async`` returns (never behind): the Django Tasks backend's
    ``enqueue``, whose ``get_result`` must find the row at once. Yields a dict that holds
    the values of the last row written (``date_submitted``: the time it was enqueued)."""
    previous = getattr(_pending, "now", None)
    _pending.now = written = {}
    try:
        yield written
    finally:
        _pending.now = previous


def recording_now() -> bool:
    return getattr(_pending, "now", None) is not None


def joins_callers_transaction() -> bool:
    """On SQLite inside a transaction the row joins the caller's transaction.

    SQLite locks the whole database for a writing transaction, so a second
    connection would wait for the caller's commit (documented limitation of SQLite).
    """
    caller = connections[db.task_db_alias()]
    return caller.vendor == "sqlite" and caller.in_atomic_block


def tracking_alias() -> str:
    """Where to write: the dedicated connection, except when the row joins the caller's
    transaction (``joins_callers_transaction``)."""
    return db.task_db_alias() if joins_callers_transaction() else db.write_alias()


def writes_behind() -> bool:
    """Whether the row goes to the process's writer thread (``publish_writer``).

    Only where the row is written through the package's own autocommit connection anyway
    (never in Django's test environment, where a test must see its rows at once), outside
    gevent and eventlet workers (their statements have a runner of their own), and not on
    SQLite inside a transaction (the row joins it: ``joins_callers_transaction``).
    """
    if not conf.get("PUBLISH_WRITE_BEHIND") or not db.uses_own_connection() or green_pool():
        return False
    return db.in_event_loop() or not joins_callers_transaction()


def record(values: dict[str, Any]) -> None:
    """Write the PENDING row (insert-if-absent, fill-only): queued for the writer thread
    (``writes_behind``), else one statement here.

    From async code (an ASGI view, ``asyncio.run``) a direct write runs on the package's
    helper thread: Django refuses database calls in an event loop's thread.
    """
    values = {**values, "status": PENDING}
    now = getattr(_pending, "now", None)
    if now is not None:
        now.clear()
        now.update(values)
    elif writes_behind() and publish_writer.writer.submit(values):
        return
    if db.in_event_loop():  # the alias is the helper thread's own
        db.outside_event_loop(lambda: _record(values, db.write_alias()))
        return
    _record(values, tracking_alias())


def flush(timeout: float | None = 10.0) -> bool:
    """Wait until the PENDING rows of the tasks this process published are written (they
    are written by a thread, ``publish_writer``, moments after ``apply_async`` returns).
    True when none is left; False if ``timeout`` seconds were not enough."""
    return publish_writer.flush(timeout)


def _record(values: dict[str, Any], using: str) -> None:
    # The package's own connection is never in the caller's transaction (and under gevent
    # it lives on the statement runner, not in this greenlet).
    if not db.is_own_alias(using) and connections[using].in_atomic_block:
        # In the caller's transaction: a savepoint keeps a failed insert from
        # breaking the caller's transaction.
        with transaction.atomic(using=using):
            TaskResultMeta.objects.record_publish(values, using=using)
        return
    db.run_with_reconnect(
        lambda alias: TaskResultMeta.objects.record_publish(values, using=alias), using
    )
