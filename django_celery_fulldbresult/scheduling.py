"""The database ETA scheduler.

Publish side: a task sent with an ``eta``/``countdown`` in the future is saved
as a SCHEDULED row (in the caller's transaction) instead of being published.
Sender side: due rows are claimed in short transactions, published outside
them with their original id and options, and marked SCHEDULED_SENT.

See "Database ETA scheduler" in docs/design.md for the protocol and its
guarantees (at most once; crashed claims are reported, never resent by
themselves).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import states
from celery.utils.time import maybe_make_aware
from django.db import connections, transaction
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone

from . import conf, db, records, serialization
from .states import SCHEDULED, SCHEDULED_SENT

logger = logging.getLogger(__name__)

_local = threading.local()

#: send_task keywords that describe *how* to send now, not the task itself.
TRANSIENT_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "producer",
        "connection",
        "router",
        "result_cls",
        "publisher",
        "task_type",
        "add_to_parent",
        "task_id",
        "retry",
        "retry_policy",
        "declare",
    }
)
#: Kept in their own columns.
COLUMN_OPTIONS = (
    "queue",
    "exchange",
    "routing_key",
    "priority",
    "root_id",
    "parent_id",
    "group_id",
    "retries",
    "expires",
)


def _exception_result(exc_type: str, exc_module: str, message: str) -> str:
    """A stored FAILURE/REVOKED result in Celery's JSON exception form."""
    return serialization.dumps(
        {"exc_type": exc_type, "exc_message": [message], "exc_module": exc_module}
    )


def _revoked(message: str) -> dict[str, Any]:
    """Column changes that make a waiting row REVOKED with ``TaskRevokedError(message)``."""
    now = timezone.now()
    return {
        "status": states.REVOKED,
        "result": _exception_result("TaskRevokedError", "celery.exceptions", message),
        "content_type": serialization.JSON_CONTENT_TYPE,
        "content_encoding": "utf-8",
        "date_done": now,
        "date_modified": now,
    }


# -- publish side ---------------------------------------------------------------------


@contextlib.contextmanager
def forwarding() -> Iterator[None]:
    """While the sender publishes: no interception, no publish tracking."""
    previous = getattr(_local, "forwarding", False)
    _local.forwarding = True
    try:
        yield
    finally:
        _local.forwarding = previous


def is_forwarding() -> bool:
    return getattr(_local, "forwarding", False)


