"""Retrying stored tasks: copies with a new id, the stored call and its routing.

Used by the admin's Retry action, usable from code::

    from django_celery_fulldbresult import replay
    outcomes = replay.retry(app, TaskResultMeta.objects.filter(status="FAILURE", task=name))

Each copy gets its PENDING row first (with ``retried_from`` = the original id),
in batches, then every copy is published on one broker connection. A copy that
could not be published loses its row again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from kombu.exceptions import EncodeError

from . import conf, db, encryption, publish, scheduler, secrecy, serialization
from .states import PENDING, SCHEDULED

logger = logging.getLogger(__name__)

#: Stored options a copy is sent with. Not copied: chord and group membership (a copy
#: must not count as a part of the original's chord), eta/countdown/expires (a copy
#: runs now), the attempt count (a copy starts at 0), parent and root (an operator
#: sends it).
COPIED_OPTIONS = (
    "link",
    "link_error",
    "chain",
    "headers",
    "time_limit",
    "soft_time_limit",
    "shadow",
)

#: The columns a retry reads from the original row.
COLUMNS = (
    "id",
    "task_id",
    "task",
    "status",
    "replayable",
    "args",
    "kwargs",
    "packed_args",
    "packed_args_content_type",
    "argsrepr",
    "kwargsrepr",
    "options",
    "queue",
    "exchange",
    "routing_key",
    "priority",
)

#: Columns copied as they are into the copy's row.
COPIED_COLUMNS = (
    "task",
    "args",
    "kwargs",
    "packed_args",
    "packed_args_content_type",
    "argsrepr",
    "kwargsrepr",
    "queue",
    "exchange",
    "routing_key",
    "priority",
)

#: Rows created per INSERT statement.
BATCH_SIZE = 500


@dataclass
class Outcome:
    """What became of one selected row."""

    task_id: str
    task: str
    new_id: str | None = None
    error: str | None = None
    #: The copy waits as a SCHEDULED row due now, for the scheduler's sender to send.
    deferred: bool = False

    @property
    def sent(self) -> bool:
        return self.new_id is not None and self.error is None


def decodable(row: Any, accept: Any) -> bool:
    """Whether this process may decode the row's stored call (``accept``: content types or
    serializer names; pickle only where the caller accepts it). Reads the content type only
    (the admin's rows do not load the payload)."""
    if row.packed_args_content_type is None:
        return True
    held = encryption.inner_content_type(row.packed_args_content_type)
    return held in serialization.accepted(accept)


def refusal(row: Any, accept: Any = None, defer: bool = False) -> str | None:
    """Why ``row`` cannot be retried, or None when it can.

    ``defer``: a call this process may not decode (``accept``) is not refused when the
    scheduler is on: its copy waits as a SCHEDULED row due now, and the sender (which
    decodes what the app accepts) sends it.
    """
    if not row.replayable:
        return secrecy.refusal(row)
    if not row.task:
        return "its task name is unknown"
    if row.status == SCHEDULED:
        return "it is still waiting for its eta (use Send now or Cancel)"
    if row.packed_args is None and row.args is None and row.kwargs is None:
        return "its arguments are unknown (no publish record and no worker record)"
    if not decodable(row, accept):
        if defer and conf.get("SCHEDULE_ETA"):
            return None
        return (
            f"its arguments are stored as {row.packed_args_content_type}, which is not decoded "
            "here (decoding it could run code in the web process); retry it with "
            "replay.retry() on a worker host, or turn on the database scheduler "
            "(SCHEDULE_ETA), whose sender sends such copies"
        )
    if row.packed_args is not None:
        try:
            row.get_call(accept)
        except Exception as exc:  # noqa: BLE001 - reported to the operator
            return f"its stored arguments cannot be decoded: {exc}"
    return None


def copy_options(options: dict[str, Any] | None, reveal: bool = False) -> dict[str, Any]:
    """The stored options a copy is sent with (see ``COPIED_OPTIONS``); ``reveal``: with the
    encrypted arguments of their signatures opened, to send (the copy's row keeps them
    encrypted)."""
    options = options or {}
    if reveal:
        options = secrecy.reveal_in_options(options)
    return {k: options[k] for k in COPIED_OPTIONS if options.get(k) not in (None, [], {}, "")}


def _copy_row(model: type, row: Any, new_id: str, now: Any, deferred: bool = False) -> Any:
    """The copy's row: PENDING (published here at once), or SCHEDULED and due now
    (``deferred``: the scheduler's sender decodes and sends it)."""
    values = {column: getattr(row, column) for column in COPIED_COLUMNS}
    return model(
        task_id=new_id,
        status=SCHEDULED if deferred else PENDING,
        eta=now if deferred else None,
        replayable=True,
        options=copy_options(row.options) or None,
        retried_from=row.task_id,
        date_submitted=now,
        date_modified=now,
        **values,
    )


def _send_kwargs(row: Any) -> dict[str, Any]:
    routing = {
        "queue": row.queue,
        "exchange": row.exchange,
        "routing_key": row.routing_key,
        "priority": row.priority,
    }
    return {
        **{k: v for k, v in routing.items() if v is not None},
        **copy_options(row.options, reveal=True),
    }


def retry(app: Any, rows: Iterable[Any], accept: Any = None) -> list[Outcome]:
    """Send a copy of each replayable row; one ``Outcome`` per row, in order.

    ``rows`` are ``TaskResultMeta`` instances holding at least ``COLUMNS``. ``accept``:
    what this process may decode (default: the app's ``accept_content``); the admin passes
    ``serialization.safe_accept()``, so a copy whose call only the app may decode (pickle)
    is left to the scheduler's sender (``deferred``) or refused.
    """
    from .models import TaskResultMeta

    accept = app.conf.accept_content if accept is None else accept
    outcomes: list[Outcome] = []
    todo: list[tuple[Any, Outcome]] = []
    deferred: list[tuple[Any, Outcome]] = []
    for row in rows:
        error = refusal(row, accept, defer=True)
        outcome = Outcome(task_id=row.task_id, task=row.task, error=error)
        outcomes.append(outcome)
        if outcome.error is None:
            outcome.new_id = str(uuid.uuid4())
            if decodable(row, accept):
                todo.append((row, outcome))
            else:
                outcome.deferred = True
                deferred.append((row, outcome))
    if not todo and not deferred:
        return outcomes
    using = publish.tracking_alias()
    now = timezone.now()
    copies = [_copy_row(TaskResultMeta, row, outcome.new_id, now) for row, outcome in todo]
    copies += [
        _copy_row(TaskResultMeta, row, outcome.new_id, now, deferred=True)
        for row, outcome in deferred
    ]
    # The rows exist before the messages do: a fast worker finds them and updates them.
    db.run_with_reconnect(
        lambda alias: TaskResultMeta.objects.using(alias).bulk_create(copies, BATCH_SIZE), using
    )
    if todo:
        _publish(app, todo, accept)
    unsent = [outcome.new_id for _row, outcome in todo if not outcome.sent]
    if unsent:
        db.run_with_reconnect(
            lambda alias: TaskResultMeta.objects.using(alias).filter(task_id__in=unsent).delete(),
            using,
        )
        for _row, outcome in todo:
            if not outcome.sent:
                outcome.new_id = None
    return outcomes


def _publish(app: Any, todo: list[tuple[Any, Outcome]], accept: Any) -> None:
    """Publish the copies on one connection; a broker failure stops the rest."""
    pending = list(todo)
    try:
        # forwarding(): no interception by the scheduler, no second publish record.
        with scheduler.forwarding(), app.producer_or_acquire() as producer:
            while pending:
                row, outcome = pending[0]
                try:
                    args, kwargs = row.get_call(accept)
                    app.send_task(
                        row.task,
                        args,
                        kwargs,
                        task_id=outcome.new_id,
                        producer=producer,
                        add_to_parent=False,
                        **_send_kwargs(row),
                    )
                except (EncodeError, TypeError, ValueError) as exc:
                    outcome.error = f"cannot be sent: {exc}"
                pending.pop(0)
    except Exception as exc:  # noqa: BLE001 - broker trouble: report the rest as unsent
        logger.error("retry: publishing failed (%r); %d copies not sent", exc, len(pending))
        for _row, outcome in pending:
            outcome.error = f"not sent, the broker failed: {exc}"
