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
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from celery import states
from celery.utils.functional import maybe_list
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
    if countdown is None and eta is None:
        return None
    task = task_type if task_type is not None else app.tasks.get(name)
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
        # The reprs the message would have carried, so the forwarded message carries them.
        **records.call_columns(
            name,
            args,
            kwargs,
            options.get("argsrepr") or records.message_repr(args or (), app),
            options.get("kwargsrepr") or records.message_repr(kwargs or {}, app),
            task,
            app,
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
    "argsrepr",
    "kwargsrepr",
    "eta",
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

    PostgreSQL: one ``WITH due AS (SELECT ... FOR UPDATE SKIP LOCKED) UPDATE ...
    RETURNING`` (its own transaction in autocommit). MySQL/MariaDB: ``SELECT ...
    FOR UPDATE SKIP LOCKED`` and an UPDATE in one short transaction (no UPDATE ...
    RETURNING there). SQLite serialises writers and the UPDATE re-checks that the
    row is unclaimed. Due is decided by the database clock.
    """
    connection = connections[using]
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        return _claim_returning(using, token, batch_size)
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


_EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)


def _claim_returning(using: str, token: uuid.UUID, batch_size: int) -> list[dict[str, Any]]:
    """The PostgreSQL claim: one statement, one round trip (see ``claim``)."""
    from .models import TaskResultMeta

    connection = connections[using]
    meta = TaskResultMeta._meta
    fields = [meta.get_field(name) for name in CLAIM_COLUMNS]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    # JSON columns come back as text, decoded row by row (see JSON_CLAIM_COLUMNS).
    returning = ", ".join(
        [f"claimed.{quote(field.column)}" for field in fields]
        + [f"claimed.{quote(name)}::text" for name in JSON_CLAIM_COLUMNS]
    )
    # The CTE is MATERIALIZED so that the LIMIT holds: an `id IN (SELECT ... LIMIT n FOR
    # UPDATE SKIP LOCKED)` subquery may be rescanned by the plan and claim more than n rows.
    # Its WHERE matches the partial index fdr_scheduled_eta_idx (status = SCHEDULED).
    statement = f"""
        WITH due AS MATERIALIZED (
            SELECT id FROM {table}
            WHERE status = %s AND scheduled_id IS NULL AND eta <= STATEMENT_TIMESTAMP()
              AND (expires IS NULL OR expires > STATEMENT_TIMESTAMP())
            ORDER BY eta
            LIMIT %s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE {table} AS claimed
        SET scheduled_id = %s, date_claimed = STATEMENT_TIMESTAMP()
        FROM due
        WHERE claimed.id = due.id AND claimed.scheduled_id IS NULL
        RETURNING {returning}
    """
    with connection.cursor() as cursor:
        cursor.execute(statement, [SCHEDULED, batch_size, token])
        fetched = cursor.fetchall()
    names = [field.name for field in fields] + [f"{name}_json" for name in JSON_CLAIM_COLUMNS]
    rows = [dict(zip(names, values, strict=True)) for values in fetched]
    rows.sort(key=lambda row: row["eta"] or _EPOCH)
    return rows


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
    # The caller's reprs (possibly redacted): Celery would otherwise saferepr the
    # arguments again for every forwarded message.
    for column in ("argsrepr", "kwargsrepr"):
        if row.get(column) is not None:
            options[column] = row[column]
    return args, kwargs, options


#: ``send_task`` keywords that are fields of the task message itself.
MESSAGE_FIELDS = (
    "group_id",
    "group_index",
    "retries",
    "chord",
    "reply_to",
    "time_limit",
    "soft_time_limit",
    "root_id",
    "parent_id",
    "shadow",
    "chain",
    "ignore_result",
    "replaced_task_nesting",
    "argsrepr",
    "kwargsrepr",
)


def send_message(
    app: Any,
    producer: Any,
    name: str,
    args: list,
    kwargs: dict,
    task_id: str,
    options: dict[str, Any],
    declare: list | None = None,
    sent_event: bool = False,
) -> None:
    """Publish a stored call the way ``app.send_task`` would, minus what a stored row
    already settled (the task's default options were merged when it was scheduled, and the
    caller's parent is in the row) and the per-message configuration lookups, which cost
    about a third of ``send_task`` with Django settings behind ``app.conf``.

    Built from Celery's own ``amqp.create_task_message`` and ``amqp.send_task_message``,
    so the message, the publish signals and the retry policy are Celery's.
    """
    options = dict(options)
    link, link_error = options.pop("link", None), options.pop("link_error", None)
    fields = {key: options.pop(key) for key in MESSAGE_FIELDS if key in options}
    expires = options.pop("expires", None)
    route_name = options.pop("route_name", None)
    options = app.amqp.router.route(options, route_name or name, args, kwargs, app.tasks.get(name))
    if expires is not None:
        expires = _as_aware(app, expires)
        # RabbitMQ drops the message when it expires in the queue (as send_task sets it).
        options["expiration"] = max(0.0, (expires - app.now()).total_seconds())
    fields["reply_to"] = fields.get("reply_to") or app.thread_oid
    message = app.amqp.create_task_message(
        task_id,
        name,
        args,
        kwargs,
        expires=expires,
        callbacks=maybe_list(link),
        errbacks=maybe_list(link_error),
        create_sent_event=sent_event,
        **fields,
        **options,
    )
    for stamp in options.pop("stamped_headers", None) or ():
        options.pop(stamp, None)
    with producer.connection._reraise_as_library_errors():
        if not fields.get("ignore_result"):
            app.backend.on_task_call(producer, task_id)
        app.amqp.send_task_message(producer, name, message, declare=declare, **options)


class _Declarations:
    """Queues bound once per batch to the producer's channel.

    ``send_task`` would look up and bind (copy) the queue for every message;
    a bound queue is declared through kombu's cache just the same, and is
    declared again after a reconnect (the cache is per connection).
    """

    def __init__(self, app: Any, producer: Any) -> None:
        self.app, self.producer, self.bound = app, producer, {}

    def declare_for(self, queue: str | None) -> list | None:
        if not queue:
            return None  # send_task decides (exchange-only routing)
        if queue not in self.bound:
            try:
                self.bound[queue] = [self.app.amqp.queues[queue].bind(self.producer.channel)]
            except KeyError:  # unknown queue and task_create_missing_queues off
                self.bound[queue] = None
        return self.bound[queue]


def _stored_json(row: dict[str, Any], column: str, kind: type) -> Any:
    """Decode one stored JSON column of a claimed row; TypeError names what is wrong."""
    text = row[f"{column}_json"]  # rows come from claimed_values()
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


@dataclass
class _Published:
    sent: list[int]
    unsent: list[int]
    #: Rows that cannot be sent (undecodable) and why: recorded as FAILURE with the batch.
    failures: list[tuple[dict[str, Any], BaseException]] = field(default_factory=list)
    #: Published, but the broker's confirm never came: they stay claimed (reported stale).
    unconfirmed: list[int] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


@dataclass
class _Unsettled:
    """A batch whose claim or record may not have reached the database (it was down)."""

    token: uuid.UUID
    #: Published and confirmed: to become SCHEDULED_SENT.
    sent: list[int] = field(default_factory=list)
    #: Published, never confirmed: stay claimed (reported stale, as after a crash).
    keep: list[int] = field(default_factory=list)


class _Ledger:
    """Batches this process could not record, settled once the database answers again.

    A claim whose answer was lost (the connection dropped at COMMIT) or a record that failed
    leaves rows claimed by our token. Every one of them that was not published is given back,
    by token; without this, a database outage would strand them until an operator resends.
    It lives as long as the process: a sender killed meanwhile leaves them reported stale.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[_Unsettled] = []

    def add(self, batch: _Unsettled) -> None:
        with self._lock:
            self._batches.append(batch)

    def __len__(self) -> int:
        with self._lock:
            return len(self._batches)

    def settle(self, using: str) -> tuple[int, int]:
        """Record every pending batch, oldest first; (sent, released). Raises if the
        database is still down (what is left stays for the next call)."""
        sent = released = 0
        while True:
            with self._lock:
                if not self._batches:
                    break
                batch = self._batches[0]
            sent += _mark(using, batch.sent, batch.token, status=SCHEDULED_SENT)
            released += (
                _scheduled_rows(using)
                .filter(scheduled_id=batch.token)
                .exclude(id__in=batch.sent + batch.keep)
                .update(scheduled_id=None, date_claimed=None, date_modified=timezone.now())
            )
            with self._lock:
                self._batches.remove(batch)
        if sent or released:
            logger.warning(
                "scheduler: the database is back; %d forwarded tasks recorded as sent, %d "
                "claimed but unsent tasks released",
                sent,
                released,
            )
        return sent, released


_unsettled = _Ledger()


def settle_unrecorded(using: str | None = None) -> tuple[int, int]:
    """Record what a database outage kept this process from recording; (sent, released).

    ``forward_due`` calls it first; ``run_scheduler`` also calls it before exiting.
    """
    return _unsettled.settle(using or db.task_db_alias())


def unrecorded_batches() -> int:
    """How many batches this process still has to record (see ``settle_unrecorded``)."""
    return len(_unsettled)


class _Confirms:
    """AMQP publisher confirms on the sender's own channel, awaited in windows.

    Without confirms a publish "succeeds" once the message is in the socket, and a broker
    going down in that instant loses it while its row says SCHEDULED_SENT. Waiting for
    each confirm would halve the rate, so the sender waits once per window. Transports
    without confirms (Redis answers every command) count a publish as confirmed.
    """

    def __init__(self, producer: Any) -> None:
        channel = producer.channel
        self.connection = producer.connection
        self.enabled = bool(conf.get("SCHEDULER_CONFIRM_PUBLISH")) and (
            self.connection.transport.driver_type == "amqp" and hasattr(channel, "confirm_select")
        )
        self.window = max(1, int(conf.get("SCHEDULER_CONFIRM_WINDOW")))
        self.tag = 0
        self.waiting: dict[int, int] = {}  # delivery tag -> row id
        self.confirmed: list[int] = []
        self.refused: list[int] = []
        if self.enabled:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)

    def published(self, row_id: int) -> None:
        if not self.enabled:
            self.confirmed.append(row_id)
            return
        self.tag += 1
        self.waiting[self.tag] = row_id
        if len(self.waiting) >= self.window:
            self.wait()

    def _settle(self, tag: int, multiple: bool, into: list[int]) -> None:
        tags = [t for t in self.waiting if t <= tag] if multiple else [tag]
        into.extend(self.waiting.pop(t) for t in tags if t in self.waiting)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, self.confirmed)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, self.refused)

    def take(self) -> tuple[list[int], list[int], list[int]]:
        """(confirmed, refused, still unconfirmed) row ids since the last call; forgets them."""
        result = self.confirmed, self.refused, list(self.waiting.values())
        self.confirmed, self.refused, self.waiting = [], [], {}
        return result

    def wait(self) -> None:
        """Until every published message is confirmed (or refused); raises on timeout."""
        deadline = time.monotonic() + float(conf.get("SCHEDULER_CONFIRM_TIMEOUT"))
        while self.waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the broker did not confirm {len(self.waiting)} messages")
            with contextlib.suppress(socket.timeout):
                self.connection.drain_events(timeout=min(remaining, 1.0))