def _as_aware(app: Any, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = records.to_datetime(value) if value else None
        if value is None:
            return None
    if isinstance(value, (int, float)):  # relative seconds (expires)
        return app.now() + timedelta(seconds=value)
    return maybe_make_aware(value, app.timezone)


def due_time(app: Any, countdown: Any, eta: Any) -> datetime | None:
    """The absolute time a call asks for (countdown wins over eta, as in Celery)."""
    if countdown:
        return app.now() + timedelta(seconds=float(countdown))
    return _as_aware(app, eta)


def wants_scheduling(app: Any, name: str, task: Any = None) -> bool:
    """Whether a task of this name may wait in the database at all."""
    if not conf.get("SCHEDULE_ETA") or is_forwarding() or app.conf.task_always_eager:
        return False
    if name.startswith("celery."):  # chord_unlock and friends stay in the broker
        return False
    if task is not None and getattr(task, "db_schedule", True) is False:
        return False
    if any(fnmatch.fnmatchcase(name, p) for p in conf.get("SCHEDULE_EXCLUDE")):
        return False
    # Secret tasks would have to store their arguments to be forwarded later.
    return records.stores_args(name, task)


def maybe_schedule(
    app: Any,
    name: str,
    args: Any = None,
    kwargs: Any = None,
    countdown: Any = None,
    eta: Any = None,
    task_id: str | None = None,
    result_cls: Any = None,
    add_to_parent: bool = True,
    task_type: Any = None,
    **options: Any,
) -> Any:
    """Save the call as a SCHEDULED row if it asks for a future time; else return None.

    ``options`` are ``send_task``'s keywords. The returned ``AsyncResult`` has the
    task's own id and becomes ready when the forwarded task finishes.
    """
    task = task_type if task_type is not None else app.tasks.get(name)
    if countdown is None and eta is None:
        return None
    if not wants_scheduling(app, name, task):
        return None
    when = due_time(app, countdown, eta)
    min_delay = float(conf.get("SCHEDULE_MIN_DELAY"))
    if when is None or when <= app.now() + timedelta(seconds=min_delay):
        return None  # already due: publish at once
    values = _scheduled_row(app, name, args, kwargs, task, task_id, when, options)
    if values is None:
        return None
    from .models import TaskResultMeta

    # The caller's connection: the row is part of the caller's transaction, so
    # a rollback means the task is never sent.
    TaskResultMeta.objects.store_state(
        values,
        using=db.task_db_alias(),
        retries=values["retries"],
        replace_call=True,
    )
    result = (result_cls or app.AsyncResult)(values["task_id"])
    parent = app.current_worker_task
    if add_to_parent and parent is not None:
        parent.add_trail(result)
    return result


_original_send_task = None


def patch_send_task() -> None:
    """MONKEY_PATCH_ASYNC: every app's ``send_task`` (so apply_async, delay, signatures,
    retry) goes through ``maybe_schedule`` first. Idempotent; see ``unpatch_send_task``.
    """
    global _original_send_task
    from celery.app.base import Celery

    if _original_send_task is not None:
        return
    original = Celery.send_task

    def send_task(self, name, args=None, kwargs=None, **options):
        result = maybe_schedule(self, name, args, kwargs, **options)
        if result is not None:
            return result
        return original(self, name, args, kwargs, **options)

    send_task.__wrapped__ = original
    _original_send_task = original
    Celery.send_task = send_task


def unpatch_send_task() -> None:
    global _original_send_task
    from celery.app.base import Celery

    if _original_send_task is not None:
        Celery.send_task = _original_send_task
        _original_send_task = None


def _scheduled_row(
    app: Any,
    name: str,
    args: Any,
    kwargs: Any,
    task: Any,
    task_id: str | None,
    when: datetime,
    options: dict[str, Any],
) -> dict[str, Any] | None:
    options = {k: v for k, v in options.items() if k not in TRANSIENT_OPTIONS}
    if task is not None and hasattr(task, "_get_exec_options"):
        defaults = {k: v for k, v in task._get_exec_options().items() if v is not None}
        options = {**defaults, **options}
    parent = app.current_worker_task
    if parent is not None:
        options.setdefault("root_id", parent.request.root_id or parent.request.id)
        options.setdefault("parent_id", parent.request.id)
    task_id = task_id or str(uuid.uuid4())
    options.setdefault("root_id", task_id)
    routed = app.amqp.router.route(dict(options), name, args, kwargs, task)
    queue = routed.get("queue")
    queue_name = getattr(queue, "name", queue)
    exchange = options.get("exchange")
    expires = _as_aware(app, options.get("expires"))
    call_options = {k: v for k, v in options.items() if k not in COLUMN_OPTIONS and v is not None}
    options_text = records.options_text(call_options)
    if call_options and options_text is None:
        logger.warning("%s: options cannot be stored as JSON; sent with a broker ETA", name)
        return None
    now = timezone.now()
    return {
        "task_id": task_id,
        "task": name,
        "status": SCHEDULED,
        **records.call_columns(
            name, args, kwargs, options.get("argsrepr"), options.get("kwargsrepr"), task, app
        ),
        "options": options_text,
        "queue": queue_name,
        "exchange": getattr(exchange, "name", exchange) or None,
        "routing_key": options.get("routing_key"),
        "priority": options.get("priority"),
        "root_id": options.get("root_id"),
        "parent_id": records.parent_of(options.get("parent_id"), task_id),
        "group_id": options.get("group_id"),
        "retries": int(options.get("retries") or 0),
        "eta": records.to_datetime(when),
        "expires": records.to_datetime(expires),
        "date_submitted": now,
        "date_modified": now,
    }


# -- sender side ----------------------------------------------------------------------

CLAIM_COLUMNS = (
    "id",
    "task_id",
    "task",
    "packed_args",
    "packed_args_content_type",
    *COLUMN_OPTIONS,
)
#: Read as text and decoded row by row (``send_kwargs``): a corrupt stored value fails
#: its own row instead of the read of the whole claimed batch.
JSON_CLAIM_COLUMNS = ("args", "kwargs", "options")


def claimed_values(queryset: Any, *extra: str) -> list[dict[str, Any]]:
    """The claim columns of ``queryset``'s rows; JSON columns as ``<name>_json`` text."""
    as_text = {f"{c}_json": Cast(c, output_field=TextField()) for c in JSON_CLAIM_COLUMNS}
    return list(queryset.values(*CLAIM_COLUMNS, *extra, **as_text))


@dataclass
class PassResult:
    claimed: int = 0
    sent: int = 0
    released: int = 0
    expired: int = 0
    failed: int = 0


def _scheduled_rows(using: str):
    from .models import TaskResultMeta

    return TaskResultMeta.objects.using(using).filter(status=SCHEDULED)


def expire_due(using: str) -> int:
    """Revoke due rows whose ``expires`` passed: they are never sent (one UPDATE)."""
    now = db.DatabaseNow()
    return (
        _scheduled_rows(using)
        .filter(scheduled_id__isnull=True, eta__lte=now, expires__lte=now)
        .update(**_revoked("expired before it was sent"))
    )


def claim(using: str, token: uuid.UUID, batch_size: int) -> list[dict[str, Any]]:
    """Atomically claim up to ``batch_size`` due rows for ``token``; return them, by eta.

    ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it; SQLite
    serialises writers and the UPDATE re-checks that the row is unclaimed.
    Due is decided by the database clock.
    """
    connection = connections[using]
    now = db.DatabaseNow()
    with transaction.atomic(using=using):
        due = (
            _scheduled_rows(using)
            .filter(scheduled_id__isnull=True, eta__lte=now)
            .exclude(expires__lte=now)
            .order_by("eta")
        )
        if connection.features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True)
        ids = list(due.values_list("id", flat=True)[:batch_size])
        if not ids:
            return []
        _scheduled_rows(using).filter(id__in=ids, scheduled_id__isnull=True).update(
            scheduled_id=token, date_claimed=timezone.now()
        )
    # By primary key (the token alone has no index); the token keeps only what we won.
    return claimed_values(
        _scheduled_rows(using).filter(id__in=ids, scheduled_id=token).order_by("eta")
    )


