"""The broker side: publish claimed rows as Celery would, with windowed publisher confirms.

No SQL here: ``publish`` returns what the broker made of a batch (``rows.Published``) and
the sender records it on its database connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from typing import Any

from celery.utils.functional import maybe_list

from .. import conf, secrecy, serialization
from .intercept import as_aware, forwarding
from .rows import COLUMN_OPTIONS, FORWARDED_HEADER, ClaimedRow, Published

logger = logging.getLogger(__name__)

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


def call_of(row: ClaimedRow, app: Any) -> tuple[list, dict, dict[str, Any]]:
    """(args, kwargs, send_task keywords) that re-create a stored call exactly."""
    if row["packed_args"] is not None:
        args, kwargs = serialization.decode_packed(
            row["packed_args"], row["packed_args_content_type"], app.conf.accept_content
        )
    else:
        args, kwargs = _stored_json(row, "args", list), _stored_json(row, "kwargs", dict)
    options = secrecy.reveal_in_options(_stored_json(row, "options", dict))
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


def _stored_json(row: ClaimedRow, column: str, kind: type) -> Any:
    """Decode one stored JSON column of a claimed row; TypeError names what is wrong."""
    text = row[f"{column}_json"]  # type: ignore[literal-required]
    value = kind() if text is None else serialization.loads(text)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"stored {column} is a {type(value).__name__}, not a {kind.__name__}")
    return value


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
    options["headers"] = {**(options.get("headers") or {}), FORWARDED_HEADER: True}
    options = app.amqp.router.route(options, route_name or name, args, kwargs)
    if expires is not None:
        expires = as_aware(app, expires)
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
    if not fields.get("ignore_result"):
        app.backend.on_task_call(producer, task_id)
    app.amqp.send_task_message(producer, name, message, declare=declare, **options)


class _Declarations:
    """Queues bound once per publisher to its channel.

    ``send_task`` would look up and bind (copy) the queue for every message; a bound
    queue is declared through kombu's cache just the same, and again after a reconnect
    (the cache is per connection).
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


class _Confirms:
    """AMQP publisher confirms on the publisher's own channel, awaited in windows.

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


class Publisher:
    """A sender's broker connection, kept across batches and passes.

    Its channel is put in confirm mode (which must not leak into the app's producer pool)
    and delivery tags count per channel, so it is a connection of its own. After a broker
    error the connection is dropped and the next batch opens a new one.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._connection: Any = None
        self._producer: Any = None
        self._confirms: _Confirms | None = None
        self._declarations: _Declarations | None = None
        #: Broker connections opened over this publisher's life.
        self.connections_opened = 0

    def _ready(self) -> tuple[Any, _Confirms, _Declarations]:
        if self._confirms is not None and not self._alive():
            self.close()
        if self._confirms is None:
            self._connection = self.app.connection_for_write()
            self.connections_opened += 1
            self._producer = self.app.amqp.Producer(self._connection, auto_declare=False)
            self._confirms = _Confirms(self._producer)  # connects
            self._declarations = _Declarations(self.app, self._producer)
        return self._producer, self._confirms, self._declarations  # type: ignore[return-value]

    def _alive(self) -> bool:
        """Whether the connection kept since the last batch still works.

        A broker that restarted while the sender was idle left it dead, and a publish into
        it may even be written without an error and never confirmed (the row would stay
        claimed). Reading what the broker sent meanwhile finds out: its heartbeats, or the
        end of the connection. Transports without an AMQP connection answer every command,
        and a failed publish there releases its row: they are not probed.
        """
        if self._connection.transport.driver_type != "amqp":
            return True
        try:
            self._connection.heartbeat_check()
            self._connection.drain_events(timeout=0)
        except TimeoutError:
            return True  # nothing to read: alive
        except Exception:  # noqa: BLE001 - closed, reset, or a missed heartbeat
            return False
        return True

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._producer = self._confirms = self._declarations = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def publish(self, rows: list[ClaimedRow], token: uuid.UUID) -> Published:
        """Publish claimed rows in order, until the broker fails; what it confirmed.

        A row that cannot be decoded fails alone; after a broker error the rest of the
        batch is unsent (released by the caller) and the connection is dropped.
        """
        outcome = Published(token)
        try:
            producer, confirms, declarations = self._ready()
        except Exception as exc:  # noqa: BLE001 - broker down: give everything back
            logger.error(
                "scheduler: cannot reach the broker (%r); %d rows released", exc, len(rows)
            )
            self.close()
            outcome.unsent = [row["id"] for row in rows]
            return outcome
        pending = list(rows)
        try:
            sent_event = bool(self.app.conf.task_send_sent_event)
            with forwarding():
                while pending:
                    row = pending[0]
                    try:
                        args, kwargs, options = call_of(row, self.app)
                    except Exception as exc:  # noqa: BLE001 - a bad row must not stop the rest
                        logger.error(
                            "scheduled task %s (%s) cannot be sent: %r",
                            row["task_id"],
                            row["task"],
                            exc,
                        )
                        outcome.failures.append((row["id"], exc))
                        pending.pop(0)
                        continue
                    if confirms.enabled:
                        # A retry would republish on a new channel, outside our confirm
                        # tracking; the row is released instead and sent on a later pass.
                        options["retry"] = False
                    send_message(
                        self.app,
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
        outcome.sent = confirmed
        outcome.unsent = refused + [row["id"] for row in pending]
        outcome.unconfirmed = unconfirmed
        if unconfirmed:
            logger.error(
                "scheduler: the broker did not confirm %d forwarded tasks; they stay claimed "
                "and find_stale_scheduled_tasks reports them",
                len(unconfirmed),
            )
        if refused:
            logger.error("scheduler: the broker refused %d tasks; released", len(refused))
        if outcome.broker_failed:
            self.close()  # a new connection for the next batch
        return outcome