class _Sender:
    """The sender's producer, on a connection of its own: its channel is put in confirm mode
    (which must not leak into the app's producer pool), and delivery tags count per channel."""

    def __init__(self, app: Any, connection: Any) -> None:
        self.producer = app.amqp.Producer(connection, auto_declare=False)
        self._confirms: _Confirms | None = None

    @property
    def confirms(self) -> _Confirms:
        if self._confirms is None:
            self._confirms = _Confirms(self.producer)  # connects
        return self._confirms


@contextlib.contextmanager
def _sender(app: Any) -> Iterator[_Sender]:
    with app.connection_for_write() as connection:
        yield _Sender(app, connection)


def _publish(app: Any, sender: _Sender, rows: list[dict[str, Any]]) -> _Published:
    """Publish claimed rows in order, until the broker fails; collect what it confirmed.

    No SQL here: the caller records the outcome (in the pipelined sender, on the database
    thread, so that a dead connection never sits on the publishing thread).
    """
    failures: list[tuple[dict[str, Any], BaseException]] = []
    pending = list(rows)
    producer = sender.producer
    try:
        confirms = sender.confirms
    except Exception as exc:  # noqa: BLE001 - broker down: give everything back
        logger.error("scheduler: cannot reach the broker (%r); %d rows released", exc, len(rows))
        return _Published([], [row["id"] for row in rows])
    try:
        declarations = _Declarations(app, producer)
        sent_event = bool(app.conf.task_send_sent_event)
        with forwarding():
            while pending:
                row = pending[0]
                try:
                    args, kwargs, options = send_kwargs(row, app)
                except Exception as exc:  # noqa: BLE001 - a bad row must not stop the rest
                    logger.error(
                        "scheduled task %s (%s) cannot be sent: %r",
                        row["task_id"],
                        row["task"],
                        exc,
                    )
                    failures.append((row, exc))
                    pending.pop(0)
                    continue
                if confirms.enabled:
                    # A retry would republish on a new channel, outside our confirm tracking;
                    # the row is released instead and sent on a later pass.
                    options["retry"] = False
                send_message(
                    app,
                    producer,
                    row["task"],
                    args,
                    kwargs,
                    row["task_id"],
                    options,
                    declare=declarations.declare_for(options.get("queue")),
                    sent_event=sent_event,
                )
                pending.pop(0)
                confirms.published(row["id"])
            confirms.wait()
    except Exception as exc:  # noqa: BLE001 - broker trouble: give the rest back
        logger.error("scheduler: publishing failed (%r); %d rows released", exc, len(pending))
        if confirms.waiting:  # what the broker did get may still be confirmed
            with contextlib.suppress(Exception):
                confirms.wait()
    confirmed, refused, unconfirmed = confirms.take()
    if unconfirmed:
        logger.error(
            "scheduler: the broker did not confirm %d forwarded tasks; they stay claimed and "
            "find_stale_scheduled_tasks reports them",
            len(unconfirmed),
        )
    if refused:
        logger.error("scheduler: the broker refused %d tasks; released", len(refused))
    return _Published(confirmed, refused + [row["id"] for row in pending], failures, unconfirmed)