def send_kwargs(row: dict[str, Any], app: Any) -> tuple[list, dict, dict[str, Any]]:
    """(args, kwargs, send_task keywords) that re-create the scheduled call."""
    if row["packed_args"] is not None:
        args, kwargs = serialization.decode_packed(
            row["packed_args"], row["packed_args_content_type"], app.conf.accept_content
        )
    else:
        args, kwargs = _stored_json(row, "args", list), _stored_json(row, "kwargs", dict)
    options = _stored_json(row, "options", dict)
    for column in COLUMN_OPTIONS:
        if row.get(column) is not None:
            options[column] = row[column]
    options["retries"] = row["retries"]
    return args, kwargs, options


def _stored_json(row: dict[str, Any], column: str, kind: type) -> Any:
    """Decode one stored JSON column of a claimed row; TypeError names what is wrong."""
    text = row.get(f"{column}_json")
    value = kind() if text is None else serialization.loads(text)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"stored {column} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _mark(using: str, ids: list[int], token: uuid.UUID, **changes: Any) -> int:
    """Change rows still SCHEDULED under our claim (one UPDATE)."""
    if not ids:
        return 0
    return (
        _scheduled_rows(using)
        .filter(id__in=ids, scheduled_id=token)
        .update(**changes, date_modified=timezone.now())
    )


def _fail(using: str, row: dict[str, Any], token: uuid.UUID, error: BaseException) -> None:
    logger.error("scheduled task %s (%s) cannot be sent: %r", row["task_id"], row["task"], error)
    _mark(
        using,
        [row["id"]],
        token,
        status=states.FAILURE,
        result=_exception_result(
            type(error).__name__,
            type(error).__module__,
            f"cannot forward the scheduled task: {error}",
        ),
        content_type=serialization.JSON_CONTENT_TYPE,
        content_encoding="utf-8",
        traceback=f"cannot forward the scheduled task: {error!r}",
        date_done=timezone.now(),
    )


@contextlib.contextmanager
def confirmed_producer(app: Any) -> Iterator[Any]:
    """A producer whose ``publish`` returns once the broker has the message.

    Without publisher confirms, AMQP reports success as soon as the message is in
    the socket: a broker restart then loses it silently, and the row would say
    SCHEDULED_SENT (found by the soak suite). ``SCHEDULER_CONFIRM_PUBLISH`` turns
    confirms on for the sender's own connection (Redis replies to every command).
    """
    if not conf.get("SCHEDULER_CONFIRM_PUBLISH"):
        with app.producer_or_acquire() as producer:
            yield producer
        return
    with app.connection_for_write(transport_options={"confirm_publish": True}) as connection:
        yield app.amqp.Producer(connection)