def _record(using: str, token: uuid.UUID, published: _Published) -> int:
    """Mark sent rows SCHEDULED_SENT, failed ones FAILURE, release the unsent ones; return how
    many were released. A row the worker already moved on (STARTED, SUCCESS) is left as it is.

    If the database fails, the batch goes to the ledger (``settle_unrecorded``) and the error
    is raised.
    """
    try:
        _mark(using, published.sent, token, status=SCHEDULED_SENT)
        for row, error in published.failures:
            _fail(using, row, token, error)
        return _mark(using, published.unsent, token, scheduled_id=None, date_claimed=None)
    except Exception:
        _unsettled.add(_Unsettled(token, published.sent, published.unconfirmed))
        raise


def _outcome(claimed: int, published: _Published, released: int) -> PassResult:
    return PassResult(
        claimed=claimed, sent=len(published.sent), released=released, failed=published.failed
    )


def publish_rows(app: Any, rows: list[dict[str, Any]], using: str, token: uuid.UUID) -> PassResult:
    """Publish claimed rows on one broker connection; record what happened to each."""
    published = _Published([], [row["id"] for row in rows])
    try:
        with _sender(app) as sender:
            published = _publish(app, sender, rows)
    finally:
        released = _record(using, token, published)
    return _outcome(len(rows), published, released)


def run_pass(app: Any, batch_size: int | None = None, using: str | None = None) -> PassResult:
    """Expire, claim one batch, publish it, record it."""
    using = using or db.task_db_alias()
    batch_size = batch_size or int(conf.get("SCHEDULER_BATCH_SIZE"))
    expired = expire_due(using)
    token = uuid.uuid4()
    rows = _claim_or_remember(using, token, batch_size)
    outcome = publish_rows(app, rows, using, token) if rows else PassResult()
    outcome.expired = expired
    return outcome


def _claim_or_remember(using: str, token: uuid.UUID, batch_size: int) -> list[dict[str, Any]]:
    """``claim``; if it fails, the claim may still have committed: the ledger gives it back."""
    try:
        return claim(using, token, batch_size)
    except Exception:
        _unsettled.add(_Unsettled(token))
        raise


def _add(total: PassResult, outcome: PassResult) -> None:
    for name in ("claimed", "sent", "released", "expired", "failed"):
        setattr(total, name, getattr(total, name) + getattr(outcome, name))


def forward_due(
    app: Any, batch_size: int | None = None, max_seconds: float | None = None
) -> PassResult:
    """Forward every due row (batch after batch) until none is due or time is up.

    The database work runs in a second thread, overlapped with publishing: while
    batch N is published, batch N+1 is claimed and batch N-1 recorded (see
    docs/design.md, "Pipelining"). Inside a transaction everything stays on the
    caller's connection, one pass after the other.
    """
    using = db.task_db_alias()
    batch_size = batch_size or int(conf.get("SCHEDULER_BATCH_SIZE"))
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    total = PassResult()
    if connections[using].in_atomic_block:
        settle_unrecorded(using)
        while True:
            outcome = run_pass(app, batch_size, using)
            _add(total, outcome)
            if outcome.claimed == 0 or outcome.released:
                return total
            if deadline is not None and time.monotonic() > deadline:
                return total
    with _DatabaseThread(using) as database:
        database.submit(settle_unrecorded, using).result()
        with _sender(app) as sender:
            _forward_pipelined(app, sender, database, using, batch_size, deadline, total)
    return total