def publish_rows(app: Any, rows: list[dict[str, Any]], using: str, token: uuid.UUID) -> PassResult:
    """Publish claimed rows on one broker connection; record what happened to each."""
    outcome = PassResult(claimed=len(rows))
    sent: list[int] = []
    pending = list(rows)
    try:
        with forwarding(), confirmed_producer(app) as producer:
            while pending:
                row = pending[0]
                try:
                    args, kwargs, options = send_kwargs(row, app)
                except Exception as exc:  # noqa: BLE001 - a bad row must not stop the rest
                    _fail(using, row, token, exc)
                    outcome.failed += 1
                    pending.pop(0)
                    continue
                app.send_task(
                    row["task"],
                    args,
                    kwargs,
                    task_id=row["task_id"],
                    producer=producer,
                    add_to_parent=False,
                    **options,
                )
                sent.append(row["id"])
                pending.pop(0)
    except Exception as exc:  # noqa: BLE001 - broker trouble: give the rest back
        logger.error("scheduler: publishing failed (%r); %d rows released", exc, len(pending))
    finally:
        # A row the worker already moved on (STARTED, SUCCESS) is left as it is.
        _mark(using, sent, token, status=SCHEDULED_SENT)
        outcome.sent = len(sent)
        outcome.released = _mark(
            using, [row["id"] for row in pending], token, scheduled_id=None, date_claimed=None
        )
    return outcome


def run_pass(app: Any, batch_size: int | None = None, using: str | None = None) -> PassResult:
    """Expire, claim one batch, publish it, record it."""
    using = using or db.task_db_alias()
    batch_size = batch_size or int(conf.get("SCHEDULER_BATCH_SIZE"))
    expired = expire_due(using)
    token = uuid.uuid4()
    rows = claim(using, token, batch_size)
    outcome = publish_rows(app, rows, using, token) if rows else PassResult()
    outcome.expired = expired
    return outcome


def forward_due(
    app: Any, batch_size: int | None = None, max_seconds: float | None = None
) -> PassResult:
    """Forward every due row (batch after batch) until none is due or time is up."""
    total = PassResult()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while True:
        outcome = run_pass(app, batch_size)
        for field in ("claimed", "sent", "released", "expired", "failed"):
            setattr(total, field, getattr(total, field) + getattr(outcome, field))
        if outcome.claimed == 0 or outcome.released:
            return total
        if deadline is not None and time.monotonic() > deadline:
            return total


def seconds_until_next(using: str | None = None, cap: float = 1.0) -> float:
    """How long a sender may sleep: until the next eta, at most ``cap`` seconds."""
    using = using or db.task_db_alias()
    next_eta = (
        _scheduled_rows(using)
        .filter(scheduled_id__isnull=True)
        .order_by("eta")
        .values_list("eta", flat=True)
        .first()
    )
    if next_eta is None:
        return cap
    now = timezone.now()
    if timezone.is_naive(next_eta) and timezone.is_aware(now):
        now = timezone.make_naive(now)
    return max(0.0, min(cap, (next_eta - now).total_seconds()))


# -- operator API ---------------------------------------------------------------------


def cancel_scheduled(task_id: str, using: str | None = None) -> bool:
    """Revoke a scheduled task that was not sent yet; True means it never will be.

    False when the task is not waiting (already sent, running, finished) or a
    sender holds it right now (in flight: it may be on its way to the broker).
    """
    using = using or db.task_db_alias()
    return bool(
        _scheduled_rows(using)
        .filter(task_id=task_id, scheduled_id__isnull=True)
        .update(**_revoked("cancelled before it was sent"))
    )


def resend_stale(app: Any, rows: list[dict[str, Any]], using: str | None = None) -> PassResult:
    """Re-send claimed rows a crashed sender left behind (on purpose: may duplicate)."""
    using = using or db.task_db_alias()
    outcome = PassResult()
    for row in rows:
        token = row["scheduled_id"]
        result = publish_rows(app, [row], using, token)
        outcome.sent += result.sent
        outcome.failed += result.failed
        outcome.released += result.released
    return outcome