def _forward_pipelined(
    app: Any,
    sender: _Sender,
    database: _DatabaseThread,
    using: str,
    batch_size: int,
    deadline: float | None,
    total: PassResult,
) -> None:
    def claim_batch(token: uuid.UUID) -> tuple[int, list[dict[str, Any]]]:
        return expire_due(using), _claim_or_remember(using, token, batch_size)

    def claim_ahead() -> tuple[uuid.UUID, Future]:
        token = uuid.uuid4()
        return token, database.submit(claim_batch, token)

    ahead: tuple[uuid.UUID, Future] | None = claim_ahead()
    records: list[tuple[Future, int, _Published]] = []
    try:
        while ahead is not None:
            token, claimed = ahead
            ahead = None
            expired, rows = claimed.result()
            total.expired += expired
            if not rows:
                break
            if deadline is None or time.monotonic() <= deadline:
                ahead = claim_ahead()  # overlaps the publishing below
            published = _publish(app, sender, rows)
            recorded = database.submit(_record, using, token, published)
            records.append((recorded, len(rows), published))
            if published.unsent or published.unconfirmed:
                # The broker failed: stop, and give back what we claimed ahead.
                break
    finally:
        error = _finish_pipeline(database, using, ahead, records, total)
    if error is not None:
        raise error


def _finish_pipeline(
    database: _DatabaseThread,
    using: str,
    ahead: tuple[uuid.UUID, Future] | None,
    records: list[tuple[Future, int, _Published]],
    total: PassResult,
) -> BaseException | None:
    """Give back the batch claimed ahead and wait for every record; the first database error.

    Whatever the database did not take is in the ledger by then (``_claim_or_remember``,
    ``_record``, or here), so an error loses nothing: the next pass settles it.
    """
    error: BaseException | None = None
    if ahead is not None:  # claimed ahead, never published: give it back at once
        token, claimed = ahead
        try:
            expired, rows = claimed.result()
        except Exception as exc:  # noqa: BLE001 - database down: _claim_or_remember kept it
            expired, rows, error = 0, [], exc
        total.expired += expired
        total.claimed += len(rows)
        ids = [row["id"] for row in rows]
        try:
            release = database.submit(
                _mark, using, ids, token, scheduled_id=None, date_claimed=None
            )
            total.released += release.result()
        except Exception as exc:  # noqa: BLE001 - database down: the ledger gives them back
            _unsettled.add(_Unsettled(token))
            error = error or exc
    for recorded, claimed_count, published in records:
        try:
            released = recorded.result()
        except Exception as exc:  # noqa: BLE001 - database down: _record put it in the ledger
            error = error or exc
            released = 0
        _add(total, _outcome(claimed_count, published, released))
    return error


class _DatabaseThread:
    """One thread, with its own database connection, that runs the sender's SQL in order."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulldb-scheduler")

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def __enter__(self) -> _DatabaseThread:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # The thread's connection is its own: close it there, then stop the thread.
        self.executor.submit(db.close_quietly, self.using).result()
        self.executor.shutdown(wait=True)


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


def send_now(app: Any, task_ids: list[str], using: str | None = None) -> dict[str, str]:
    """Forward these scheduled tasks now instead of at their eta; task id -> what happened.

    Claim-safe: the rows are claimed with a token of our own by the same
    conditional UPDATE a sender uses (only unclaimed, unexpired SCHEDULED rows),
    then published and recorded by ``publish_rows``. A row a sender holds, or
    that is no longer SCHEDULED, is left alone: nothing is sent twice.
    Outcomes: ``sent``, ``failed``, ``released`` (broker down: SCHEDULED again),
    ``not claimed`` (not waiting, expired, or held by a sender).
    """
    using = using or db.task_db_alias()
    token = uuid.uuid4()
    now = db.DatabaseNow()
    (
        _scheduled_rows(using)
        .filter(task_id__in=task_ids, scheduled_id__isnull=True)
        .exclude(expires__lte=now)
        .update(scheduled_id=token, date_claimed=timezone.now())
    )
    rows = claimed_values(_scheduled_rows(using).filter(task_id__in=task_ids, scheduled_id=token))
    outcomes = dict.fromkeys(task_ids, "not claimed")
    if not rows:
        return outcomes
    publish_rows(app, rows, using, token)
    from .models import TaskResultMeta

    after = TaskResultMeta.objects.using(using).filter(id__in=[row["id"] for row in rows])
    for task_id, status, claim in after.values_list("task_id", "status", "scheduled_id"):
        if status == SCHEDULED and claim is None:
            outcomes[task_id] = "released"
        elif status == states.FAILURE and claim == token:  # _fail() keeps our token
            outcomes[task_id] = "failed"
        else:  # SCHEDULED_SENT, or the worker already wrote its state
            outcomes[task_id] = "sent"
    return outcomes


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
